"""Multi-worker training as a Kubeflow Training Operator ``TFJob`` (kubeflow.org/v1).

The operator starts ``workers`` pods and gives each a ``TF_CONFIG``; ``vitpcm train`` turns
that into a MultiWorkerMirroredStrategy (worker 0 is the chief and writes the outputs). The
launcher step creates the job, owned by its own pod so that deleting the run deletes the
job, waits for it, and collects the chief's outputs. A retried launcher finds its job
already there (same name, derived from the run id) and waits for it instead of starting
another.

Nothing here imports kfp: plain functions, tested with a fake Kubernetes API.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vitpcm.errors import ConfigError, VitpcmError

log = logging.getLogger(__name__)

GROUP = "kubeflow.org"
VERSION = "v1"
PLURAL = "tfjobs"
# The Training Operator requires this container name in TFJob replica templates.
CONTAINER_NAME = "tensorflow"
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# The KFP v2 driver exposes the step's pod to it; used for the owner reference.
POD_NAME_ENV = "KFP_POD_NAME"
POD_UID_ENV = "KFP_POD_UID"
OUTPUT_FILES = ("model.keras", "config.yaml", "metrics.json", "history.json")


class TFJobError(VitpcmError):
    """The training job failed, timed out or could not be created."""


def artifact_s3_uri(uri: str) -> str:
    """The ``s3://`` form of a pipeline artifact URI, readable by the TFJob workers.

    KFP names artifacts in its MinIO store ``minio://bucket/key``; the same object is
    ``s3://bucket/key`` for tensorflow-io when ``S3_ENDPOINT`` points at that MinIO.

    Raises:
        ConfigError: The artifact is not in S3-compatible storage.
    """
    if uri.startswith("s3://"):
        return uri
    if uri.startswith("minio://"):
        return "s3://" + uri[len("minio://") :]
    raise ConfigError(
        f"multi-worker training reads the dataset from S3, but the artifact is at {uri}; "
        "use MinIO/S3 as the pipeline artifact store, or train on one node (multi_worker=false)"
    )


def training_out_uri(work_root: str, run_id: str) -> str:
    """``<work_root>/<run_id>/train``, the folder the chief worker writes.

    Raises:
        ConfigError: ``work_root`` is not an ``s3://`` prefix (workers share no disk).
    """
    if not work_root.startswith("s3://"):
        raise ConfigError(
            f"work_root must be an s3:// prefix the TFJob workers can all reach, not "
            f"{work_root!r}; set the pipeline's checkpoint_root, e.g. s3://vitpcm/runs"
        )
    return f"{work_root.rstrip('/')}/{run_id}/train"


def job_name(run_id: str) -> str:
    """A valid Kubernetes name derived from the run id (stable across launcher retries)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    return f"vitpcm-train-{slug}"[:63].rstrip("-")


def train_command(config: str, data_uri: str, out_uri: str, overrides: Sequence[str]) -> list[str]:
    """The ``vitpcm train`` command line every worker runs."""
    command = ["vitpcm", "train", "-c", config, "--data", data_uri, "--out", out_uri]
    for item in overrides:
        command += ["--set", item]
    return [*command, "--no-progress"]


def tfjob_manifest(
    *,
    name: str,
    namespace: str,
    image: str,
    command: Sequence[str],
    workers: int,
    gpus_per_worker: int,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] = (),
    env_secrets: Sequence[str] = (),
    owner: Mapping[str, str] | None = None,
    backoff_limit: int = 3,
) -> dict[str, Any]:
    """The TFJob custom resource.

    Args:
        name: Job name.
        namespace: Namespace to create it in.
        image: Worker image.
        command: Command of every worker.
        workers: Worker replicas (worker 0 is the chief).
        gpus_per_worker: GPUs per worker (0: CPU workers).
        node_selector: Node labels the workers require.
        tolerations: Worker tolerations.
        env_secrets: Secrets loaded as environment variables (``envFrom``).
        owner: ``{"name", "uid"}`` of the pod owning the job (garbage collection).
        backoff_limit: Pod restarts allowed before the job fails; a restarted worker
            resumes from the last checkpoint.

    Raises:
        ConfigError: Fewer than one worker or negative GPUs.
    """
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if gpus_per_worker < 0:
        raise ConfigError(f"gpus_per_worker must be 0 or more, got {gpus_per_worker}")
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "command": list(command),
        "env": [{"name": "TF_CPP_MIN_LOG_LEVEL", "value": "2"}],
        "envFrom": [{"secretRef": {"name": secret}} for secret in env_secrets],
    }
    if gpus_per_worker:
        container["resources"] = {"limits": {"nvidia.com/gpu": gpus_per_worker}}
    pod_spec: dict[str, Any] = {"containers": [container]}
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/name": "vitpcm", "app.kubernetes.io/component": "train"},
    }
    if owner:
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Pod", "name": owner["name"], "uid": owner["uid"]}
        ]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TFJob",
        "metadata": metadata,
        "spec": {
            # Pods still running when the job ends are removed; finished ones stay for logs.
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": backoff_limit},
            "tfReplicaSpecs": {
                "Worker": {
                    "replicas": workers,
                    "restartPolicy": "OnFailure",
                    "template": {"spec": pod_spec},
                }
            },
        },
    }


def job_state(job: Mapping[str, Any]) -> tuple[str, str]:
    """``(state, message)`` of a TFJob: the last true condition, or ``Pending``."""
    conditions = (job.get("status") or {}).get("conditions") or []
    for condition in reversed(conditions):
        if str(condition.get("status")) == "True":
            return str(condition.get("type")), str(condition.get("message", ""))
    return "Pending", ""


