"""How ViT-PCM runs are named in MLflow: experiments, params, metric keys, links.

Params are the resolved config flattened to dotted keys (``train.lr``), with YAML-style
values (``null``, ``true``). Metric keys are grouped with ``/``, so MLflow shows one section
per group (:func:`curve_key`, :func:`final_metrics`):

* ``train/...`` and ``val/...``: per-epoch curves (step = epoch, from 1);
* ``best/...``: the selected (best) epoch: ``best/val_miou``, ``best/epoch``...;
* ``eval/...``: the evaluation step (baseline pseudo masks of the selected model, on
  ``data.val_split``); ``test/...``: test inference on ``data.test_split``, before
  (``test/miou``) and after the CRF (``test/miou_crf``);
* ``class_iou/<class>`` and ``class_iou_crf/<class>``: per-class IoU of the test step.

The split each stage ran on is a run tag (``eval.split``, ``test.split``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from vitpcm.config import Config

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# What the MLflow 3 UI reads from a page URL to show the model-training layout rather than
# the GenAI one (its ``workflowType`` search parameter: ``genai`` or ``machine_learning``).
UI_WORKFLOW_QUERY = "workflowType=machine_learning"
# Per-epoch log keys of the training loop -> MLflow metric keys.
_CURVE_KEYS = {
    "train_miou": "train/miou",
    "train_seconds": "train/epoch_seconds",
    "lr": "train/lr",
}
_SCALAR_METRICS = (
    "miou",
    "miou_crf",
    "pixel_accuracy",
    "pixel_accuracy_crf",
    "mean_accuracy",
    "frequency_weighted_iou",
)


def default_experiment(cfg: Config) -> str:
    """``mlflow.experiment`` or ``vitpcm-<config name>``."""
    return cfg.mlflow.experiment or f"vitpcm-{cfg.name}"


def default_registered_model(cfg: Config) -> str:
    """``mlflow.registered_model`` or ``vitpcm-<dataset>``."""
    return cfg.mlflow.registered_model or f"vitpcm-{cfg.data.dataset}"


def resolve_tracking_uri(explicit: str | None, cfg: Config | None = None) -> str | None:
    """The tracking URI: the argument, then ``mlflow.tracking_uri``, then the environment."""
    return (
        explicit or (cfg.mlflow.tracking_uri if cfg else None) or os.environ.get(TRACKING_URI_ENV)
    )


def kfp_run_url(ui_url: str, run_id: str) -> str:
    """Link to a Kubeflow Pipelines run page.

    ``ui_url`` is the KFP UI base (``https://host/pipeline``), giving
    ``<base>/#/runs/details/<run id>``, or a template containing ``{run_id}``.
    """
    if "{run_id}" in ui_url:
        return ui_url.format(run_id=run_id)
    return f"{ui_url.rstrip('/')}/#/runs/details/{run_id}"


def ui_run_url(base: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI, in its model-training layout."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{UI_WORKFLOW_QUERY}"


def ui_experiment_url(base: str, experiment_id: str) -> str:
    """An experiment's runs in the MLflow UI, in its model-training layout."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{UI_WORKFLOW_QUERY}"


def curve_key(name: str) -> str:
    """The MLflow key of a per-epoch log key: ``loss`` -> ``train/loss``,
    ``val_miou`` -> ``val/miou``, ``train_miou`` -> ``train/miou``, ``lr`` -> ``train/lr``."""
    if name in _CURVE_KEYS:
        return _CURVE_KEYS[name]
    if name.startswith("val_"):
        return metric_key(f"val/{name[4:]}")
    return metric_key(f"train/{name}")


def metric_key(name: str) -> str:
    """A name MLflow accepts as a metric key (letters, digits, ``_ - . /``)."""
    return re.sub(r"[^A-Za-z0-9_\-./]+", "_", name.strip()).strip("_") or "unnamed"


def param_value(value: Any) -> str:
    """A config value as a param string, YAML-style (``null``, ``true``, ``0.0001``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dicts as ``{"train.lr": "0.0001", ...}``."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{dotted}."))
        else:
            flat[dotted] = param_value(value)
    return flat


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (missing, NaN, infinite, not a number)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def final_metrics(
    metrics: Mapping[str, Any],
    stage: str,
    class_names: Sequence[str] | None = None,
    per_class: bool = True,
) -> dict[str, float]:
    """Flat MLflow metrics from a ``metrics.json``-style dict of one stage.

    Keys are ``<stage>/<name>``: ``test/miou`` (BPM), ``test/miou_crf``,
    ``test/pixel_accuracy``, ``eval/miou``...; with ``per_class``, ``class_iou/<class>`` and
    ``class_iou_crf/<class>`` after CRF. Undefined values (a class absent from ground truth
    and prediction) are left out.

    Args:
        metrics: the stage's ``metrics.json``.
        stage: ``eval`` (evaluation step) or ``test`` (test inference), or any prefix.
        class_names: K names (default ``metrics["class_names"]``).
        per_class: also log the per-class IoU (one run logs it for one stage only).
    """
    names = class_names or metrics.get("class_names")
    out: dict[str, float] = {}
    for name in _SCALAR_METRICS:
        value = finite_number(metrics.get(name))
        if value is not None:
            out[metric_key(f"{stage}/{name}")] = value
    if not per_class:
        return out
    for source, stem in (("class_iou", "class_iou"), ("class_iou_crf", "class_iou_crf")):
        values = metrics.get(source) or []
        for index, raw in enumerate(values):
            value = finite_number(raw)
            if value is None:
                continue
            label = names[index] if names and index < len(names) else str(index)
            out[metric_key(f"{stem}/{label}")] = value
    return out
