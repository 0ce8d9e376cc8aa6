"""Point the cluster's KServe ``InferenceService`` at the MLflow champion.

Runtime: a custom predictor container (our CPU image) running ``mlflow models serve`` on
the registered model, i.e. the pyfunc of :mod:`vitpcm.serving` that the tests serve for real.
KServe's built-in MLflow format goes through the MLServer runtime, whose stock image has
neither TensorFlow 2.17 / Keras 3 nor pydensecrf, so it cannot load a ViT-PCM model; our
image has exactly the pins the model was trained with. The container reads the model from
the MLflow registry by version (``models:/NAME/VERSION``, artifacts proxied by the server),
so a new champion is a new revision of the same service, rolled out by KServe.

:func:`deploy_champion` is the pipeline's optional ``deploy`` step: it changes the service
only when the register step promoted a new champion, and never touches an object it does
not find or that points elsewhere than it says.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from vitpcm.errors import VitpcmError

log = logging.getLogger(__name__)

GROUP = "serving.kserve.io"
VERSION = "v1beta1"
PLURAL = "inferenceservices"
CONTAINER = "kserve-container"
PORT = 8080
MLFLOW_SECRET = "vitpcm-mlflow"


class DeployError(VitpcmError):
    """The InferenceService could not be created or updated."""


def inference_service(
    name: str, namespace: str, model_uri: str, image: str, tracking_uri: str
) -> dict[str, Any]:
    """The InferenceService serving ``model_uri`` (``models:/NAME/VERSION``) from ``image``.

    ``manifests/serving/inferenceservice.yaml`` is the same object for ``kubectl apply``.
    """
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "vitpcm", "app.kubernetes.io/name": name},
        },
        "spec": {
            "predictor": {
                "minReplicas": 1,
                "maxReplicas": 2,
                "containers": [
                    {
                        "name": CONTAINER,
                        "image": image,
                        "command": ["mlflow", "models", "serve"],
                        "args": [
                            "-m",
                            model_uri,
                            "--env-manager",
                            "local",
                            "-h",
                            "0.0.0.0",
                            "-p",
                            str(PORT),
                            "-w",
                            "1",
                        ],  # fmt: skip
                        "env": [{"name": "MLFLOW_TRACKING_URI", "value": tracking_uri}],
                        "envFrom": [{"secretRef": {"name": MLFLOW_SECRET}}],
                        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
                        "readinessProbe": {
                            "httpGet": {"path": "/ping", "port": PORT},
                            "initialDelaySeconds": 20,
                            "periodSeconds": 10,
                        },
                        "resources": {
                            "requests": {"cpu": "2", "memory": "6Gi"},
                            "limits": {"memory": "12Gi"},
                        },
                    }
                ],
            }
        },
    }


def served_model(service: Mapping[str, Any]) -> str | None:
    """The ``-m`` argument of an InferenceService's predictor container, if it has one."""
    for container in service.get("spec", {}).get("predictor", {}).get("containers", []):
        args = list(container.get("args", []))
        if container.get("name") == CONTAINER and "-m" in args[:-1]:
            return str(args[args.index("-m") + 1])
    return None


def _status(exc: Any) -> int | None:
    return getattr(exc, "status", None)


def deploy_champion(
    registration: Mapping[str, Any] | None,
    *,
    api: Any,
    name: str,
    namespace: str,
    image: str,
    tracking_uri: str,
) -> dict[str, Any]:
    """Create or update the InferenceService for a newly promoted champion.

    Args:
        registration: the register step's MLflow outcome (``model_name``, ``version``,
            ``promoted``); ``None`` when nothing was registered.
        api: a ``kubernetes.client.CustomObjectsApi``.
        name: the InferenceService.
        namespace: its namespace (the pipeline's profile namespace).
        image: the predictor image (the pipeline's CPU image).
        tracking_uri: the MLflow server the predictor reads the model from.

    Returns:
        ``{"action": "skipped" | "created" | "updated" | "unchanged", "model_uri", "reason"}``.

    Raises:
        DeployError: the API refused the object (message from the server).
    """
    if not registration or not registration.get("version"):
        return {"action": "skipped", "model_uri": None, "reason": "no model was registered"}
    model_uri = f"models:/{registration['model_name']}/{registration['version']}"
    if registration.get("promoted") is not True:
        reason = f"v{registration['version']} did not become champion: the service is left as is"
        return {"action": "skipped", "model_uri": model_uri, "reason": reason}
    desired = inference_service(name, namespace, model_uri, image, tracking_uri)
    from kubernetes.client.exceptions import ApiException

    try:
        current = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        if _status(exc) != 404:
            raise DeployError(
                f"cannot read InferenceService {namespace}/{name}: {exc.reason}"
            ) from exc
        current = None
    try:
        if current is None:
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, desired)
            action = "created"
        elif served_model(current) == model_uri:
            action = "unchanged"
        else:
            desired["metadata"]["resourceVersion"] = current["metadata"].get("resourceVersion")
            api.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, desired)
            action = "updated"
    except ApiException as exc:
        raise DeployError(
            f"the cluster refused InferenceService {namespace}/{name} ({_status(exc)}): "
            f"{exc.body or exc.reason}; check that KServe is installed and the pipeline's "
            "service account may manage inferenceservices (manifests/serving/)"
        ) from exc
    log.info("InferenceService %s/%s %s: %s", namespace, name, action, model_uri)
    return {"action": action, "model_uri": model_uri, "reason": f"champion {model_uri}"}
