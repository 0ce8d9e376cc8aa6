"""``vitpcm train``: the ViT-PCM training schedule as a resumable custom loop.

Schedule (METHOD.md, "Schedule"): ``train.warmup_epochs`` with the backbone frozen (only the
HV-BiLSTM and the patch classifier learn, Adam ``warmup_lr``), then the final LayerNorm and
the last ``train.unfreeze_blocks`` encoder blocks are unfrozen with a fresh Adam at
``train.lr`` for ``train.epochs`` more epochs. Loss = BCE + ET + L2 (weights in
``train.loss_weights``). Validation mIoU is measured on *every* validation sample at the
label's original resolution (the paper's test protocol, not the reference code's 384-px
shortcut); the best epoch is kept; early stopping after ``train.patience`` epochs without
improvement. The training mIoU (``train_miou``) is the same measure on a fixed subset of
the training split (``eval.train_miou_images``). Epochs are numbered from 1 wherever a
person sees them (logs, ``history.json``, ``best_epoch``, MLflow steps).

MLflow: with a tracking URI (``mlflow.tracking_uri`` or ``$MLFLOW_TRACKING_URI``) the chief
worker logs every epoch live to one MLflow run (:mod:`vitpcm.tracking.training`); an
outage never stops the training (records wait in ``<out>/mlflow-spool``).

Resumability: after every epoch the model, both optimizers, the dropout RNG state and the
loop state are checkpointed under ``<out>/checkpoints``; a run started again with the same
``--out`` continues from the last completed epoch. Each epoch's data order is seeded by
``(train.seed, epoch)``, so a resumed run ends in the same state as an uninterrupted one.
``state.json`` names its checkpoint relative to ``<out>``, so a run resumes from any working
directory (or after the folder moved). A run started again with a config that differs from
its ``config.yaml`` is refused, naming the differing keys, unless ``force_config``
(``--force-config``) is given; the old config is then kept as ``config.<n>.yaml``.

Output ownership: ``<out>`` must be new, empty or a ``vitpcm train`` output
(:func:`vitpcm.outputs.claim_output`). A start that fails before its first checkpoint
removes what it wrote, so no half-made run folder is left; a TensorFlow error reaches the
user as one line (:class:`TrainingError`), its traceback in the debug log.

Outputs (``<out>``, local or ``s3://``): ``config.yaml`` (resolved config), ``model.keras``
(best epoch), ``history.json``, ``tensorboard/``, ``checkpoints/`` and, written last,
``metrics.json`` (validation metrics of the best epoch plus ``best_epoch``); tracked runs
add ``mlflow-spool/`` and ``mlflow_run.json``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from vitpcm import events, outputs, storage
from vitpcm.config import Config, save_config
from vitpcm.distribute import make_strategy, worker_role
from vitpcm.errors import ConfigError, DataError
from vitpcm.run_files import CONFIG_FILE, HISTORY_JSON, METRICS_JSON, MODEL_FILE
from vitpcm.run_folder import (
    TrainingError,  # noqa: F401  (raised from here; part of this module's API)
    check_same_config,
    is_tf_error,
    one_line_error,
    remove_failed_start,
)
from vitpcm.training_loop import TrainingLoop, model_signature, phase_at, schedule

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]

KIND = "train"


def train(
    cfg: Config,
    *,
    data_uri: str | None = None,
    out_uri: str | None = None,
    progress: bool = True,
    callbacks: Sequence[EpochCallback] = (),
    stop_after_epochs: int | None = None,
    tracking: bool = True,
    force_config: bool = False,
) -> dict[str, Any]:
    """Train ViT-PCM and return the final metrics (also written to ``<out>/metrics.json``).

    Args:
        cfg: the resolved config.
        data_uri: TFRecord folder (or ``s3://``); defaults to ``cfg.data.uri``.
        out_uri: output folder (or ``s3://``); a folder with a checkpoint is resumed.
        progress: show a progress bar per epoch.
        callbacks: called as ``cb(epoch, logs)`` after every epoch, ``epoch`` counted from 1.
        stop_after_epochs: end this call after this many epochs (testing resumption).
        tracking: log live to MLflow when a tracking URI is configured (chief worker only);
            ``False`` when the caller tracks the run itself.
        force_config: continue a run in ``out_uri`` whose ``config.yaml`` differs from
            ``cfg`` (the old one is kept as ``config.<n>.yaml``); the keys that shape the
            checkpoint (model dimensions, class count) can never change.

    Returns:
        ``metrics.json``'s content (``best_epoch`` counted from 1), plus ``mlflow`` (what
        ``mlflow_run.json`` holds) when tracked; ``{"finished": False, "next_epoch": N}``
        when ``stop_after_epochs`` ended the call first.

    Raises:
        OutputError: ``out_uri`` is not new, empty or a ``vitpcm train`` output.
        ConfigError: ``out_uri`` holds a run with another config (without ``force_config``).
        TrainingError: TensorFlow stopped the training (one line; nothing half-made is left
            when it stopped before the first checkpoint).
    """
    data_uri = data_uri or cfg.data.uri
    if not data_uri:
        raise ConfigError("no training data: pass --data URI or set data.uri in the config")
    if not out_uri:
        raise ConfigError("no output folder: pass --out DIR_OR_S3_URI")
    out_uri = storage.local_path(out_uri).rstrip("/")
    if storage.is_s3(out_uri):
        storage.check_s3_config(out_uri)
        storage.ensure_s3_filesystem()  # checkpoints and TensorBoard go through tensorflow-io
    chief = worker_role().is_chief
    # Other workers of the same job write only under <out>/replicas.
    resuming = outputs.claim_output(out_uri, KIND, inputs={"--data": data_uri}, allow=("replicas",))
    if chief and resuming:
        check_same_config(out_uri, cfg, force_config)
    created = not storage.exists(out_uri)
    if chief:
        outputs.write_marker(out_uri, KIND)
    tracker = _training_tracker(cfg, out_uri) if tracking else None
    try:
        result = _train(
            cfg,
            data_uri=data_uri,
            out_uri=out_uri,
            progress=progress,
            callbacks=callbacks,
            stop_after_epochs=stop_after_epochs,
            tracker=tracker,
            force_config=force_config,
        )
    except BaseException as exc:
        if tracker is not None:
            tracker.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        if chief and not resuming:
            remove_failed_start(out_uri, created)
        if is_tf_error(exc):
            raise one_line_error(exc, data_uri, out_uri) from None
        raise
    if tracker is not None:
        if result.get("finished"):
            if tracker.run_info is not None:
                result["mlflow"] = tracker.run_info
        else:
            tracker.close("KILLED")  # stopped before the end; a resumed run reopens it
    return result


def _training_tracker(cfg: Config, out_uri: str | None) -> Any:
    """The live MLflow tracker of this training, or None (no tracking URI, not the chief)."""
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or not out_uri or not worker_role().is_chief:
        return None
    # Imported only here: an untracked training never loads the tracking code.
    from vitpcm.tracking.training import TrainingTracker

    return TrainingTracker(cfg, out_uri, uri)


def _train_miou_dataset(cfg: Config, data_uri: str) -> Any:
    """The first ``eval.train_miou_images`` training images, read for evaluation, or None.

    None when the count is 0 or the split has no masks. The batch size divides the count,
    so exactly that many images are scored (fewer when the split is smaller).
    """
    from vitpcm.data.reader import dataset_from_config, read_split_info, split_has_masks

    count = cfg.eval.train_miou_images
    split = cfg.data.train_split
    if count <= 0:
        return None
    if not split_has_masks(read_split_info(data_uri, split)):
        log.info("no training mIoU: split %r has no masks", split)
        return None
    batch = max(d for d in range(1, min(count, cfg.eval.batch_size) + 1) if count % d == 0)
    dataset = dataset_from_config(
        cfg, split, training=False, uri=data_uri, batch_size=batch, with_label=True
    )
    return dataset.take(count // batch)


def _train(
    cfg: Config,
    *,
    data_uri: str,
    out_uri: str,
    progress: bool,
    callbacks: Sequence[EpochCallback],
    stop_after_epochs: int | None,
    tracker: Any,
    force_config: bool = False,
) -> dict[str, Any]:
    """:func:`train` without the MLflow run's opening and closing (``tracker``: or None)."""
    import numpy as np
    import tensorflow as tf

    from vitpcm.data.manifest import read_dataset_info
    from vitpcm.data.reader import dataset_from_config
    from vitpcm.eval import evaluate_model

    assert data_uri and out_uri  # checked by train()
    info = read_dataset_info(data_uri)
    num_classes = int(info["num_classes"])
    if num_classes != cfg.data.num_classes:
        raise ConfigError(
            f"data.num_classes is {cfg.data.num_classes} but {data_uri} has {num_classes} "
            f"classes; set --set data.num_classes={num_classes} or use the matching config"
        )
    for split in (cfg.data.train_split, cfg.data.val_split):
        if split not in info["splits"]:
            raise DataError(
                f"{data_uri} has no split {split!r} (it has {sorted(info['splits'])}); "
                "set data.train_split / data.val_split"
            )

    role = worker_role()
    own_out = out_uri if role.is_chief else storage.join(out_uri, "replicas", role.replica_dir_name)
    storage.makedirs(own_out)

    tf.config.experimental.enable_op_determinism()
    import keras

    keras.utils.set_random_seed(cfg.train.seed)
    if cfg.train.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")

    strategy = make_strategy(role)
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.train.batch_size * replicas
    num_train = int(info["splits"][cfg.data.train_split]["num_examples"])
    steps = cfg.train.steps_per_epoch or num_train // global_batch
    if steps < 1:
        raise DataError(
            f"split {cfg.data.train_split!r} of {data_uri} has {num_train} images, fewer than "
            f"one global batch ({global_batch} = {cfg.train.batch_size} x {replicas} replicas); "
            "lower train.batch_size or add data"
        )
    log.info(
        "training on %d replica(s) (%s), global batch %d, %d steps/epoch",
        replicas,
        type(strategy).__name__,
        global_batch,
        steps,
    )

    loop = TrainingLoop(cfg, strategy, num_classes, global_batch)
    # Every worker resumes from the chief's last checkpoint (the replicas' weights are equal
    # after each step): a preemption between the chief's and another worker's checkpoint
    # write must not restart the workers one epoch apart.
    signature = model_signature(cfg, num_classes)
    state = loop.restore_or_start(own_out, signature, force_config, resume_from=out_uri)
    if role.is_chief:
        save_config(cfg, storage.join(out_uri, CONFIG_FILE))

    val_ds = dataset_from_config(
        cfg,
        cfg.data.val_split,
        training=False,
        uri=data_uri,
        batch_size=cfg.eval.batch_size,
        with_label=True,
    )
    train_eval_ds = _train_miou_dataset(cfg, data_uri)
    writer = tf.summary.create_file_writer(storage.join(own_out, "tensorboard"))
    phases = schedule(cfg)
    total_epochs = phases[-1].end_epoch
    stopped_early = False
    history = state.history or []
    if tracker is not None:
        tracker.start(history)

    for epochs_done_here, epoch in enumerate(range(state.next_epoch, total_epochs)):
        if state.epochs_since_best >= cfg.train.patience:
            stopped_early = True
            log.info("early stopping: no improvement for %d epochs", state.epochs_since_best)
            events.emit("early_stop", patience=state.epochs_since_best)
            break
        if stop_after_epochs is not None and epochs_done_here >= stop_after_epochs:
            break
        phase = phase_at(phases, epoch)
        loop.enter_phase(phase)
        train_ds = dataset_from_config(
            cfg,
            cfg.data.train_split,
            training=True,
            uri=data_uri,
            batch_size=global_batch,
            seed=cfg.train.seed * 100_003 + epoch,
        )
        started = time.monotonic()
        logs = loop.run_epoch(train_ds, steps, epoch, total_epochs, progress)
        logs["train_seconds"] = time.monotonic() - started
        metrics, _ = evaluate_model(
            loop.model, val_ds, num_classes, class_names=info.get("class_names"), progress=False
        )
        if train_eval_ds is not None:
            subset, _ = evaluate_model(loop.model, train_eval_ds, num_classes, progress=False)
            # Kept with the best epoch's metrics too, so metrics.json reports it.
            logs["train_miou"] = metrics["train_miou"] = subset["miou"]
        logs.update(
            {
                "val_miou": metrics["miou"],
                "val_pixel_accuracy": metrics["pixel_accuracy"],
                "lr": phase.lr,
                "epoch": epoch + 1,
                # When the epoch ended (ms): a record sent again later keeps it (tracking).
                "timestamp": time.time() * 1000.0,
            }
        )
        improved = metrics["miou"] > state.best_miou
        if improved:
            state.best_miou, state.best_epoch, state.epochs_since_best = metrics["miou"], epoch, 0
            _save_model(loop.model, storage.join(own_out, MODEL_FILE))
            storage.write_bytes(
                storage.join(own_out, "best_metrics.json"), json.dumps(metrics).encode()
            )
        else:
            state.epochs_since_best += 1
        history.append({k: float(v) for k, v in logs.items()})
        state.history = history
        state.next_epoch = epoch + 1
        loop.checkpoint(own_out, state)
        with writer.as_default(step=epoch + 1):
            for key, value in logs.items():
                if key != "timestamp":
                    tf.summary.scalar(key, value)
        writer.flush()
        log.info(
            "epoch %d/%d %s: loss %.4f (bce %.4f et %.4f l2 %.4f) val mIoU %.4f%s%s",
            epoch + 1,
            total_epochs,
            phase.name,
            logs["loss"],
            logs["bce"],
            logs["et"],
            logs["l2"],
            metrics["miou"],
            f" train mIoU {logs['train_miou']:.4f}" if "train_miou" in logs else "",
            " *" if improved else "",
        )
        loss, miou = logs["loss"], metrics["miou"]
        events.emit("epoch", epoch=epoch + 1, epochs=total_epochs, loss=loss, val_miou=miou)
        for callback in callbacks:
            callback(epoch + 1, logs)
        if tracker is not None:
            tracker(epoch + 1, logs)

    finished = (
        state.next_epoch >= total_epochs
        or stopped_early
        or (state.epochs_since_best >= cfg.train.patience)
    )
    if not finished:
        return {"finished": False, "next_epoch": state.next_epoch}
    best = json.loads(storage.read_bytes(storage.join(own_out, "best_metrics.json")))
    result = {
        **best,
        "best_epoch": state.best_epoch + 1,  # LoopState counts from 0, people from 1
        "epochs_run": state.next_epoch,
        "stopped_early": bool(stopped_early),
        "split": cfg.data.val_split,
        "finished": True,
        "strategy": type(strategy).__name__,
        "replicas": replicas,
        "workers": role.num_workers,
        "weights_digest": _weights_digest(loop.model, np),
    }
    storage.write_bytes(storage.join(own_out, HISTORY_JSON), json.dumps(history, indent=2).encode())
    if tracker is not None:
        tracker.finish(result)  # before metrics.json, which is written last
    from vitpcm.metrics import write_metrics_json

    write_metrics_json(storage.join(own_out, METRICS_JSON), result)
    return result


def _weights_digest(model: Any, np: Any) -> str:
    """A short hash of the last-epoch weights: equal on every worker of a synchronous job."""
    import hashlib

    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()[:16]


def _save_model(model: Any, uri: str) -> None:
    """Save a ``.keras`` file to a local path or ``s3://`` (Keras writes local files only)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        model.save(path)
        with open(path, "rb") as handle:
            storage.write_bytes(uri, handle.read())
