"""Container images: pins shared with CI, the build script, and the built CPU image itself.

The first part is fast and always runs: images/requirements.py derives the images' pins from
pyproject.toml, and images/build.sh stages a small context, reads the names from
components/images.py and calls the engine with the right flags (checked with a stand-in engine).

The second part builds the CPU image with podman and runs it: `vitpcm --help`, a convert of a
tiny synthetic dataset, a KFP-style runtime pip install with no network, and the MLflow server
exactly as manifests/ starts it. It takes minutes (tens on a cold cache), needs root, podman and
the debootstrapped base, so it runs only with VITPCM_TEST_IMAGES=1: `make test-images` sets that
up and runs it. Without the variable those tests are reported as skipped, with that reason.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from components.images import DIGESTS_ENV, image, record_digest, tagged
from components.images import image as pinned
from components.images import main as images_main
from helpers.podman import build_image, needs_image_build, podman, run_in
from helpers.s3_server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "images" / "build.sh"
PYPROJECT = REPO / "pyproject.toml"

# Building an image from a debootstrapped base takes 5-40 minutes.
pytestmark = pytest.mark.timeout(3600)


def _load_requirements_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "image_requirements", REPO / "images" / "requirements.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


requirements = _load_requirements_module()


def _pyproject_dependencies() -> list[str]:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]


# ----------------------------------------------------------------------------- pins


def test_cpu_requirements_are_pyproject_dependencies_verbatim() -> None:
    deps = requirements.project_dependencies(PYPROJECT)
    assert deps == _pyproject_dependencies()
    assert requirements.image_requirements(deps, "cpu") == deps


def test_gpu_requirements_swap_only_tensorflow_cpu_keeping_its_version() -> None:
    deps = _pyproject_dependencies()
    gpu = requirements.image_requirements(deps, "gpu")
    changed = [(a, b) for a, b in zip(deps, gpu, strict=True) if a != b]
    assert len(changed) == 1
    before, after = changed[0]
    version = re.sub(r"^tensorflow-cpu", "", before)
    assert version.startswith("==")
    assert after == f"tensorflow[and-cuda]{version}"


def test_gpu_swap_handles_spelling_and_markers() -> None:
    deps = ["numpy<2", "TensorFlow_CPU >=2.17,<2.18; python_version < '3.12'"]
    assert requirements.image_requirements(deps, "gpu") == [
        "numpy<2",
        "tensorflow[and-cuda] >=2.17,<2.18; python_version < '3.12'",
    ]


def test_gpu_swap_without_tensorflow_cpu_is_an_error() -> None:
    with pytest.raises(SystemExit, match="no tensorflow-cpu requirement"):
        requirements.image_requirements(["numpy<2"], "gpu")
    with pytest.raises(SystemExit, match="unknown variant 'tpu'"):
        requirements.image_requirements(["numpy<2"], "tpu")


def test_missing_pyproject_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not found"):
        requirements.project_dependencies(tmp_path / "pyproject.toml")
    empty = tmp_path / "empty.toml"
    empty.write_text("[project]\nname = 'x'\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="no \\[project\\].dependencies"):
        requirements.project_dependencies(empty)


def test_requirements_script_prints_one_requirement_per_line() -> None:
    # As the Dockerfiles run it: a plain interpreter, no project import.
    done = subprocess.run(
        [sys.executable, str(REPO / "images" / "requirements.py"), str(PYPROJECT), "--variant=gpu"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert lines == requirements.image_requirements(_pyproject_dependencies(), "gpu")
    assert any(line.startswith("tensorflow[and-cuda]==") for line in lines)


# ----------------------------------------------------------------------------- build.sh


_FAKE_ENGINE = """#!/usr/bin/env bash
# Records each call; for `build`, also the files of the context (the last argument).
set -eu
printf '%s\\n' "$*" >> "$FAKE_ENGINE_LOG"
if [ "$1" = build ]; then
    for last; do :; done
    (cd "$last" && find . -type f | sort) > "$FAKE_ENGINE_LOG.context"
