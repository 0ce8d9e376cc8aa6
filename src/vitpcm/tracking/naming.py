"""How ViT-PCM runs are named in MLflow: experiments, params, metric keys, links.

Params are the resolved config flattened to dotted keys (``train.lr``), with YAML-style
values (``null``, ``true``). Final metrics are ``<name>_<split>`` (``miou_val``,
``miou_crf_train``, ``iou_<class>_val``) so per-epoch curves from the training loop
(``val_miou``, ``loss``...) never share a key with them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from vitpcm.config import Config

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
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
    metrics: Mapping[str, Any], split: str, class_names: Sequence[str] | None = None
) -> dict[str, float]:
    """Flat MLflow metrics from a ``metrics.json``-style dict of one split.

    Keys are ``<name>_<split>``: ``miou_val`` (BPM), ``miou_crf_val``,
    ``pixel_accuracy_val``, ``mean_accuracy_val``, ``frequency_weighted_iou_val``,
    ``iou_<class>_val`` per class and ``iou_crf_<class>_val`` after CRF. Undefined values
    (a class absent from ground truth and prediction) are left out.
    """
    names = class_names or metrics.get("class_names")
    out: dict[str, float] = {}
    for name in _SCALAR_METRICS:
        value = finite_number(metrics.get(name))
        if value is not None:
            out[metric_key(f"{name}_{split}")] = value
    for source, stem in (("class_iou", "iou"), ("class_iou_crf", "iou_crf")):
        values = metrics.get(source) or []
        for index, raw in enumerate(values):
            value = finite_number(raw)
            if value is None:
                continue
            label = names[index] if names and index < len(names) else str(index)
            out[metric_key(f"{stem}_{label}_{split}")] = value
    return out
