"""Multi-worker training as a Kubeflow Trainer v2 ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``).

The TrainJob refers to the ``TrainingRuntime`` shipped in ``manifests/trainer/``
(:data:`RUNTIME_NAME`), which holds everything about the pods that does not change from run
to run: the Istio opt-out, the Secrets as environment, the GPU toleration, the port, the
downward-API variables and the entry point ``python -m vitpcm.tf_config --``, which builds
``TF_CONFIG`` from the pod's JobSet identity (:mod:`vitpcm.tf_config` documents the
derivation) and then runs the TrainJob's ``args`` (``vitpcm train ...``).

The TrainJob itself uses only fields every Trainer v2 release has (v2.0 to v2.3):
``runtimeRef`` and ``trainer`` (``image``, ``args``, ``env``, ``numNodes``,
``resourcesPerNode``). Pod-level overrides changed between releases (``podSpecOverrides``,
``podTemplateOverrides``, ``runtimePatches``) and are not used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from components.launchers import kube
from components.launchers.workers import WorkerSpec

RUNTIME_NAME = "vitpcm-tf-multiworker"
RUNTIME_PLURAL = "trainingruntimes"
# Trainer v2 names the trainer's replicated Job and its container "node".
NODE = "node"


def _state(job: Mapping[str, Any]) -> tuple[str, str]:
    state, message = kube.last_true_condition(job)
    return ("Succeeded" if state == "Complete" else state), message


def _worker0_selector(name: str) -> str:
    # JobSet labels (jobset.sigs.k8s.io) and the Indexed Job's pod index label.
    return (
        f"jobset.sigs.k8s.io/jobset-name={name},"
        f"jobset.sigs.k8s.io/replicatedjob-name={NODE},"
        "batch.kubernetes.io/job-completion-index=0"
    )


TRAINJOB = kube.JobKind(
    group="trainer.kubeflow.org",
    version="v1alpha1",
    plural="trainjobs",
    kind="TrainJob",
    install_hint=(
        "install Kubeflow Trainer v2 (it brings JobSet), or use distributed=tfjob on a "
        "cluster with the Training Operator v1, or distributed=none"
    ),
    state=_state,
    worker0_selector=_worker0_selector,
    container=NODE,
)


def trainjob_manifest(
    *,
    name: str,
    namespace: str,
    spec: WorkerSpec,
    runtime: str = RUNTIME_NAME,
    labels: Mapping[str, str] | None = None,
    owner: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The TrainJob custom resource.

    ``VITPCM_NUM_WORKERS`` tells each pod how many workers there are (``numNodes``), the one
    fact of :mod:`vitpcm.tf_config`'s derivation that no pod label carries.
    """
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {**kube.LABELS, **(labels or {})},
    }
    if owner:
        metadata["ownerReferences"] = [dict(owner)]
    env = [*spec.env_list(), {"name": "VITPCM_NUM_WORKERS", "value": str(spec.workers)}]
    return {
        "apiVersion": TRAINJOB.api_version,
        "kind": TRAINJOB.kind,
        "metadata": metadata,
        "spec": {
            "runtimeRef": {
                "apiGroup": TRAINJOB.group,
                "kind": "TrainingRuntime",
                "name": runtime,
            },
            "trainer": {
                "image": spec.image,
                # The runtime's command (the TF_CONFIG entry point) runs these.
                "args": list(spec.command),
                "env": env,
                "numNodes": spec.workers,
                "resourcesPerNode": spec.resources(),
            },
        },
    }


def check_runtime(api: Any, namespace: str, runtime: str = RUNTIME_NAME) -> None:
    """Make sure Trainer v2 is installed and the shipped TrainingRuntime is in ``namespace``.

    Raises:
        LaunchError: Trainer v2 is missing, or the runtime is not applied.
    """
    from kubernetes.client.exceptions import ApiException

    try:
        api.get_namespaced_custom_object(
            TRAINJOB.group, TRAINJOB.version, namespace, RUNTIME_PLURAL, runtime
        )
    except ApiException as exc:
        if kube.unknown_resource(exc):
            raise kube.LaunchError(
                f"the TrainJob resource ({TRAINJOB.api_version}) is unknown to this cluster: "
                f"{TRAINJOB.install_hint}"
            ) from exc
        if exc.status == 404:
            raise kube.LaunchError(
                f"TrainingRuntime {namespace}/{runtime} does not exist: apply it with "
                f"`kubectl apply -k manifests/trainer -n {namespace}`"
            ) from exc
        if exc.status == 403:
            raise kube.LaunchError(
                f"not allowed to read trainingruntimes.{TRAINJOB.group} in {namespace}: run "
                "the pipeline as the ServiceAccount of manifests/rbac.yaml (vitpcm-pipeline)"
            ) from exc
        raise kube.LaunchError(f"cannot read TrainingRuntime {runtime}: {exc.reason}") from exc


def run_trainjob(
    *,
    name: str,
    spec: WorkerSpec,
    labels: Mapping[str, str] | None = None,
    runtime: str = RUNTIME_NAME,
    timeout_s: float = 72 * 3600.0,
    poll_s: float = 30.0,
    apis: tuple[Any, Any] | None = None,
    namespace: str | None = None,
) -> None:
    """Run the workers as a TrainJob and wait for it (see :func:`kube.run_job`).

    Raises:
        LaunchError: Trainer v2 or the runtime is missing, or the job could not be created,
            failed, timed out or was terminated.
    """
    api, core = apis if apis is not None else kube.kubernetes_apis()
    namespace = namespace or kube.current_namespace()
    check_runtime(api, namespace, runtime)
    manifest = trainjob_manifest(
        name=name,
        namespace=namespace,
        spec=spec,
        runtime=runtime,
        labels=labels,
        owner=kube.owner_reference(),
    )
    kube.run_job(api, core, TRAINJOB, manifest, timeout_s=timeout_s, poll_s=poll_s)