def wait_for_tfjob(
    api: Any,
    namespace: str,
    name: str,
    *,
    timeout_s: float,
    poll_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Poll the job until it succeeds.

    Raises:
        TFJobError: The job failed, or did not finish in ``timeout_s`` (it is deleted).
    """
    deadline = clock() + timeout_s
    last = None
    while True:
        job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        state, message = job_state(job)
        if state != last:
            log.info("TFJob %s/%s: %s %s", namespace, name, state, message)
            last = state
        if state == "Succeeded":
            return
        if state == "Failed":
            raise TFJobError(
                f"TFJob {namespace}/{name} failed: {message or 'no message'}; "
                f"see `kubectl logs -n {namespace} -l training.kubeflow.org/job-name={name}`"
            )
        if clock() >= deadline:
            api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            raise TFJobError(
                f"TFJob {namespace}/{name} did not finish within {timeout_s / 3600:.1f} h "
                f"(last state {state}); it was deleted. Raise timeout_hours or check the workers"
            )
        sleep(poll_s)


def create_or_attach(api: Any, manifest: Mapping[str, Any]) -> None:
    """Create the job; when it already exists (a retried launcher), keep and reuse it."""
    from kubernetes.client.exceptions import ApiException

    namespace = manifest["metadata"]["namespace"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dict(manifest))
    except ApiException as exc:
        if exc.status == 409:
            log.info("TFJob %s exists already: waiting for it", manifest["metadata"]["name"])
            return
        if exc.status == 404:
            raise TFJobError(
                "the TFJob resource is unknown to this cluster: install the Kubeflow Training "
                "Operator, or train on one node (multi_worker=false)"
            ) from exc
        if exc.status == 403:
            raise TFJobError(
                f"not allowed to create TFJobs in {namespace}: grant the pipeline's service "
                "account create/get/delete on tfjobs.kubeflow.org (manifests/ RBAC)"
            ) from exc
        raise TFJobError(f"cannot create the TFJob: {exc.status} {exc.reason}") from exc


def collect_outputs(out_uri: str, model_dir: str) -> dict[str, Any]:
    """Copy the chief's outputs into ``model_dir`` and return its ``metrics.json``."""
    from vitpcm import storage

    for name in OUTPUT_FILES:
        data = storage.read_bytes(storage.join(out_uri, name))
        storage.write_bytes(os.path.join(model_dir, name), data)
    with open(os.path.join(model_dir, "metrics.json"), encoding="utf-8") as handle:
        return json.load(handle)


def current_namespace() -> str:
    """The namespace of the pod this runs in."""
    try:
        with open(NAMESPACE_FILE, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError as exc:
        raise TFJobError(
            f"cannot tell the namespace ({NAMESPACE_FILE}: {exc}); "
            "multi-worker training must run inside the cluster"
        ) from exc


def kubernetes_api() -> Any:
    """A CustomObjectsApi client from the pod's service account."""
    from kubernetes import client, config

    config.load_incluster_config()
    return client.CustomObjectsApi()


def exit_cleanly_after_s3() -> None:
    """In a pipeline step, leave through ``os._exit`` once ``s3://`` has been touched.

    tensorflow-io aborts at interpreter teardown after any s3:// access (tensorflow/io#2039),
    which would fail a step whose outputs are already recorded. Only registered inside a
    KFP step process (``_KFP_RUNTIME``), never in a caller such as a test runner.
    """
    from vitpcm import storage

    def leave() -> None:
        if storage.s3_used():
            storage.exit_process(int(getattr(sys, "last_value", None) is not None))

    if os.environ.get("_KFP_RUNTIME") == "true":
        atexit.register(leave)


def run_training_tfjob(
    *,
    run_id: str,
    image: str,
    config: str,
    overrides: Sequence[str],
    data_uri: str,
    out_uri: str,
    model_dir: str,
    workers: int,
    gpus_per_worker: int,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] = (),
    env_secrets: Sequence[str] = (),
    timeout_s: float = 72 * 3600.0,
    poll_s: float = 30.0,
    api: Any = None,
    namespace: str | None = None,
) -> dict[str, Any]:
    """Run ``vitpcm train`` as a TFJob, wait for it and collect its outputs.

    Returns:
        The chief's ``metrics.json`` (best validation epoch).

    Raises:
        TFJobError: The job could not be created, failed or timed out.
    """
    exit_cleanly_after_s3()
    api = api if api is not None else kubernetes_api()
    namespace = namespace or current_namespace()
    pod_name, pod_uid = os.environ.get(POD_NAME_ENV), os.environ.get(POD_UID_ENV)
    manifest = tfjob_manifest(
        name=job_name(run_id),
        namespace=namespace,
        image=image,
        command=train_command(config, data_uri, out_uri, overrides),
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        node_selector=node_selector,
        tolerations=tolerations,
        env_secrets=env_secrets,
        owner={"name": pod_name, "uid": pod_uid} if pod_name and pod_uid else None,
    )
    name = manifest["metadata"]["name"]
    log.info("starting TFJob %s/%s with %d workers", namespace, name, workers)
    create_or_attach(api, manifest)
    wait_for_tfjob(api, namespace, name, timeout_s=timeout_s, poll_s=poll_s)
    return collect_outputs(out_uri, model_dir)
