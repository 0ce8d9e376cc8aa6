"""Live MLflow tracking of ``vitpcm train``: the training creates the run and logs each epoch.

When a tracking URI is configured (``mlflow.tracking_uri`` or ``$MLFLOW_TRACKING_URI``),
:func:`vitpcm.train.train` opens a :class:`TrainingTracker` on the chief worker: a
:class:`~vitpcm.tracking.RunTracker` whose spool lives in the output folder
(``<out>/mlflow-spool``), so each epoch's curves reach MLflow as the epoch ends and an
outage only delays them (the next epoch, the end of the run or ``vitpcm mlflow replay
<out>`` sends them). At the end it logs the training summary (:func:`training_summary`)
and writes :data:`RUN_FILE` next to ``metrics.json`` (run id, experiment, tracking URI,
records still pending). The pipeline's register step
(:func:`~vitpcm.tracking.log_pipeline_run`) continues that run from the same spool: one
pipeline run is one MLflow run, and no epoch is sent twice.

A resumed training reopens the same run (the spool remembers it) and first logs the
epochs of its history that the spool lacks (a kill between the epoch's checkpoint and its
record). Every epoch carries the time it ended, and MLflow keeps one point per (key, step,
timestamp, value), so an epoch that reaches it twice still shows once.

Outputs on object storage (``s3://``): the spool needs a local disk, so it lives in
:func:`local_spool_dir` and is mirrored to ``<out>/mlflow-spool`` after every epoch; a
job restarted on another machine fetches the mirror back before going on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vitpcm import storage
from vitpcm.config import Config
from vitpcm.tracking.naming import curve_key, finite_number
from vitpcm.tracking.spool import META_FILE, SPOOL_DIRNAME, Spool
from vitpcm.tracking.tracker import RunTracker

log = logging.getLogger("vitpcm.tracking")

RUN_FILE = "mlflow_run.json"
# Every epoch logs the loss: its steps in the spool say which epochs the spool holds.
_EPOCH_MARKER = curve_key("loss")
# ``metrics.json`` key -> MLflow metric of the training summary: the selected (best) epoch,
# so the run table shows the model that was kept, not the last epoch's curve value.
_SUMMARY = {
    "best_epoch": "best/epoch",
    "epochs_run": "best/epochs_run",
    "miou": "best/val_miou",
    "train_miou": "best/train_miou",
}
# Training outputs logged as run artifacts when the training ends.
HISTORY_FILE = "history.json"
TENSORBOARD_DIR = "tensorboard"


def training_summary(result: Mapping[str, Any]) -> dict[str, float]:
    """A finished training's summary metrics: best epoch (from 1), epochs run, its mIoUs."""
    values = {metric: finite_number(result.get(key)) for key, metric in _SUMMARY.items()}
    return {metric: value for metric, value in values.items() if value is not None}


def log_training_files(tracker: RunTracker, out_uri: str) -> None:
    """Log ``history.json`` and the TensorBoard event files of a training output folder.

    The TensorBoard logs go under the artifact folder ``tensorboard/`` (download it and run
    ``tensorboard --logdir`` on it); missing files are skipped.
    """
    with tempfile.TemporaryDirectory() as tmp:
        history = storage.join(out_uri, HISTORY_FILE)
        if storage.exists(history):
            local = Path(tmp) / HISTORY_FILE
            local.write_bytes(storage.read_bytes(history))
            tracker.log_artifact(local, move=True)
        board = storage.join(out_uri, TENSORBOARD_DIR)
        files = _remote_files(board) if storage.exists(board) else []
        if files:
            target = Path(tmp) / TENSORBOARD_DIR
            for rel in files:
                dest = target.joinpath(*rel.split("/"))
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(storage.read_bytes(storage.join(board, rel)))
            tracker.log_artifact(target, move=True)


def local_spool_dir(out_uri: str | os.PathLike[str]) -> Path:
    """Where the MLflow spool of the training writing to ``out_uri`` lives.

    Inside the output folder when it is local; for ``s3://`` outputs a folder of this
    machine's temporary directory named after the URI (mirrored to ``<out>/mlflow-spool``).
    """
    text = storage.local_path(out_uri).rstrip("/")
    if not storage.is_remote(text):
        return Path(text) / SPOOL_DIRNAME
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "vitpcm-mlflow" / digest / SPOOL_DIRNAME


