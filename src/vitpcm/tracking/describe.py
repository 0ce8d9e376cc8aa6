"""What a run page says about where a run came from: description, source and dataset inputs.

* :func:`run_description`: the Markdown shown at the top of the MLflow run page (the
  ``mlflow.note.content`` tag): method, dataset, config, the splits and what each is for,
  the data URI, the container image and git commit when known, the Kubeflow run link and,
  once known, the headline results.
* :func:`source_tags`: MLflow's own source tags (``mlflow.source.name``, ``.type``,
  ``.git.commit``), shown in the run table's Source column.
* :func:`dataset_inputs`: one dataset input per split used (training, validation, test),
  from the converted dataset's ``dataset.json``, for the run's Datasets panel.

The image comes from ``$VITPCM_IMAGE`` (the pipeline sets it on its steps); the commit from
``$VITPCM_GIT_COMMIT``, else from ``git`` when the package runs from a checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vitpcm.config import Config

IMAGE_ENV = "VITPCM_IMAGE"
COMMIT_ENV = "VITPCM_GIT_COMMIT"
NOTE_TAG = "mlflow.note.content"
_CONTEXTS = (("training", "train_split"), ("validation", "val_split"), ("test", "test_split"))


def git_commit() -> str | None:
    """The code's git commit: ``$VITPCM_GIT_COMMIT``, else ``git rev-parse HEAD`` of the
    checkout the package is imported from, else None."""
    given = os.environ.get(COMMIT_ENV, "").strip()
    if given:
        return given
    here = Path(__file__).resolve().parent
    try:
        done = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None


def run_image() -> str | None:
    """The container image the step runs in (``$VITPCM_IMAGE``), when known."""
    return os.environ.get(IMAGE_ENV, "").strip() or None


def source_tags(entry_point: str, kfp_run_id: str | None = None) -> dict[str, str]:
    """MLflow's source tags: what ran (``entry_point``), as a job or locally, and the commit."""
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
    """The run page's Markdown description.

    Args:
        cfg: the resolved config.
        data_uri: the TFRecords the run read.
        kfp_link: (Kubeflow run id, its URL).
        results: headline figures: ``test_miou``, ``test_miou_crf``, ``eval_miou``,
            ``best_epoch``, ``registered_model``, ``version``.
    """
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
    if data_uri or data.uri:
        lines.append(f"- Data: `{data_uri or data.uri}`")
    image, commit = run_image(), git_commit()
    if image:
        lines.append(f"- Image: `{image}`")
    if commit:
        lines.append(f"- Code: git commit `{commit[:12]}`")
    if kfp_link:
        lines.append(f"- Kubeflow Pipelines run: [{kfp_link[0]}]({kfp_link[1]})")
    if results:
        lines.append("- " + _results_line(results))
    return "\n".join(lines) + "\n"


def _results_line(results: Mapping[str, Any]) -> str:
    parts = []
    if results.get("test_miou") is not None:
        part = f"test BPM mIoU {float(results['test_miou']):.3f}"
        if results.get("test_miou_crf") is not None:
            part += f" ({float(results['test_miou_crf']):.3f} after CRF)"
        parts.append(part)
    if results.get("eval_miou") is not None:
        parts.append(f"selected model on model-selection split {float(results['eval_miou']):.3f}")
    if results.get("best_epoch") is not None:
        parts.append(f"best epoch {int(results['best_epoch'])}")
    if results.get("registered_model"):
        version = results.get("version")
        parts.append(
            f"registered as `{results['registered_model']}`" + (f" v{version}" if version else "")
        )
    return "Results: " + ", ".join(parts) if parts else "Results: pending"


def dataset_inputs(
    data_uri: str, cfg: Config, shown_uri: str | None = None
) -> list[dict[str, Any]]:
    """Dataset inputs of a run on the converted dataset in ``data_uri`` (spool records).

    One per split the config uses, with its context (``training``, ``validation``,
    ``test``); the digest identifies the split's contents as ``dataset.json`` lists them.
    Empty when ``dataset.json`` cannot be read. ``shown_uri`` is the source named (the
    ``s3://`` URI of a local copy).
    """
    from vitpcm.data.convert import read_dataset_info
    from vitpcm.errors import DataError

    try:
        info = read_dataset_info(data_uri)
    except DataError:
        return []
    uri = str(shown_uri or data_uri).rstrip("/")
    source_type = "s3" if uri.startswith("s3://") else "local"
    splits = info.get("splits", {})
    inputs = []
    for context, key in _CONTEXTS:
        split = getattr(cfg.data, key)
        entry = splits.get(split)
        if not isinstance(entry, Mapping):
            continue
        summary = {"dataset": cfg.data.dataset, "split": split, "entry": entry}
        digest = hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()[:12]
        profile = {
            "num_examples": entry.get("num_examples"),
            "num_classes": info.get("num_classes"),
            "has_masks": entry.get("has_masks"),
        }
        inputs.append(
            {
                "name": f"{cfg.data.dataset}-{split}",
                "digest": digest,
                "source_type": source_type,
                "source": json.dumps({"uri": uri, "split": split}),
                "profile": json.dumps(profile),
                "context": context,
            }
        )
    return inputs
