"""Run the local DAG's steps in the pipeline's own images (``make run-local ARGS=--containers``).

``kfp.local.DockerRunner`` runs each step in its component's image through the Docker API,
which podman also serves (``podman system service``). As kfp 2.13 ships it, it starts the
container as the image's user (``vitpcm``, uid 1000) with the pipeline root bind-mounted:
that user cannot write a root owned by whoever runs ``make``, so outputs fail unless the
folder is world-writable. Here each step runs instead as the invoking user's uid:gid, like
``docker run --user "$(id -u):$(id -g)"``: outputs are that user's files, and nothing is
opened to others. ``HOME`` points at ``/tmp`` (the image's home belongs to uid 1000). The
steps also get the host network (the local MLflow and S3 servers listen on 127.0.0.1), the
environment variables the local services set, and a read-only mount of a ``--source-dir``.

:func:`docker_engine` finds the Docker API: ``DOCKER_HOST``, the default Docker socket, or a
``podman system service`` started for the run and stopped after it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vitpcm.errors import ConfigError

# Environment passed into the steps: what the local services and the run set.
FORWARDED_ENV_PREFIXES = ("MLFLOW_", "AWS_", "S3_", "TF_CPP_", "KFP_", "VITPCM_")
DOCKER_SOCKET = "/var/run/docker.sock"


def forwarded_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables a step container gets: the forwarded prefixes, and ``HOME=/tmp``."""
    env = os.environ if environ is None else environ
    out = {k: v for k, v in env.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    out["HOME"] = "/tmp"  # the image's home belongs to its own user
    return out


def run_as() -> str:
    """``uid:gid`` of this process: the owner of the pipeline root and of every output."""
    return f"{os.getuid()}:{os.getgid()}"


def _local_image(client: Any, image: str) -> Any:
    """The local image ``image`` names (tag or ``name:tag@sha256:`` reference)."""
    import docker

    try:
        return client.images.get(image.split("@", 1)[0] if "@" in image else image)
    except docker.errors.ImageNotFound:
        raise ConfigError(
            f"image {image} is not on this machine: build it with `make images` "
            "(or images/build.sh cpu gpu); the containerised run pulls nothing"
        ) from None


@contextlib.contextmanager
def step_containers(
    *, extra_mounts: Sequence[str] = (), environ: Mapping[str, str] | None = None
) -> Iterator[list[dict[str, Any]]]:
    """While active, ``kfp.local.DockerRunner`` starts its step containers as described in
    the module docstring. Yields the list each started container's settings are added to.

    Args:
        extra_mounts: Host folders mounted read-only at the same path (a ``--source-dir``).
        environ: Where the forwarded variables are read (default ``os.environ``, read at
            each step's start, so variables set by the services are included).
    """
    # The one place this project swaps a kfp internal: kfp 2.13's DockerRunner takes no run
    # settings. kfp >= 2.15 takes them (DockerRunner(user=..., network_mode=..., ...)) but
    # needs protobuf 6, which TensorFlow 2.17 refuses (DESIGN.md's pins); move to that then.
    from kfp.local import docker_task_handler

    started: list[dict[str, Any]] = []
    original = docker_task_handler.run_docker_container

    def run_container(client: Any, image: str, command: list[str], volumes: dict) -> int:
        _local_image(client, image)
        mounts = dict(volumes)
        for folder in extra_mounts:
            mounts[str(folder)] = {"bind": str(folder), "mode": "ro"}
        settings = {
            "image": image.split("@", 1)[0] if "@" in image else image,
            "command": command,
            "volumes": mounts,
            "user": run_as(),
            "environment": forwarded_environment(environ),
            "network_mode": "host",
        }
        started.append(settings)
        container = client.containers.run(detach=True, stdout=True, stderr=True, **settings)
        try:
            for line in container.logs(stream=True):
                print(line.decode(errors="replace"), end="")
            return int(container.wait()["StatusCode"])
        finally:
            with contextlib.suppress(Exception):
                container.remove(force=True)

    docker_task_handler.run_docker_container = run_container
    try:
        yield started
    finally:
        docker_task_handler.run_docker_container = original


def _reachable(host: str) -> bool:
    import docker

    try:
        client = docker.DockerClient(base_url=host, timeout=10)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except docker.errors.DockerException:
        return False


@contextlib.contextmanager
def docker_engine(environ: Mapping[str, str] | None = None) -> Iterator[str]:
    """``DOCKER_HOST`` for the run: the one set, the Docker socket, or a podman service.

    Raises:
        ConfigError: No engine answers and podman is not installed (or does not start).
    """
    env = os.environ if environ is None else environ
    host = env.get("DOCKER_HOST", "").strip()
    if host:
        if not _reachable(host):
            raise ConfigError(f"DOCKER_HOST={host} does not answer; start the engine or unset it")
        yield host
        return
    if os.path.exists(DOCKER_SOCKET) and _reachable(f"unix://{DOCKER_SOCKET}"):
        yield f"unix://{DOCKER_SOCKET}"
        return
    podman = shutil.which("podman")
    if podman is None:
        raise ConfigError(
            "no container engine: set DOCKER_HOST, start docker, or install podman "
            "(images/setup-podman.sh)"
        )
    folder = tempfile.mkdtemp(prefix="vitpcm-podman-")
    host = f"unix://{folder}/podman.sock"
    service = subprocess.Popen(
        [podman, "system", "service", "--time=0", host],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not (Path(folder) / "podman.sock").exists() or not _reachable(host):
            if service.poll() is not None or time.monotonic() > deadline:
                err = (service.stderr.read() if service.stderr else b"").decode()[-500:]
                raise ConfigError(f"podman system service did not start: {err.strip()}")
            time.sleep(0.2)
        yield host
    finally:
        service.terminate()
        try:
            service.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
        shutil.rmtree(folder, ignore_errors=True)
