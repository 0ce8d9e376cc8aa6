"""Deploy step: point the KServe InferenceService at a newly promoted champion.

Always in the DAG, and a no-op unless the run form's ``deploy`` flag is on (no branch in
the pipeline, like the train step that launches a distributed job only when asked).

``vitpcm.serving_deploy.deploy_champion`` does the work from the register step's summary:
nothing happens unless that run's model became the champion; then the service is created,
or replaced to serve ``models:/NAME/VERSION`` (KServe rolls out a new revision). The pod's
service account needs ``manifests/serving/rbac.yaml``.
"""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from kfp import dsl
from kfp.dsl import Artifact, Input

from components.images import cpu_image


@dsl.component(base_image=cpu_image(), install_kfp_package=False)
def deploy_model(
    summary: Input[Artifact],
    tracking_uri: str,
    image: str,
    enabled: bool = False,
    service_name: str = "vitpcm",
) -> str:
    """Create or update the InferenceService for the new champion; returns what it did.

    Args:
        summary: the register step's JSON summary (its ``mlflow`` entry: model name,
            version, promoted).
        tracking_uri: the MLflow server the predictor reads the model from.
        image: the predictor image (the pipeline's CPU image).
        enabled: the run form's ``deploy`` flag; off, the step only says so.
        service_name: the InferenceService, in the pipeline's namespace.
    """
    import json
    import logging

    from components.launchers.kube import current_namespace, kubernetes_apis
    from vitpcm.serving_deploy import deploy_champion

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not enabled:
        logging.info("deploy: off (tick `deploy` in the run form to serve new champions)")
        return "off"
    with open(summary.path, encoding="utf-8") as handle:
        registration = json.load(handle).get("mlflow")
    custom, _core = kubernetes_apis()
    outcome = deploy_champion(
        registration,
        api=custom,
        name=service_name,
        namespace=current_namespace(),
        image=image,
        tracking_uri=tracking_uri,
    )
    logging.info("deploy: %s (%s)", outcome["action"], outcome["reason"])
    return outcome["action"]
