"""Multi-worker training as a Training Operator v1 ``TFJob`` (``kubeflow.org/v1``).

For clusters that still run the Kubeflow Training Operator v1 (current Kubeflow ships
Trainer v2, see :mod:`components.launchers.trainjob`). The operator starts ``workers`` pods
and gives each a ``TF_CONFIG`` (``<job>-worker-<i>.<namespace>.svc:2222``); ``vitpcm train``
turns it into a MultiWorkerMirroredStrategy. Worker 0 is the chief: the job succeeds when
it does (the TFJob default success policy), and its log is streamed into the step's log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from components.launchers import kube
from components.launchers.workers import WorkerSpec

# The Training Operator requires this container name in TFJob replica templates.
CONTAINER_NAME = "tensorflow"


def _state(job: Mapping[str, Any]) -> tuple[str, str]:
    return kube.last_true_condition(job)  # Created, Running, Restarting, Succeeded, Failed


def _worker0_selector(name: str) -> str:
    # Labels the Training Operator puts on replica pods (kubeflow.org/v1 common_types.go).
    return (
        f"training.kubeflow.org/job-name={name},"
        "training.kubeflow.org/replica-type=worker,"
        "training.kubeflow.org/replica-index=0"
    )


TFJOB = kube.JobKind(
    group="kubeflow.org",
    version="v1",
    plural="tfjobs",
    kind="TFJob",
    install_hint=(
        "install the Kubeflow Training Operator v1, or use distributed=trainjob on a cluster "
        "with Kubeflow Trainer v2, or distributed=none"
    ),
    state=_state,
    worker0_selector=_worker0_selector,
    container=CONTAINER_NAME,
)


def tfjob_manifest(
    *,
    name: str,
    namespace: str,
    spec: WorkerSpec,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] = (),
    env_secrets: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
    owner: Mapping[str, str] | None = None,
    backoff_limit: int = 3,
) -> dict[str, Any]:
    """The TFJob custom resource.

    Args:
        name: Job name.
        namespace: Namespace to create it in.
        spec: Image, command, worker count, GPUs, CPU and memory of every worker.
        node_selector: Node labels the workers require when they have GPUs (the cluster's
            GPU placement): CPU-only workers (``spec.gpus == 0``) get none, so they neither
            wait for GPU nodes nor land on them.
        tolerations: Worker tolerations, likewise only for GPU workers.
        env_secrets: Secrets loaded as environment variables (``envFrom``); optional, so a
            missing MLflow Secret does not keep the pods from starting.
        labels: Extra labels of the job and its pods.
        owner: Owner reference of the job (the step's pod).
        backoff_limit: Pod restarts allowed before the job fails; a restarted worker
            resumes from the last checkpoint.
    """
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "command": list(spec.command),
        "env": spec.env_list(),
        "envFrom": [{"secretRef": {"name": s, "optional": True}} for s in env_secrets],
        "resources": spec.resources(),
    }
    pod_labels = {**kube.LABELS, **(labels or {})}
    pod_spec: dict[str, Any] = {"containers": [container]}
    if node_selector and spec.gpus > 0:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations and spec.gpus > 0:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": pod_labels}
    if owner:
        metadata["ownerReferences"] = [dict(owner)]
    return {
        "apiVersion": TFJOB.api_version,
        "kind": TFJOB.kind,
        "metadata": metadata,
        "spec": {
            # Pods still running when the job ends are removed; finished ones stay for logs.
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": backoff_limit},
            "tfReplicaSpecs": {
                "Worker": {
                    "replicas": spec.workers,
                    "restartPolicy": "OnFailure",
                    "template": {
                        "metadata": {
                            "labels": dict(pod_labels),
                            "annotations": dict(kube.ISTIO_OPT_OUT),
                        },
                        "spec": pod_spec,
                    },
                }
            },
        },
    }


def run_tfjob(
    *,
    name: str,
    spec: WorkerSpec,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] = (),
    env_secrets: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
    timeout_s: float = 72 * 3600.0,
    poll_s: float = 30.0,
    apis: tuple[Any, Any] | None = None,
    namespace: str | None = None,
) -> None:
    """Run the workers as a TFJob and wait for it (see :func:`kube.run_job`).

    Raises:
        LaunchError: The job could not be created, failed, timed out or was terminated.
    """
    api, core = apis if apis is not None else kube.kubernetes_apis()
    namespace = namespace or kube.current_namespace()
    manifest = tfjob_manifest(
        name=name,
        namespace=namespace,
        spec=spec,
        node_selector=node_selector,
        tolerations=tolerations,
        env_secrets=env_secrets,
        labels=labels,
        owner=kube.owner_reference(),
    )
    kube.run_job(api, core, TFJOB, manifest, timeout_s=timeout_s, poll_s=poll_s)
