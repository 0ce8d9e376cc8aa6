"""How ViT-PCM runs are named and described in MLflow.

Params are the resolved config flattened to dotted keys (``train.lr``) with YAML-style
values. Metric keys are grouped with ``/``, one section per group in the UI: ``train/`` and
``val/`` per-epoch curves (step = epoch, from 1), ``best/`` the kept epoch, ``eval/`` the
evaluation step on ``data.val_split``, ``test/`` test inference before (``test/miou``) and
after the CRF (``test/miou_crf``), ``class_iou/<class>`` and ``class_iou_crf/<class>``.
The split of each stage is a run tag (``eval.split``, ``test.split``).

The run page's description (:func:`run_description`, the ``mlflow.note.content`` tag)
names the method, dataset, config, splits, data, the image (``$VITPCM_IMAGE``), the git
commit (``$VITPCM_GIT_COMMIT``, else ``git``), the Kubeflow run and the results.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vitpcm.config import Config
from vitpcm.metrics import REPORTED_METRICS

NOTE_TAG = "mlflow.note.content"
# The MLflow 3 UI's page parameter for its model-training layout (not the GenAI one).
UI_WORKFLOW_QUERY = "workflowType=machine_learning"
_CURVE_KEYS = {"train_miou": "train/miou", "train_seconds": "train/epoch_seconds", "lr": "train/lr"}
_CONTEXTS = (("training", "train_split"), ("validation", "val_split"), ("test", "test_split"))


def default_experiment(cfg: Config) -> str:
    """``mlflow.experiment`` or ``vitpcm-<config name>``."""
    return cfg.mlflow.experiment or f"vitpcm-{cfg.name}"


def default_registered_model(cfg: Config) -> str:
    """``mlflow.registered_model`` or ``vitpcm-<dataset>``."""
    return cfg.mlflow.registered_model or f"vitpcm-{cfg.data.dataset}"


def kfp_run_url(ui_url: str, run_id: str) -> str:
    """A Kubeflow Pipelines run page: ``<ui_url>/#/runs/details/<id>``, or ``ui_url`` with
    ``{run_id}`` filled in."""
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
    """``loss`` -> ``train/loss``, ``val_miou`` -> ``val/miou``, ``lr`` -> ``train/lr``."""
    if name in _CURVE_KEYS:
        return _CURVE_KEYS[name]
    return metric_key(f"val/{name[4:]}" if name.startswith("val_") else f"train/{name}")


def metric_key(name: str) -> str:
    """A name MLflow accepts as a metric key (letters, digits, ``_ - . /``)."""
    return re.sub(r"[^A-Za-z0-9_\-./]+", "_", name.strip()).strip("_") or "unnamed"


def param_value(value: Any) -> str:
    """A config value as a param string, YAML-style (``null``, ``true``, ``0.0001``)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return str(value)


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dicts as ``{"train.lr": "0.0001", ...}``."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = param_value(value)
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
    """Flat metrics of one stage's ``metrics.json``: ``<stage>/miou``, ``<stage>/miou_crf``...
    and, with ``per_class``, ``class_iou/<class>`` and ``class_iou_crf/<class>``; undefined
    values (a class absent from ground truth and prediction) are left out."""
    names = class_names or metrics.get("class_names")
    out = {
        metric_key(f"{stage}/{name}"): finite_number(metrics.get(name)) for name in REPORTED_METRICS
    }
    if per_class:
        for key in ("class_iou", "class_iou_crf"):
            for index, raw in enumerate(metrics.get(key) or []):
                label = names[index] if names and index < len(names) else str(index)
                out[metric_key(f"{key}/{label}")] = finite_number(raw)
    return {key: value for key, value in out.items() if value is not None}


def git_commit() -> str | None:
    """``$VITPCM_GIT_COMMIT``, else the commit of the checkout the package runs from."""
    given = os.environ.get("VITPCM_GIT_COMMIT", "").strip()
    if given:
        return given
    try:
        done = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None