fi
# push: podman writes the manifest digest to --digestfile; docker's is read by inspect.
if [ "$1" = push ] && [ "$2" = --digestfile ]; then
    printf 'sha256:%064d' 1 > "$3"
fi
if [ "$1" = inspect ]; then
    for last; do :; done
    echo "mirror.example/other@sha256:$(printf '%064d' 3)"
    echo "${last%:*}@sha256:$(printf '%064d' 2)"
fi
"""


@pytest.fixture
def fake_engines(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A PATH with stand-in `docker` and `podman` that log their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("docker", "podman"):
        path = bin_dir / name
        path.write_text(_FAKE_ENGINE, encoding="utf-8")
        path.chmod(0o755)
    log = tmp_path / "engine.log"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_ENGINE_LOG": str(log),
        "PYTHON": sys.executable,
        "VITPCM_IMAGE_REGISTRY": "registry.example/ml",
        "VITPCM_IMAGE_TAG": "t1",
    }
    for var in ("CONTAINER_ENGINE", "BASE_IMAGE", "BUILD_NETWORK", "CA_BUNDLE"):
        env.pop(var, None)
    env["VITPCM_IMAGE_DIGESTS"] = str(tmp_path / "digests" / "images.json")
    yield log, env


def _build(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(BUILD), *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_build_script_uses_pipeline_image_names_and_a_small_context(
    fake_engines: tuple[Path, dict[str, str]],
) -> None:
    log, env = fake_engines
    done = _build(env, "--engine", "docker", "--base-image", "example/base:1", "cpu", "gpu")
    assert done.returncode == 0, done.stderr
    calls = log.read_text(encoding="utf-8").splitlines()
    assert len(calls) == 2
    for call, kind in zip(calls, ("cpu", "gpu"), strict=True):
        argv = call.split()
        assert argv[0] == "build"
        expected = image(kind, environ={"VITPCM_IMAGE_REGISTRY": "registry.example/ml",
                                        "VITPCM_IMAGE_TAG": "t1"})  # fmt: skip
        assert argv[argv.index("--tag") + 1] == expected == f"registry.example/ml/vitpcm-{kind}:t1"
        assert argv[argv.index("--file") + 1] == str(REPO / "images" / kind / "Dockerfile")
        assert argv[argv.index("--build-arg") + 1] == "BASE_IMAGE=example/base:1"
        assert "--format" not in argv  # docker has no such flag
    context = (log.parent / "engine.log.context").read_text(encoding="utf-8").splitlines()
    assert {"./pyproject.toml", "./README.md", "./images/requirements.py"} <= set(context)
    assert "./src/vitpcm/cli/__init__.py" in context
    assert "./configs/synthetic.yaml" in context
    # The package also holds the KFP components (the train step's launchers), not the DAG.
    assert {"./components/launchers/tfjob.py", "./components/images.py"} <= set(context)
    assert not [f for f in context if f.startswith(("./pipeline/", "./localrun/"))]
    assert not [f for f in context if f.startswith(("./.venv", "./tests", "./.git"))]
    assert not [f for f in context if "__pycache__" in f or f.endswith(".pyc")]


@pytest.mark.parametrize(
    ("engine", "digest"),
    [("podman", f"sha256:{1:064d}"), ("docker", f"sha256:{2:064d}")],
)
def test_pushed_images_are_pinned_by_digest(
    fake_engines: tuple[Path, dict[str, str]], engine: str, digest: str
) -> None:
    log, env = fake_engines
    settings = {k: env[k] for k in ("VITPCM_IMAGE_REGISTRY", "VITPCM_IMAGE_TAG", DIGESTS_ENV)}
    assert pinned("cpu", settings) == tagged("cpu", settings)  # nothing pushed yet: the tag
    done = _build(env, "--engine", engine, "--push", "cpu")
    assert done.returncode == 0, done.stderr
    calls = [c.split()[0] for c in log.read_text(encoding="utf-8").splitlines()]
    assert calls == (["build", "push"] if engine == "podman" else ["build", "push", "inspect"])
    reference = "registry.example/ml/vitpcm-cpu:t1"
    assert pinned("cpu", settings) == f"{reference}@{digest}"
    assert pinned("gpu", settings) == tagged("gpu", settings)  # not pushed: by tag
    # Another tag configured since: the recorded digest is not that image's.
    assert pinned("cpu", {**settings, "VITPCM_IMAGE_TAG": "t2"}).endswith("vitpcm-cpu:t2")
    # What the compiled pipeline then names.
    cli = subprocess.run(
        [sys.executable, "-m", "components.images", "--print", "cpu", "--pinned"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.stdout.strip() == f"{reference}@{digest}"


def test_digest_records_refuse_what_is_not_a_digest(tmp_path: Path) -> None:
    env = {DIGESTS_ENV: str(tmp_path / "images.json")}
    with pytest.raises(ValueError, match="is not an image digest"):
        record_digest("cpu", "r/vitpcm-cpu:1", "latest", env)
    assert not (tmp_path / "images.json").exists()
    (tmp_path / "images.json").write_text('{"cpu": {"image": "x"}}')
    with pytest.raises(ValueError, match="entry 'cpu' is not"):
        pinned("cpu", env)
    assert images_main(["--record", "cpu", "r/vitpcm-cpu:1", "sha256:abc"]) == 2


def test_build_script_podman_flags(fake_engines: tuple[Path, dict[str, str]]) -> None:
    log, env = fake_engines
    bundle = Path(env["FAKE_ENGINE_LOG"]).parent / "ca.pem"
    bundle.write_text("not a real CA\n", encoding="utf-8")
    done = _build(env, "--engine", "podman", "--network", "host", "--ca-bundle", str(bundle))
    assert done.returncode == 0, done.stderr
    (call,) = log.read_text(encoding="utf-8").splitlines()
    argv = call.split()
    assert argv[argv.index("--tag") + 1].endswith("/vitpcm-cpu:t1")  # cpu is the default
    assert argv[argv.index("--format") + 1] == "docker"  # keeps the Dockerfiles' SHELL
    assert argv[argv.index("--network") + 1] == "host"
    assert argv[argv.index("--volume") + 1] == f"{bundle}:/etc/ssl/certs/ca-certificates.crt:ro"
    assert "--build-arg" not in argv  # no base given: the Dockerfile's default


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "docker", "--ca-bundle", "/etc/hostname"], "--ca-bundle needs podman"),
        (["--engine", "rkt"], "--engine must be docker or podman"),
        (["--engine", "podman", "--ca-bundle", "/no/such/ca.pem"], "CA bundle /no/such/ca.pem"),
        (["arm"], "unknown argument 'arm'"),
    ],
)
def test_build_script_rejects_bad_arguments(
    fake_engines: tuple[Path, dict[str, str]], args: list[str], message: str
) -> None:
    log, env = fake_engines
    done = _build(env, *args)
    assert done.returncode == 1
    assert message in done.stderr
    assert not log.exists()  # nothing was built


# ----------------------------------------------------------------------------- real image


@pytest.fixture(scope="module")
def cpu_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Builds the CPU image as `make test-images` does (VITPCM_TEST_IMAGE: use that)."""
    return build_image("cpu", tmp_path_factory.mktemp("build"))


