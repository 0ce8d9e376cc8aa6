"""What the pipeline asks of the Kubernetes cluster: Secrets, GPU scheduling, pod sizes.

The names here must match ``manifests/`` (the Secret templates and RBAC). Secrets are read
into environment variables by the pods that need them, never passed as pipeline parameters,
so no credential appears in the Kubeflow UI or the run's recorded inputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

# The oldest Kubeflow Pipelines backend the compiled pipeline runs on (README's support
# matrix; tests/test_backend_compat.py checks the package against its field lists): kfp-kubernetes
# 1.5 writes `secretNameParameter`, which backends before 2.5 refuse as an unknown field.
KFP_BACKEND_FLOOR = "2.5.0"

# The ServiceAccount of manifests/rbac.yaml; `pipeline.submit` / `pipeline.schedule` run the
# pipeline's pods under it (KFP_SERVICE_ACCOUNT or --service-account changes it; an empty
# value leaves the profile's default-editor).
SERVICE_ACCOUNT = "vitpcm-pipeline"

# S3 / MinIO: checkpoints of resumable training, multi-worker training data and outputs, and
# MLflow artifacts. Each key of the Secret becomes the environment variable of the same name
# (tensorflow-io reads S3_ENDPOINT with its scheme, e.g. http://minio.vitpcm:9000).
S3_SECRET = "vitpcm-s3"
S3_SECRET_KEYS: tuple[str, ...] = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "S3_ENDPOINT",
)
# MLflow's boto3 client reads the endpoint under another name.
S3_ENDPOINT_FOR_MLFLOW = {"S3_ENDPOINT": "MLFLOW_S3_ENDPOINT_URL"}

# MLflow server credentials (basic auth; the keys may hold empty strings for an open server).
# Every step that talks to MLflow (train, register) gets them.
MLFLOW_SECRET = "vitpcm-mlflow"
MLFLOW_SECRET_KEYS: tuple[str, ...] = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# The Service of manifests/ by its short name: it resolves in the namespace the run's pods
# run in (the profile namespace manifests/ is applied to), whichever that is. The run form's
# mlflow_tracking_uri overrides it; VITPCM_MLFLOW_URI sets another default at compile time.
MLFLOW_URI_ENV = "VITPCM_MLFLOW_URI"
DEFAULT_MLFLOW_URI = os.environ.get(MLFLOW_URI_ENV, "").strip() or "http://mlflow:5000"

# GPU placement, set at compile time (`make compile-pipeline` with these variables):
#   VITPCM_GPU_RESOURCE        extended resource name of the GPUs (default nvidia.com/gpu)
#   VITPCM_GPU_NODE_SELECTOR   JSON object of node labels, e.g. '{"cloud.google.com/gke-
#                              accelerator": "nvidia-l4"}' (default none: the GPU request
#                              alone keeps the pod on nodes that have GPUs)
#   VITPCM_GPU_TOLERATIONS     JSON list of tolerations (default: the nvidia.com/gpu taint
#                              that GPU node pools commonly carry); '[]' for none
# None of them is applied when the run asks for gpus=0 (the gpu-placement step decides).
GPU_RESOURCE_ENV = "VITPCM_GPU_RESOURCE"
GPU_NODE_SELECTOR_ENV = "VITPCM_GPU_NODE_SELECTOR"
GPU_TOLERATIONS_ENV = "VITPCM_GPU_TOLERATIONS"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GPU_TOLERATIONS: tuple[dict[str, str], ...] = (
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
)
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


@dataclass(frozen=True)
class GpuPlacement:
    """Where a pod that asks for GPUs goes: resource name, node labels, tolerations."""

    resource: str = DEFAULT_GPU_RESOURCE
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, object]] = field(
        default_factory=lambda: [dict(t) for t in DEFAULT_GPU_TOLERATIONS]
    )


def _json_env(env: Mapping[str, str], name: str, kind: type) -> object:
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a JSON {kind.__name__}, got {text!r}")
    return value


def gpu_placement(environ: Mapping[str, str] | None = None) -> GpuPlacement:
    """The GPU placement settings from the environment (see the comment above).

    Raises:
        ValueError: A variable that is not the JSON it should be.
    """
    env = os.environ if environ is None else environ
    selector = _json_env(env, GPU_NODE_SELECTOR_ENV, dict)
    tolerations = _json_env(env, GPU_TOLERATIONS_ENV, list)
    placement = GpuPlacement(resource=env.get(GPU_RESOURCE_ENV, "").strip() or DEFAULT_GPU_RESOURCE)
    if selector is not None:
        if not all(isinstance(v, str) for v in selector.values()):
            raise ValueError(f"{GPU_NODE_SELECTOR_ENV}: label values must be strings")
        placement = GpuPlacement(placement.resource, selector, placement.tolerations)
    if tolerations is not None:
        for item in tolerations:
            if not isinstance(item, dict) or not set(item) <= _TOLERATION_KEYS:
                raise ValueError(
                    f"{GPU_TOLERATIONS_ENV}: each toleration is an object with keys from "
                    f"{sorted(_TOLERATION_KEYS)}, got {item!r}"
                )
        placement = GpuPlacement(placement.resource, placement.node_selector, tolerations)
    return placement


@dataclass(frozen=True)
class PodSize:
    """Requests and limits of one step's pod (Kubernetes quantity strings)."""

    cpu_request: str
    memory_request: str
    cpu_limit: str
    memory_limit: str


# Sized for PASCAL VOC (10.6k train images); COCO needs no more per pod, only more time.
POD_SIZES: dict[str, PodSize] = {
    # Network bound; unpacking the VOC tar and SBD zip needs little memory.
    "download": PodSize("1", "2Gi", "2", "4Gi"),
    # One process per core encodes shards (`workers` below keeps them equal).
    "convert": PodSize("4", "8Gi", "4", "16Gi"),
    # Input pipeline (decode, jitter, second views) runs on the CPU next to the GPU. Also
    # the size of every worker of a distributed job (requests and limits beside the GPUs).
    "train": PodSize("8", "32Gi", "16", "64Gi"),
    # Evaluation at original resolution, one image at a time after the batched forward pass.
    "evaluate": PodSize("4", "16Gi", "8", "32Gi"),
    # Dense CRF: one process per core over the 960 px test-size probabilities.
    "infer": PodSize("8", "16Gi", "8", "32Gi"),
    "register": PodSize("1", "4Gi", "2", "8Gi"),
}
# Worker processes of the CPU-parallel steps: a pod sees every core of its node in
# os.cpu_count(), so they are pinned to the pod's CPU limit instead of "all cores".
CONVERT_WORKERS = 4
CRF_WORKERS = 8

# Retries of the steps that talk to the network (mirrors, object store): exponential backoff.
DATA_RETRIES = 3
RETRY_BACKOFF = "60s"
RETRY_BACKOFF_FACTOR = 2.0
RETRY_BACKOFF_MAX = "1800s"
# Training is retried once: with a checkpoint root it resumes from its last epoch.
TRAIN_RETRIES = 1