def source_tags(entry_point: str, kfp_run_id: str | None = None) -> dict[str, str]:
    """MLflow's source tags (the run table's Source column): what ran, how, the commit."""
    tags = {
        "mlflow.source.name": entry_point,
        "mlflow.source.type": "JOB" if kfp_run_id else "LOCAL",
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def run_description(
    cfg: Config,
    *,
    data_uri: str | None = None,
    kfp_link: tuple[str, str] | None = None,
    results: Mapping[str, Any] | None = None,
) -> str:
    """The run page's Markdown description; ``kfp_link`` is (Kubeflow run id, URL),
    ``results`` the headline figures (``test_miou``, ``test_miou_crf``, ``eval_miou``,
    ``best_epoch``, ``registered_model``, ``version``)."""
    data, model = cfg.data, cfg.model
    lines = [
        f"**ViT-PCM** weakly supervised segmentation on **{data.dataset}**, config "
        f"**{cfg.name}** (backbone {model.backbone}, {model.depth} blocks, "
        f"{data.image_size} px, pooling {model.pooling}).",
        "",
        f"- Splits: training `{data.train_split}`, model selection `{data.val_split}` "
        f"(curves under `val/`, the kept epoch under `best/`), test `{data.test_split}` "
        "(`test/`, before and after the CRF)",
    ]
    image, commit = os.environ.get("VITPCM_IMAGE", "").strip(), git_commit()
    for shown, line in (
        (data_uri or data.uri, f"- Data: `{data_uri or data.uri}`"),
        (image, f"- Image: `{image}`"),
        (commit, f"- Code: git commit `{(commit or '')[:12]}`"),
        (kfp_link, "- Kubeflow Pipelines run: [{}]({})".format(*(kfp_link or ("", "")))),
    ):
        if shown:
            lines.append(line)
    if results:
        res, parts = results, []
        if res.get("test_miou") is not None:
            crf = res.get("test_miou_crf")
            after = "" if crf is None else f" ({float(crf):.3f} after CRF)"
            parts.append(f"test BPM mIoU {float(res['test_miou']):.3f}{after}")
        if res.get("eval_miou") is not None:
            parts.append(f"selected model on model-selection split {float(res['eval_miou']):.3f}")
        if res.get("best_epoch") is not None:
            parts.append(f"best epoch {int(res['best_epoch'])}")
        if res.get("registered_model"):
            version = f" v{res['version']}" if res.get("version") else ""
            parts.append(f"registered as `{res['registered_model']}`{version}")
        lines.append("- Results: " + (", ".join(parts) or "pending"))
    return "\n".join(lines) + "\n"


def dataset_inputs(
    data_uri: str, cfg: Config, shown_uri: str | None = None
) -> list[dict[str, Any]]:
    """The run's dataset inputs (``inputs`` spool records): one per split the config uses,
    with its context (``training``, ``validation``, ``test``) and a digest of its
    ``dataset.json`` entry; empty when that cannot be read. ``shown_uri``: the source named."""
    from vitpcm.data.manifest import read_dataset_info
    from vitpcm.errors import DataError

    try:
        info = read_dataset_info(data_uri)
    except DataError:
        return []
    uri = str(shown_uri or data_uri).rstrip("/")
    inputs = []
    for context, key in _CONTEXTS:
        split = getattr(cfg.data, key)
        entry = info.get("splits", {}).get(split)
        if not isinstance(entry, Mapping):
            continue
        summary = {"dataset": cfg.data.dataset, "split": split, "entry": entry}
        profile = {key: entry.get(key) for key in ("num_examples", "has_masks")}
        inputs.append(
            {
                "name": f"{cfg.data.dataset}-{split}",
                "digest": hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()[
                    :12
                ],
                "source_type": "s3" if uri.startswith("s3://") else "local",
                "source": json.dumps({"uri": uri, "split": split}),
                "profile": json.dumps({**profile, "num_classes": info.get("num_classes")}),
                "context": context,
            }
        )
    return inputs