@needs_image_build
@pytest.mark.slow
def test_image_runs_as_uid_1000_with_python_pip_and_vitpcm_on_path(cpu_image: str) -> None:
    out = run_in(
        cpu_image,
        "sh",
        "-c",
        'id -u; for t in python3 pip vitpcm; do command -v "$t"; done; echo "$VITPCM_CONFIG_DIR"',
    )
    assert out.split() == [
        "1000",
        "/opt/venv/bin/python3",
        "/opt/venv/bin/pip",
        "/opt/venv/bin/vitpcm",
        "/opt/vitpcm/configs",
    ]


@needs_image_build
@pytest.mark.slow
def test_vitpcm_help_and_bare_config_names(cpu_image: str) -> None:
    assert "usage: vitpcm" in run_in(cpu_image, "vitpcm", "--help")
    # The configs baked into the image are found by bare name through VITPCM_CONFIG_DIR.
    shown = yaml.safe_load(run_in(cpu_image, "vitpcm", "config", "show", "-c", "synthetic"))
    assert shown["name"] == "synthetic"


@needs_image_build
@pytest.mark.slow
def test_image_carries_the_kfp_components_and_names_itself(cpu_image: str) -> None:
    script = (
        "import components.launchers.trainjob, components.images as i; "
        "print(i.image('cpu', environ={}))"
    )
    assert run_in(cpu_image, "python3", "-c", script).strip() == image("cpu", environ={})


