"""What every worker of a distributed job gets, whichever operator runs it.

The workers run ``vitpcm train`` on the dataset in the object store and write to
``<checkpoint_root>/<run id>/train``: worker 0 (the chief) writes the outputs, the others keep
private copies under ``replicas/``, and every worker checkpoints each epoch there, so a job
whose pods are preempted or restarted resumes from its last completed epoch, and so does a
retried step (it attaches to the same job, or starts a new one on the same folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vitpcm.errors import ConfigError
from vitpcm.run_files import CONFIG_FILE, HISTORY_JSON, METRICS_JSON, MODEL_FILE

OUTPUT_FILES = (MODEL_FILE, CONFIG_FILE, METRICS_JSON, HISTORY_JSON)


@dataclass(frozen=True)
class WorkerSpec:
    """One worker pod: image, command and size (Kubernetes quantity strings).

    CPU and memory are requested and limited beside the GPUs, so a profile's ResourceQuota
    (which requires them) admits the pods, and the input pipeline gets the cores it needs.
    """

    image: str
    command: tuple[str, ...]
    workers: int
    gpus: int
    gpu_resource: str = "nvidia.com/gpu"
    cpu_request: str = "8"
    memory_request: str = "32Gi"
    cpu_limit: str = "16"
    memory_limit: str = "64Gi"
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.gpus < 0:
            raise ConfigError(f"gpus per worker must be 0 or more, got {self.gpus}")

    def resources(self) -> dict[str, dict[str, Any]]:
        """``requests`` and ``limits`` of the worker container."""
        requests: dict[str, Any] = {"cpu": self.cpu_request, "memory": self.memory_request}
        limits: dict[str, Any] = {"cpu": self.cpu_limit, "memory": self.memory_limit}
        if self.gpus:
            # Extended resources: the request must equal the limit (Kubernetes requires it).
            requests[self.gpu_resource] = limits[self.gpu_resource] = str(self.gpus)
        return {"requests": requests, "limits": limits}

    def env_list(self) -> list[dict[str, str]]:
        """The container's ``env``: TensorFlow's log level, then the launcher's variables."""
        items = [("TF_CPP_MIN_LOG_LEVEL", "2"), ("PYTHONUNBUFFERED", "1"), *self.env]
        return [{"name": name, "value": value} for name, value in items]


def worker_spec_from_json(text: str, **fields: Any) -> WorkerSpec:
    """A :class:`WorkerSpec` from the pod size the pipeline compiled in (a JSON object).

    Raises:
        ConfigError: Not a JSON object of the size fields.
    """
    allowed = {"gpu_resource", "cpu_request", "memory_request", "cpu_limit", "memory_limit"}
    try:
        size = json.loads(text) if text else {}
    except ValueError as exc:
        raise ConfigError(f"worker_size is not JSON ({exc}): {text!r}") from None
    if not isinstance(size, dict) or not set(size) <= allowed:
        raise ConfigError(f"worker_size must be a JSON object with keys from {sorted(allowed)}")
    return WorkerSpec(**{k: str(v) for k, v in size.items()}, **fields)


def job_name(run_id: str, prefix: str = "vitpcm-train") -> str:
    """A DNS label derived from the run id, the same for every retry of the step.

    Short enough that JobSet's pod hostnames (``<name>-node-0-<index>``) stay within 63
    characters; a hash keeps two runs apart.
    """
    if not run_id.strip():
        raise ConfigError("the run id is empty: the job's name is derived from it")
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")[:8].strip("-")
    return f"{prefix}-{slug}-{digest}" if slug else f"{prefix}-{digest}"


def run_label(run_id: str) -> str:
    """The run id as a label value (at most 63 characters of ``[a-z0-9A-Z._-]``)."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id)[:63]
    return value.strip("-._") or "unknown"


def dataset_uri(uri: str) -> str:
    """The dataset artifact's URI as the workers read it (``s3://`` or ``gs://``).

    KFP names artifacts in its MinIO store ``minio://bucket/key``; the same object is
    ``s3://bucket/key`` for tensorflow-io when ``S3_ENDPOINT`` points at that MinIO.

    Raises:
        ConfigError: The artifact is not in storage every worker can reach.
    """
    if uri.startswith(("s3://", "gs://")):
        return uri
    if uri.startswith("minio://"):
        return "s3://" + uri[len("minio://") :]
    raise ConfigError(
        f"distributed training reads the dataset from object storage, but it is at {uri}; "
        "use MinIO/S3 as the pipeline artifact store, or train on one node (distributed=none)"
    )


def training_out_uri(checkpoint_root: str, run_id: str) -> str:
    """``<checkpoint_root>/<run_id>/train``, the folder the chief writes and all resume from.

    Raises:
        ConfigError: ``checkpoint_root`` is not an ``s3://`` / ``gs://`` prefix.
    """
    if not checkpoint_root.startswith(("s3://", "gs://")):
        raise ConfigError(
            "distributed training needs checkpoint_root, an s3:// prefix every worker can "
            f"reach (got {checkpoint_root!r}); set it on the run, e.g. s3://vitpcm/runs"
        )
    return f"{checkpoint_root.rstrip('/')}/{run_id}/train"


def train_command(
    config: str, data_uri: str, out_uri: str, overrides: Sequence[str]
) -> tuple[str, ...]:
    """The ``vitpcm train`` command line of every worker."""
    command = ["vitpcm", "train", "-c", config, "--data", data_uri, "--out", out_uri]
    for item in overrides:
        command += ["--set", item]
    return (*command, "--no-progress")


def collect_outputs(out_uri: str, model_dir: str) -> dict[str, Any]:
    """Copy the chief's outputs into the step's Model folder; return its ``metrics.json``.

    With them goes the chief's MLflow run file, which names the run the chief logged the
    epochs to and the place of its spool, for the register step to continue that run.
    """
    from vitpcm import storage
    from vitpcm.tracking.spool import RUN_FILE

    for name in OUTPUT_FILES:
        data = storage.read_bytes(storage.join(out_uri, name))
        storage.write_bytes(os.path.join(model_dir, name), data)
    if storage.exists(storage.join(out_uri, RUN_FILE)):
        data = storage.read_bytes(storage.join(out_uri, RUN_FILE))
        storage.write_bytes(os.path.join(model_dir, RUN_FILE), data)
    with open(os.path.join(model_dir, METRICS_JSON), encoding="utf-8") as handle:
        return json.load(handle)


def env_pairs(environ: Mapping[str, str], names: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``(name, value)`` of the variables in ``names`` that ``environ`` sets."""
    return tuple((name, environ[name]) for name in names if environ.get(name))
