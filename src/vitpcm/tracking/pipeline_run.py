"""One MLflow run for a whole pipeline run, logged after the fact from its step outputs.

The Kubeflow pipeline's register step calls :func:`log_pipeline_run` with the folders
the earlier steps wrote: training (``model.keras``, ``config.yaml``, ``metrics.json``,
``history.json``), evaluation (``metrics.json``, ``confusion_matrix.npy``) and test
inference (``metrics.json`` with the CRF scores, ``pseudo_masks/``, ``pseudo_masks_crf/``).
From them it logs the same run a :class:`RunTracker` around training would have: curves
per epoch, final metrics and plots per split, sample overlays (when the TFRecords are at
hand for the images and ground truth), the model, its registration and the champion gate.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from vitpcm.errors import TrackingError
from vitpcm.tracking.spool import Spool
from vitpcm.tracking.tracker import RunTracker

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
            able to replay it (default: a temporary folder, lost with the pod).
        num_samples: how many overlay samples.

    Returns:
        ``run_id``, ``experiment``, ``model_name``, ``version``, ``promoted``,
        ``champion_comparison``, ``miou``, ``split``, ``pending`` (records not sent) and
        ``spool_dir``.

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
    history = _optional_json(model_path, "history.json") or []
    train_metrics = _optional_json(model_path, "metrics.json") or {}
    eval_metrics = _optional_json(eval_dir, "metrics.json")
    test_metrics = _optional_json(test_dir, "metrics.json")

    with RunTracker(
        cfg,
        Path(spool_dir).parent,
        spool_dir=spool_dir,
        tracking_uri=tracking_uri,
        experiment=experiment,
        kfp_run_id=kfp_run_id,
        kfp_ui_url=kfp_ui_url,
    ) as tracker:
        for index, logs in enumerate(history):
            tracker.epoch_callback(int(logs.get("epoch", index)), logs)
        tracker.log_metrics(
            {k: train_metrics.get(k) for k in ("best_epoch", "epochs_run") if k in train_metrics}
        )
        gate_metrics = eval_metrics or train_metrics
        gate_split = str(gate_metrics.get("split") or cfg.data.val_split)
        if eval_metrics:
            matrix = None
            matrix_path = Path(eval_dir) / "confusion_matrix.npy"
            if matrix_path.is_file():
                import numpy as np

                matrix = np.load(matrix_path)
            tracker.log_results(eval_metrics, gate_split, confusion_matrix=matrix)
        elif train_metrics:
            tracker.log_results(train_metrics, gate_split)
        if test_metrics and test_metrics.get("miou") is not None:
            test_split = str(test_metrics.get("split") or cfg.data.test_split)
            samples = []
            if data_dir and test_dir:
                samples = overlay_samples(data_dir, test_split, test_dir, num_samples)
            tracker.log_results(test_metrics, test_split, samples=samples)
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
    }