@needs_image_build
@pytest.mark.slow
def test_convert_a_tiny_synthetic_dataset(cpu_image: str) -> None:
    script = (
        "set -e; "
        "vitpcm data synth --out /tmp/s --train 8 --val 4 --test 0 --size 64 --no-progress; "
        "vitpcm data convert --dataset voc12 --src /tmp/s --out /tmp/t --no-progress; "
        "ls /tmp/t; cat /tmp/t/dataset.json"
    )
    out = run_in(cpu_image, "sh", "-c", script, timeout=600)
    listing, _, info_text = out.partition("{")
    info = json.loads("{" + info_text)
    assert "train-00000-of-00001.tfrecord" in listing.split()
    assert "val-00000-of-00001.tfrecord" in listing.split()
    assert info["splits"]["train"]["num_examples"] == 8
    assert info["splits"]["val"]["num_examples"] == 4


@needs_image_build
@pytest.mark.slow
def test_kfp_runtime_install_needs_no_network(cpu_image: str) -> None:
    # What a KFP 2.13 lightweight component runs before its code, here with no network.
    install = (
        "PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip install --quiet --no-warn-script-location "
        "'kfp==2.13.0' '--no-deps' 'typing-extensions>=3.7.4,<5; python_version<\"3.9\"' "
        "&& python3 -c 'import kfp; print(kfp.__version__)'"
    )
    assert run_in(cpu_image, "sh", "-c", install).split()[-1] == "2.13.0"


@needs_image_build
@pytest.mark.slow
def test_image_pins_match_the_ci_environment(cpu_image: str) -> None:
    frozen = dict(
        line.split("==", 1)
        for line in run_in(cpu_image, "pip", "freeze", "--all").splitlines()
        if "==" in line
    )
    frozen = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in frozen.items()}
    for dep in _pyproject_dependencies():
        name = re.split(r"[\s<>=!~;\[]", dep, maxsplit=1)[0].lower()
        assert name in frozen, f"{name} missing from the image"
        if "==" in dep:
            assert frozen[name] == importlib.metadata.version(name), name


_MLFLOW_PROBE = r"""
import json, subprocess, sys, time, urllib.error, urllib.request

argv = json.loads(sys.argv[1])
log = open("/tmp/server.log", "w+")  # a file, not a pipe: a full pipe would stall the server
server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True)
result = {}
try:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if server.poll() is not None:
            result["exit"] = server.returncode
            log.seek(0)
            result["log"] = log.read()[-2000:]
            break
        try:
            with urllib.request.urlopen("http://127.0.0.1:5000/health", timeout=5) as r:
                result["health"] = r.status
                break
        except OSError:
            time.sleep(2)
    for host in ("mlflow.kubeflow-user-example-com.svc.cluster.local:5000", "evil.example"):
        request = urllib.request.Request(
            "http://127.0.0.1:5000/api/2.0/mlflow/experiments/search?max_results=1",
            headers={"Host": host},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                result[host] = r.status
        except urllib.error.HTTPError as exc:
            result[host] = exc.code
finally:
    server.terminate()
    server.wait(30)
print(json.dumps(result))
"""


