"""One MLflow run for a whole pipeline run, completed from its step outputs.

The register step calls :func:`log_pipeline_run` with the folders of the earlier steps:
training (``model.keras``, ``config.yaml``, ``metrics.json``, ``history.json``, and
:data:`~vitpcm.tracking.RUN_FILE` when it logged live), evaluation (``metrics.json``,
``confusion_matrix.npy``) and test inference (``metrics.json`` with the CRF scores,
``pseudo_masks/``, ``pseudo_masks_crf/``).

A training that logged live is continued: its spool is read where the training wrote it
(``<model>/mlflow-spool``, else the place ``mlflow_run.json`` names, e.g. under an ``s3://``
checkpoint prefix) into this step's spool, so records an outage held back are sent first
and nothing of the training twice. Otherwise the run is created here with the curves of
``history.json``. Either way it gets the dataset inputs, the evaluation's and the test's
results (``eval/``, ``test/``: confusion matrices, per-class chart, best and worst
overlays, a sample of the pseudo-mask PNGs), the model, its registration, the champion
gate and a description with the results.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from vitpcm import storage
from vitpcm.errors import TrackingError
from vitpcm.run_files import CONFIG_FILE, HISTORY_JSON, METRICS_JSON
from vitpcm.tracking.figures import mask_sample, score_pseudo_masks
from vitpcm.tracking.naming import dataset_inputs
from vitpcm.tracking.sender import same_uri
from vitpcm.tracking.spool import META_FILE, RUN_FILE, SPOOL_DIRNAME, Spool
from vitpcm.tracking.tracker import RunTracker
from vitpcm.tracking.training import download, log_training_files, training_summary

log = logging.getLogger("vitpcm.tracking")


def _optional_json(folder: str | os.PathLike[str] | None, name: str) -> Any:
    path = Path(folder or "", name)
    if not folder or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrackingError(f"cannot read {path}: {exc}; is it a finished step's output?") from exc


def _continue_training_spool(
    model_path: Path, spool_dir: Path, tracking_uri: str
) -> tuple[bool, str | None]:
    """Make ``spool_dir`` continue the training's spool; returns (continued, experiment).

    Not continued when the training was not tracked or its run is on another server.

    Raises:
        TrackingError: ``spool_dir`` already holds another spool or other files.
    """
    source = str(model_path / SPOOL_DIRNAME)
    if not (model_path / SPOOL_DIRNAME / META_FILE).is_file():
        source = (_optional_json(model_path, RUN_FILE) or {}).get("spool") or ""
        if not source or not storage.exists(storage.join(source, META_FILE)):
            return False, None
    spool_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spool_dir.name}-", dir=spool_dir.parent))
    try:
        download(source, staging)
        trained = Spool(staging)
        state = trained.load_state()
        if state.run_id and not same_uri(state.tracking_uri, tracking_uri):
            log.warning(
                "the training logged to MLflow run %s on %s, not %s: logging a new run here",
                state.run_id, state.tracking_uri, tracking_uri,
            )  # fmt: skip
            return False, None
        starts = [r for r in trained.records() if r.kind == "start_run"]
        experiment = starts[0].data.get("experiment") if starts else None
        if (spool_dir / META_FILE).is_file():
            if Spool(spool_dir).spool_id != trained.spool_id:
                raise TrackingError(
                    f"{spool_dir} holds another MLflow spool than the training's {source}; "
                    "pass an empty spool_dir"
                )
            return True, experiment  # a retried step: its own copy is the newer one
        if spool_dir.exists() and any(spool_dir.iterdir()):
            raise TrackingError(f"spool_dir {spool_dir} is not empty; pass an empty folder")
        if spool_dir.exists():
            spool_dir.rmdir()
        os.replace(staging, spool_dir)
        return True, experiment
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def log_pipeline_run(
    *,
    tracking_uri: str,
    model_dir: str | os.PathLike[str],
    eval_dir: str | os.PathLike[str] | None = None,
    test_dir: str | os.PathLike[str] | None = None,
    experiment: str | None = None,
    model_name: str | None = None,
    kfp_run_id: str | None = None,
    kfp_ui_url: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    spool_dir: str | os.PathLike[str] | None = None,
    num_samples: int = 4,
    data_uri: str | None = None,
    pseudo_masks_uri: str | None = None,
) -> dict[str, Any]:
    """Log a finished pipeline run to MLflow, register its model and gate the champion.

    Args:
        tracking_uri: the MLflow tracking URI.
        model_dir: the training output folder (local).
        eval_dir: the evaluation output folder; its mIoU gates the champion.
        test_dir: the test-inference output folder (scores before and after CRF).
        experiment: MLflow experiment of a new run (default: the config's).
        model_name: registered model (default: the config's).
        kfp_run_id: Kubeflow run id, tagged with a link when ``kfp_ui_url`` (or
            ``$KFP_UI_URL``) is known.
        kfp_ui_url: Kubeflow Pipelines UI base URL.
        data_dir: TFRecord folder: the dataset inputs and, with ``test_dir``, the
            confusion matrices and the best/worst overlays.
        spool_dir: where records wait while MLflow is down (a step output, to replay it;
            default: a temporary folder): empty, missing, or this run's from an earlier try.
        num_samples: how many best and how many worst images to overlay.
        data_uri: where the TFRecords live for the user (default ``data_dir``).
        pseudo_masks_uri: where all the pseudo-mask PNGs live (default ``test_dir``),
            tagged ``pseudo_masks.uri``; a sample of them is logged.

    Returns:
        ``run_id``, ``experiment``, ``model_name``, ``version``, ``promoted``,
        ``champion_comparison``, ``miou``, ``split``, ``pending`` (records not sent),
        ``spool_dir`` and ``continued`` (whether the training's own run was continued).
    """
    from vitpcm.config import load_config
    from vitpcm.eval import load_model

    model_path = Path(model_dir)
    config_path = model_path / CONFIG_FILE
    if not config_path.is_file():
        raise TrackingError(f"{model_path} has no config.yaml; pass a `vitpcm train` output")
    cfg = load_config(str(config_path))
    if model_name:
        cfg.mlflow.registered_model = model_name
    if spool_dir is None:
        spool_dir = Path(tempfile.gettempdir()) / "vitpcm-mlflow" / (kfp_run_id or uuid.uuid4().hex)
    spool_dir = Path(spool_dir)
    # A continued run has the training's curves, params and summary already.
    from_training, run_experiment = _continue_training_spool(model_path, spool_dir, tracking_uri)
    history = _optional_json(model_path, HISTORY_JSON) or []
    train_metrics = _optional_json(model_path, METRICS_JSON) or {}
    eval_metrics = _optional_json(eval_dir, METRICS_JSON)
    test_metrics = _optional_json(test_dir, METRICS_JSON)

    data_shown = data_uri or (str(data_dir) if data_dir else None)
    with RunTracker(
        cfg,
        spool_dir.parent,
        spool_dir=spool_dir,
        tracking_uri=tracking_uri,
        experiment=run_experiment or experiment,
        kfp_run_id=kfp_run_id,
        kfp_ui_url=kfp_ui_url,
        log_config=not from_training,
        source="vitpcm pipeline",
        data_uri=data_shown,
    ) as tracker:
        if not from_training:
            for index, logs in enumerate(history):
                tracker.epoch_callback(int(logs.get("epoch", index + 1)), logs)
            tracker.log_metrics(training_summary(train_metrics))
            log_training_files(tracker, str(model_path))
        if data_dir:
            tracker.log_inputs(dataset_inputs(str(data_dir), cfg, shown_uri=data_shown))
        gate_metrics = eval_metrics or train_metrics
        gate_split = str(gate_metrics.get("split") or cfg.data.val_split)
        has_test = bool(test_metrics and test_metrics.get("miou") is not None)
        if eval_metrics:
            matrix = None
            matrix_path = Path(eval_dir) / "confusion_matrix.npy"
            if matrix_path.is_file():
                import numpy as np

                matrix = np.load(matrix_path)
            tracker.log_results(
                eval_metrics, gate_split, stage="eval", per_class=not has_test,
                confusion_matrix=matrix,
            )  # fmt: skip
        if has_test:
            _log_test(tracker, cfg, test_metrics, data_dir, test_dir, num_samples)
            tracker.set_tags({"pseudo_masks.uri": pseudo_masks_uri or str(test_dir)})
        miou = gate_metrics.get("miou")
        logged = tracker.log_model(
            load_model(str(model_path)),
            miou=None if miou is None else float(miou),
            split=gate_split,
        )
        tracker.describe(
            {
                "test_miou": (test_metrics or {}).get("miou"),
                "test_miou_crf": (test_metrics or {}).get("miou_crf"),
                "eval_miou": (eval_metrics or {}).get("miou"),
                "best_epoch": train_metrics.get("best_epoch"),
                "registered_model": logged.model_name,
                "version": logged.version,
            }
        )
        run_id = tracker.run_id
    pending = len(Spool(spool_dir).pending())
    if pending:
        log.warning("%d MLflow record(s) of this pipeline run wait in %s", pending, spool_dir)
    decision = logged.decision
    return {
        "run_id": run_id,
        "experiment": tracker.experiment,
        "model_name": logged.model_name,
        "version": logged.version,
        "promoted": None if decision is None else decision.promoted,
        "champion_comparison": None if decision is None else decision.comparison,
        "miou": miou,
        "split": gate_split,
        "pending": pending,
        "spool_dir": str(spool_dir),
        "continued": from_training,
    }


def _log_test(
    tracker: RunTracker,
    cfg: Any,
    metrics: dict[str, Any],
    data_dir: str | os.PathLike[str] | None,
    test_dir: str | os.PathLike[str] | None,
    count: int,
) -> None:
    """The test step's results: metrics, confusion matrices before and after the CRF, the
    per-class chart, the best and worst overlays and a sample of the pseudo-mask PNGs."""
    split = str(metrics.get("split") or cfg.data.test_split)
    figures: dict[str, Any] = {}
    if data_dir and test_dir:
        scores = score_pseudo_masks(data_dir, split, test_dir, cfg.data.num_classes, count)
        if scores is not None:
            figures = {
                "confusion_matrix": scores.confusion_bpm,
                "confusion_matrix_crf": scores.confusion_crf,
                "best": scores.best,
                "worst": scores.worst,
            }
    tracker.log_results(metrics, split, stage="test", **figures)
    if test_dir:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "pseudo_masks_sample"
            for rel in mask_sample(test_dir):
                target = folder / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(test_dir) / rel, target)
            if folder.is_dir():
                tracker.log_artifact(folder, "test", move=True)
