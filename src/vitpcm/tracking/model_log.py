"""Logging the trained model of a :class:`~vitpcm.tracking.RunTracker` run: the Keras model
in MLflow's ``tensorflow`` flavor, its registered version and the ``champion`` gate, all
through the run's spool."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitpcm.tracking.model_files import save_mlflow_model
from vitpcm.tracking.naming import default_registered_model, flatten_params
from vitpcm.tracking.registry import ChampionDecision
from vitpcm.tracking.sender import decision_of

if TYPE_CHECKING:
    from vitpcm.tracking.tracker import RunTracker


@dataclass(frozen=True)
class ModelLogResult:
    """What :meth:`RunTracker.log_model` achieved (fields are ``None`` while pending).

    Attributes:
        pending: the model (or its registration) still waits in the spool.
        model_id: the MLflow logged-model id.
        model_name: the registered model name (``None``: not registered).
        version: the registered version.
        decision: the champion decision (``None``: pending or no gate).
    """

    pending: bool
    model_id: str | None
    model_name: str | None
    version: str | None
    decision: ChampionDecision | None


def log_model(
    tracker: RunTracker,
    model: Any,
    *,
    miou: float | None = None,
    split: str | None = None,
    register: bool = True,
    registered_model: str | None = None,
    promote: bool = True,
    name: str = "model",
    step: int = 0,
) -> ModelLogResult:
    """Log the trained Keras model, register it and gate it for ``champion``.

    The model is saved in MLflow's ``tensorflow`` flavor (Keras 3 ``.keras`` inside),
    with the ViT-PCM signature, pinned requirements and the ``vitpcm`` source as code,
    so ``mlflow.tensorflow.load_model("models:/<name>@champion")`` works without the
    package installed.

    Args:
        model: the ViT-PCM Keras model (dict outputs ``patch_probs``/``class_probs``).
        miou: its mIoU on ``split``, for the champion gate (``None``: register only).
        split: the split of ``miou`` (default ``data.val_split``).
        register: add a version to the registered model.
        registered_model: its name (default :func:`default_registered_model`).
        promote: run the champion gate (needs ``miou``).
        name: the logged model's name.
        step: the training step it belongs to.

    Returns:
        The ids, version and decision once sent; ``pending=True`` while MLflow is down.
    """
    spool = tracker._spool()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / name
        save_mlflow_model(model, model_dir, {"config": tracker.cfg.name}, config=tracker.cfg)
        params = flatten_params(tracker.cfg.to_dict())
        model_record = spool.append(
            "model",
            {"name": name, "step": int(step), "params": params, "tags": {}},
            files={"dir": model_dir},
            move=True,
        )
    model_name = None
    register_record = None
    if register:
        model_name = registered_model or default_registered_model(tracker.cfg)
        split = split or tracker.cfg.data.val_split
        register_record = spool.append(
            "register",
            {
                "model_record": model_record.id,
                "registered_model": model_name,
                "miou": None if miou is None else float(miou),
                "split": split,
                "gate": bool(promote and miou is not None),
                "tags": {
                    "dataset": tracker.cfg.data.dataset,
                    "backbone": tracker.cfg.model.backbone,
                },
            },
        )
    tracker.flush(force=True)
    state = spool.load_state()
    model_id = state.progress.get(model_record.id, {}).get("model_id")
    version = decision = None
    pending = state.acked < model_record.seq
    if register_record is not None:
        version = state.progress.get(register_record.id, {}).get("version")
        decision = decision_of(state, register_record.id)
        pending = state.acked < register_record.seq
    return ModelLogResult(pending, model_id, model_name, version, decision)