@needs_image_build
@pytest.mark.slow
def test_mlflow_server_runs_as_the_manifest_starts_it(cpu_image: str, tmp_path: Path) -> None:
    deployment = yaml.safe_load((REPO / "manifests" / "mlflow-deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = [f"--env={e['name']}={e['value']}" for e in container["env"] if "value" in e]
    db = tmp_path / "db"
    db.mkdir()
    db.chmod(0o777)  # the pod's fsGroup does this on a cluster
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "db"]
    done = podman(
        "run",
        "--rm",
        "--network=none",
        "--read-only",  # as readOnlyRootFilesystem: true, with /tmp an emptyDir
        "--tmpfs=/tmp",
        f"--volume={db}:{mount['mountPath']}",
        f"--user={pod['securityContext']['runAsUser']}",
        *env,
        "--env=AWS_ACCESS_KEY_ID=unused",
        "--env=AWS_SECRET_ACCESS_KEY=unused",
        "--env=MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:9",
        cpu_image,
        "python3",
        "-c",
        _MLFLOW_PROBE,
        json.dumps(container["command"] + container["args"]),
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result.get("health") == 200, result
    assert result["mlflow.kubeflow-user-example-com.svc.cluster.local:5000"] == 200
    assert result["evil.example"] == 403  # --allowed-hosts at work
    assert (db / "mlflow.db").is_file()  # the backend store lies on the volume


_ARTIFACT_PROBE = r"""
import json, os, subprocess, sys, time, traceback, urllib.request

argv, port = json.loads(sys.argv[1]), sys.argv[2]
log = open("/tmp/server.log", "w+")  # a file, not a pipe: a full pipe would stall the server
server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True)
# Fail fast: the client's default retries would hide a server error for minutes.
os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="60")
result = {}
try:
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            break
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(2)
    import mlflow

    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    with mlflow.startrun_in() as run:
        result["run_id"] = run.info.run_id
        mlflow.log_text("proxied", "notes/hello.txt")
    result["logged"] = True
except Exception:
    result["client_error"] = traceback.format_exc()[-1500:]
finally:
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
    log.seek(0)
    result["server_log"] = log.read()[-3000:]
print(json.dumps(result))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@needs_image_build
@pytest.mark.slow
def test_mlflow_server_proxies_artifacts_to_s3(
    cpu_image: str,
    tmp_path: Path,
    s3_bucket: Any,  # noqa: F811
) -> None:
    # The manifest's server, reaching a local S3 instead of MinIO: host network to reach it,
    # so loopback and a free port instead of 0.0.0.0:5000.
    deployment = yaml.safe_load((REPO / "manifests" / "mlflow-deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port = _free_port()
    replaced = {
        "--host": "127.0.0.1",
        "--port": str(port),
        "--artifacts-destination": s3_bucket.uri("mlflow"),
    }
    args = [
        f"{flag}={replaced[flag]}" if flag in replaced else arg
        for arg in container["args"]
        for flag in [arg.partition("=")[0]]
    ]
    env = [f"--env={e['name']}={e['value']}" for e in container["env"] if "value" in e]
    s3_env = s3_bucket.env()
    env += [
        f"--env=MLFLOW_S3_ENDPOINT_URL={s3_env['S3_ENDPOINT']}",
        f"--env=AWS_ACCESS_KEY_ID={s3_env['AWS_ACCESS_KEY_ID']}",
        f"--env=AWS_SECRET_ACCESS_KEY={s3_env['AWS_SECRET_ACCESS_KEY']}",
        f"--env=AWS_DEFAULT_REGION={s3_env['AWS_REGION']}",
    ]
    db = tmp_path / "db"
    db.mkdir()
    db.chmod(0o777)
    done = podman(
        "run",
        "--rm",
        "--network=host",
        "--read-only",
        "--tmpfs=/tmp",
        f"--volume={db}:/mlflow",
        *env,
        cpu_image,
        "python3",
        "-c",
        _ARTIFACT_PROBE,
        json.dumps(container["command"] + args),
        str(port),
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result.get(
        "logged"
    ), f"{result.get('client_error')}\n--- server log ---\n{result['server_log']}"
    run_id = result["run_id"]
    keys = s3_bucket.list_keys("mlflow")
    assert any(k.endswith(f"{run_id}/artifacts/notes/hello.txt") for k in keys), keys
