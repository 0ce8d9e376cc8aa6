"""What the pipeline asks of the Kubernetes cluster: Secrets, GPU scheduling, pod sizes.

The names here must match ``manifests/`` (the Secret templates and RBAC). Secrets are read
into environment variables by the pods that need them, never passed as pipeline parameters,
so no credential appears in the Kubeflow UI or the run's recorded inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

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
MLFLOW_SECRET = "vitpcm-mlflow"
MLFLOW_SECRET_KEYS: tuple[str, ...] = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
DEFAULT_MLFLOW_URI = "http://mlflow.kubeflow-user-example-com.svc.cluster.local:5000"

# GPU nodes: the resource name and node label of the NVIDIA GPU operator / device plugin, and
# the taint GPU node pools commonly carry so that CPU-only pods stay off them.
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_SELECTOR: dict[str, str] = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS: tuple[dict[str, str], ...] = (
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
)


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
    # Input pipeline (decode, jitter, second views) runs on the CPU next to the GPU.
    "train": PodSize("8", "32Gi", "16", "64Gi"),
    # Launcher only: the TFJob workers get the GPUs.
    "tfjob": PodSize("500m", "1Gi", "1", "2Gi"),
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