def export_tracking(out_uri: str, dest_dir: str | os.PathLike[str]) -> bool:
    """Copy a training's spool and :data:`RUN_FILE` into ``dest_dir`` (a pipeline artifact).

    For a training whose outputs went elsewhere (``s3://`` checkpoints) and are copied into
    the step's output folder, so that the register step finds the run to continue.

    Returns:
        Whether the training was tracked (there was a spool to copy).
    """
    spool = local_spool_dir(out_uri)
    if not (spool / META_FILE).is_file():
        return False
    dest = Path(dest_dir)
    shutil.copytree(
        spool, dest / SPOOL_DIRNAME, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*")
    )
    run_file = storage.join(out_uri, RUN_FILE)
    if storage.exists(run_file):
        storage.write_bytes(str(dest / RUN_FILE), storage.read_bytes(run_file))
    return True


def _remote_files(root: str) -> list[str]:
    """Paths (relative, ``/``-separated) of the files under a local or ``s3://`` folder."""
    import tensorflow as tf

    if storage.is_s3(root):
        storage.ensure_s3_filesystem()
    found = []
    for dirpath, _dirs, files in tf.io.gfile.walk(root):
        for name in files:
            full = posixpath.join(str(dirpath).rstrip("/"), name)
            found.append(posixpath.relpath(full, root.rstrip("/")))
    return sorted(found)


