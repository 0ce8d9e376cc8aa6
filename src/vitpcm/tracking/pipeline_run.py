"""One MLflow run for a whole pipeline run, completed from its step outputs.

The Kubeflow pipeline's register step calls :func:`log_pipeline_run` with the folders
the earlier steps wrote: training (``model.keras``, ``config.yaml``, ``metrics.json``,
``history.json``, and ``mlflow-spool/`` + ``mlflow_run.json`` when it was tracked live),
evaluation (``metrics.json``, ``confusion_matrix.npy``) and test inference
(``metrics.json`` with the CRF scores, ``pseudo_masks/``, ``pseudo_masks_crf/``).

When the training logged live (:mod:`vitpcm.tracking.training`), its run is continued:
its spool is copied into this step's spool folder (records MLflow has not acknowledged
yet, from an outage during training, are sent first) and the epoch curves, params and
training summary are not logged again. Otherwise the run is created here, with the
curves from ``history.json``. Either way it gets the final metrics and plots per split,
sample overlays (when the TFRecords are at hand for the images and ground truth), the
model, its registration and the champion gate.
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

from vitpcm.errors import TrackingError
from vitpcm.tracking.sender import same_tracking_uri
from vitpcm.tracking.spool import META_FILE, SPOOL_DIRNAME, Spool
from vitpcm.tracking.tracker import RunTracker
from vitpcm.tracking.training import RUN_FILE, training_summary

log = logging.getLogger("vitpcm.tracking")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrackingError(f"cannot read {path}: {exc}; is it a finished step's output?") from exc


def _optional_json(folder: str | os.PathLike[str] | None, name: str) -> Any:
    if not folder:
        return None
    path = Path(folder) / name
    return _read_json(path) if path.is_file() else None


def _adopt_training_spool(
    model_path: Path, spool_dir: Path, tracking_uri: str
) -> tuple[bool, str | None]:
    """Make ``spool_dir`` continue the training's spool; returns (continued, experiment).

    Not continued (the run is created here) when the training was not tracked, or its run
    lives on another MLflow server.

    Raises:
        TrackingError: ``spool_dir`` already holds another spool or other files.
    """
    source = model_path / SPOOL_DIRNAME
    if not (source / META_FILE).is_file():
        return False, None
    trained = Spool(source)
    state = trained.load_state()
    if state.run_id and not same_tracking_uri(state.tracking_uri, tracking_uri):
        log.warning(
            "the training logged to MLflow run %s on %s, not %s: logging a new run here",
            state.run_id,
            state.tracking_uri,
            tracking_uri,
        )
        return False, None
    starts = [r for r in trained.records() if r.kind == "start_run"]
    experiment = starts[0].data.get("experiment") if starts else None
    if (spool_dir / META_FILE).is_file():
        if Spool(spool_dir).spool_id != trained.spool_id:
            raise TrackingError(
                f"{spool_dir} holds another MLflow spool than the training's {source}; "
                "pass an empty spool_dir"
            )
        return True, experiment  # a retried step: this copy is the newer one
    if spool_dir.exists() and any(spool_dir.iterdir()):
        raise TrackingError(f"spool_dir {spool_dir} is not empty; pass an empty folder")
    staging = spool_dir.with_name(f".{spool_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns(".*"))
        if spool_dir.exists():
            spool_dir.rmdir()
        os.replace(staging, spool_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True, experiment


def _attached_run(model_path: Path, tracking_uri: str) -> tuple[str | None, str | None]:
    """(run id, experiment) of a tracked training whose spool is not at hand but whose
    ``mlflow_run.json`` says everything reached ``tracking_uri``."""
    info = _optional_json(model_path, RUN_FILE) or {}
    run_id = info.get("run_id")
    if not run_id or info.get("pending") or not info.get("tracking_uri"):
        return None, None
    if not same_tracking_uri(info["tracking_uri"], tracking_uri):
        return None, None
    return str(run_id), info.get("experiment")


def overlay_samples(
    data_dir: str | os.PathLike[str],
    split: str,
    test_dir: str | os.PathLike[str],
    count: int = 4,
) -> list[dict[str, Any]]:
    """The first ``count`` images of ``split`` with ground truth, BPM and CRF label maps.

    Images and ground truth come from the local TFRecords in ``data_dir``; the pseudo
    masks from ``test_dir/pseudo_masks`` and ``pseudo_masks_crf`` (matched by file stem).
    Only samples that have a BPM are returned.
    """
    import io

    import numpy as np
    import tensorflow as tf
    from PIL import Image

    from vitpcm.data import tfrecord
    from vitpcm.data.labels import decode_label_png
    from vitpcm.data.reader import read_split_info

    info = read_split_info(str(data_dir), split)
    test = Path(test_dir)
    samples: list[dict[str, Any]] = []
    for serialized in tf.data.TFRecordDataset(list(info.files)):
        if len(samples) >= count:
            break
        example = tfrecord.decode_example(serialized.numpy())
        name = example[tfrecord.IMAGE_FILENAME].decode("utf-8")
        stem = os.path.splitext(os.path.basename(name))[0]
        bpm_path = test / "pseudo_masks" / f"{stem}.png"
        if not bpm_path.is_file():
            continue
        image = np.asarray(Image.open(io.BytesIO(example[tfrecord.IMAGE_ENCODED])).convert("RGB"))
        sample: dict[str, Any] = {"name": stem, "image": image}
        sample["bpm"] = decode_label_png(bpm_path.read_bytes(), str(bpm_path))
        crf_path = test / "pseudo_masks_crf" / f"{stem}.png"
        if crf_path.is_file():
            sample["crf"] = decode_label_png(crf_path.read_bytes(), str(crf_path))
        if tfrecord.LABEL_ENCODED in example:
            sample["ground_truth"] = decode_label_png(example[tfrecord.LABEL_ENCODED], name)
        samples.append(sample)
    return samples


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
) -> dict[str, Any]:
    """Log a finished pipeline run to MLflow, register its model and gate the champion.

    Args:
        tracking_uri: the MLflow tracking URI.
        model_dir: the training output folder (local).
        eval_dir: the evaluation output folder; its mIoU gates the champion.
        test_dir: the test-inference output folder (scores before and after CRF).
        experiment: MLflow experiment (default: the config's, see ``default_experiment``).
        model_name: registered model (default: the config's ``mlflow.registered_model``).
        kfp_run_id: Kubeflow run id, tagged with a link when ``kfp_ui_url`` (or
            ``$KFP_UI_URL``) is known.
        kfp_ui_url: Kubeflow Pipelines UI base URL.
        data_dir: local TFRecord folder; with ``test_dir``, gives the sample overlays.
        spool_dir: where records wait while MLflow is down; put it in a step output to be
            able to replay it (default: a temporary folder, lost with the pod). It must be
            empty or missing, or hold this run's spool from an earlier attempt.
        num_samples: how many overlay samples.

    Returns:
        ``run_id``, ``experiment``, ``model_name``, ``version``, ``promoted``,
        ``champion_comparison``, ``miou``, ``split``, ``pending`` (records not sent),
        ``spool_dir`` and ``continued`` (whether the training's own run was continued).

    Raises:
        TrackingError: an input folder is missing its files.
    """
    from vitpcm.config import load_config
    from vitpcm.eval import load_model

    model_path = Path(model_dir)
    config_path = model_path / "config.yaml"
    if not config_path.is_file():
        raise TrackingError(f"{model_path} has no config.yaml; pass a `vitpcm train` output")
    cfg = load_config(str(config_path))
    if model_name:
        cfg.mlflow.registered_model = model_name
    if spool_dir is None:
        spool_dir = Path(tempfile.gettempdir()) / "vitpcm-mlflow" / (kfp_run_id or uuid.uuid4().hex)
    spool_dir = Path(spool_dir)
    continued, run_experiment = _adopt_training_spool(model_path, spool_dir, tracking_uri)
    attach_run_id = None
    if not continued:
        attach_run_id, run_experiment = _attached_run(model_path, tracking_uri)
    # The training already logged its curves, params and summary to the run being continued.
    from_training = continued or attach_run_id is not None
    history = _optional_json(model_path, "history.json") or []
    train_metrics = _optional_json(model_path, "metrics.json") or {}
    eval_metrics = _optional_json(eval_dir, "metrics.json")
    test_metrics = _optional_json(test_dir, "metrics.json")

    with RunTracker(
        cfg,
        spool_dir.parent,
        spool_dir=spool_dir,
        tracking_uri=tracking_uri,
        experiment=run_experiment or experiment,
        run_id=attach_run_id,
        kfp_run_id=kfp_run_id,
        kfp_ui_url=kfp_ui_url,
        log_config=not from_training,
    ) as tracker:
        if not from_training:
            for index, logs in enumerate(history):
                tracker.epoch_callback(int(logs.get("epoch", index + 1)), logs)
            tracker.log_metrics(training_summary(train_metrics))
        gate_metrics = eval_metrics or train_metrics
        gate_split = str(gate_metrics.get("split") or cfg.data.val_split)
        # split -> (metrics, confusion matrix, overlay samples), logged once per split.
        results: dict[str, tuple[dict[str, Any], Any, list[dict[str, Any]]]] = {}
        if eval_metrics:
            matrix = None
            matrix_path = Path(eval_dir) / "confusion_matrix.npy"
            if matrix_path.is_file():
                import numpy as np

                matrix = np.load(matrix_path)
            results[gate_split] = (eval_metrics, matrix, [])
        elif train_metrics:
            results[gate_split] = (train_metrics, None, [])
        if test_metrics and test_metrics.get("miou") is not None:
            test_split = str(test_metrics.get("split") or cfg.data.test_split)
            samples = []
            if data_dir and test_dir:
                samples = overlay_samples(data_dir, test_split, test_dir, num_samples)
            # Inference on the evaluated split (synthetic's test split is val) adds its CRF
            # scores to the evaluation's; the BPM scores are logged once, the evaluation's.
            metrics, matrix, _ = results.get(test_split, ({}, None, []))
            results[test_split] = ({**test_metrics, **metrics}, matrix, samples)
        for split, (metrics, matrix, samples) in results.items():
            tracker.log_results(metrics, split, confusion_matrix=matrix, samples=samples)
        miou = gate_metrics.get("miou")
        logged = tracker.log_model(
            load_model(str(model_path)),
            miou=None if miou is None else float(miou),
            split=gate_split,
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