class TrainingTracker:
    """The MLflow run of one training output folder, logged live by the chief worker.

    Never stops the training: MLflow outages are the :class:`RunTracker`'s business
    (records wait in the spool), and any other tracking failure costs a warning.

    Args:
        cfg: the resolved config.
        out_uri: the training output folder (local or ``s3://``).
        tracking_uri: the MLflow tracking URI.
        spool_dir: the local spool (default :func:`local_spool_dir`); one outside
            ``<out_uri>/mlflow-spool`` is mirrored there.
        retry_interval_s: after a failed send, wait this long before trying again.
    """

    def __init__(
        self,
        cfg: Config,
        out_uri: str,
        tracking_uri: str,
        *,
        spool_dir: str | os.PathLike[str] | None = None,
        retry_interval_s: float = 60.0,
    ) -> None:
        self.cfg = cfg
        self.out_uri = storage.local_path(out_uri).rstrip("/")
        self.tracking_uri = tracking_uri
        self.spool_dir = Path(spool_dir) if spool_dir else local_spool_dir(self.out_uri)
        self.mirror_uri: str | None = storage.join(self.out_uri, SPOOL_DIRNAME)
        if not storage.is_remote(self.out_uri) and (
            Path(self.mirror_uri).resolve() == self.spool_dir.resolve()
        ):
            self.mirror_uri = None
        self.retry_interval_s = retry_interval_s
        self.tracker: RunTracker | None = None
        self.run_info: dict[str, Any] | None = None
        self._mirrored: dict[str, tuple[int, int]] = {}
        self._warned = False
        # When the last epoch ended: the summary's timestamp, so a finished training run
        # again (a no-op) logs the same points, which MLflow keeps once.
        self._last_epoch_ms: float | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, history: Sequence[Mapping[str, Any]] = ()) -> None:
        """Open (or reopen) the run and log the epochs of ``history`` the spool lacks."""
        try:
            if self.mirror_uri:
                self._fetch_mirror(fresh=not history)
            tracker = RunTracker(
                self.cfg,
                self.out_uri,
                tracking_uri=self.tracking_uri,
                spool_dir=self.spool_dir,
                retry_interval_s=self.retry_interval_s,
            )
            tracker.start()
            self.tracker = tracker
            logged = self._logged_epochs()
            missing = [e for e in history if int(e.get("epoch", 0)) not in logged]
            if missing:
                log.info("logging %d epoch(s) the MLflow spool missed", len(missing))
            for entry in missing:
                tracker.epoch_callback(int(entry.get("epoch", 0)), entry)
            if history:
                self._last_epoch_ms = finite_number(history[-1].get("timestamp"))
        except Exception as exc:  # tracking must never stop the training
            self._warn("cannot open the MLflow run", exc)
        self._mirror()

    def __call__(self, epoch: int, logs: Mapping[str, Any]) -> None:
        """Log one epoch's curves (``epoch`` counted from 1) and mirror the spool."""
        if self.tracker is None:
            return
        self._last_epoch_ms = finite_number(logs.get("timestamp"))
        try:
            self.tracker.epoch_callback(epoch, logs)
        except Exception as exc:
            self._warn(f"cannot record epoch {epoch} for MLflow", exc)
        self._mirror()

    def finish(self, result: Mapping[str, Any]) -> dict[str, Any] | None:
        """Log the training summary, end the run and write :data:`RUN_FILE`.

        Returns:
            What :data:`RUN_FILE` holds (``None`` when the run could not be opened).
        """
        tracker, self.tracker = self.tracker, None
        if tracker is None:
            return None
        try:
            stamp = None if self._last_epoch_ms is None else int(self._last_epoch_ms)
            tracker.log_metrics(training_summary(result), timestamp=stamp)
            log_training_files(tracker, self.out_uri)
            tracker.finish("FINISHED")
            spool = Spool(self.spool_dir)
            state = spool.load_state()
            info = {
                "run_id": state.run_id,
                "experiment_id": state.experiment_id,
                "experiment": tracker.experiment,
                "tracking_uri": state.tracking_uri or self.tracking_uri,
                "spool": SPOOL_DIRNAME,
                "spool_id": spool.spool_id,
                "pending": len(spool.pending()),
            }
            text = json.dumps(info, indent=2, sort_keys=True) + "\n"
            storage.write_bytes(storage.join(self.out_uri, RUN_FILE), text.encode("utf-8"))
            self.run_info = info
        except Exception as exc:
            self._warn("cannot finish the MLflow run", exc)
        self._mirror()
        return self.run_info

    def close(self, status: str) -> None:
        """End the run early (``FAILED``, ``KILLED``); a resumed training reopens it."""
        tracker, self.tracker = self.tracker, None
        if tracker is None:
            return
        try:
            tracker.finish(status)
        except Exception as exc:
            self._warn("cannot close the MLflow run", exc)
        self._mirror()

    # -- helpers --------------------------------------------------------------------------

    def _warn(self, what: str, exc: BaseException) -> None:
        log.warning("%s (%s: %s); training goes on", what, type(exc).__name__, exc)

    def _logged_epochs(self) -> set[int]:
        epochs: set[int] = set()
        for record in Spool(self.spool_dir).records():
            if record.kind == "metrics":
                entries = record.data.get("metrics", [])
                epochs.update(int(m["step"]) for m in entries if m["key"] == _EPOCH_MARKER)
        return epochs

    def _mirror(self) -> None:
        """Copy what changed in the spool to ``<out>/mlflow-spool`` (files first, then the
        journal and state, so the mirror never names a file it lacks)."""
        if not self.mirror_uri or not self.spool_dir.is_dir():
            return
        try:
            paths = [p for p in self.spool_dir.rglob("*") if p.is_file()]
            ordered = sorted(
                (p.relative_to(self.spool_dir) for p in paths),
                key=lambda rel: (rel.parts[0] != "files", rel.as_posix()),
            )
            for rel in ordered:
                if any(part.startswith(".") for part in rel.parts):  # locks, temporary files
                    continue
                path = self.spool_dir / rel
                stat = path.stat()
                stamp = (stat.st_size, stat.st_mtime_ns)
                if self._mirrored.get(rel.as_posix()) == stamp:
                    continue
                storage.write_bytes(storage.join(self.mirror_uri, *rel.parts), path.read_bytes())
                self._mirrored[rel.as_posix()] = stamp
        except Exception as exc:
            if not self._warned:
                self._warn(f"cannot mirror the MLflow spool to {self.mirror_uri}", exc)
            self._warned = True

    def _fetch_mirror(self, fresh: bool) -> None:
        """Take the mirror as the local spool unless this machine holds the same spool.

        Args:
            fresh: the training starts from scratch (no epoch done yet).
        """
        assert self.mirror_uri is not None
        remote_meta = storage.join(self.mirror_uri, META_FILE)
        if not storage.exists(remote_meta):
            if fresh and self.spool_dir.exists():
                # A new training at this URI: a spool an earlier job left here is not its own.
                shutil.rmtree(self.spool_dir)
            return
        remote_id = json.loads(storage.read_bytes(remote_meta)).get("spool_id")
        if (self.spool_dir / META_FILE).is_file() and Spool(self.spool_dir).spool_id == remote_id:
            return  # this machine's copy is the same spool and at least as new
        staging = self.spool_dir.with_name(f".{self.spool_dir.name}.fetch-{uuid.uuid4().hex[:8]}")
        try:
            for rel in _remote_files(self.mirror_uri):
                data = storage.read_bytes(storage.join(self.mirror_uri, rel))
                target = staging.joinpath(*rel.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            if self.spool_dir.exists():
                shutil.rmtree(self.spool_dir)
            self.spool_dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, self.spool_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("MLflow spool fetched from %s", self.mirror_uri)
