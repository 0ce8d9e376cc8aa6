"""Live MLflow tracking of ``vitpcm train``: the training creates the run, logs each epoch.

With a tracking URI (``mlflow.tracking_uri`` or ``$MLFLOW_TRACKING_URI``),
:func:`vitpcm.train.train` opens a :class:`TrainingTracker` on the chief worker. Its spool
is ``<out>/mlflow-spool``, so each epoch reaches MLflow as it ends and an outage only
delays it (the next epoch, the end, or ``vitpcm mlflow replay <out>``). At the end it logs
the training summary and writes :data:`RUN_FILE` next to ``metrics.json``: the run, the
spool's place, records still pending. The register step continues that run from that
spool (:func:`~vitpcm.tracking.log_pipeline_run`): one pipeline run is one MLflow run.

A resumed training reopens the same run and first logs the epochs of its history the spool
lacks (a kill between the checkpoint and the record); every epoch carries the time it
ended, and MLflow keeps one point per (key, step, timestamp, value).

``s3://`` outputs: the spool needs a local disk, so it lives in :func:`local_spool_dir`
and is copied to ``<out>/mlflow-spool`` after every epoch; a job restarted on another
machine fetches it back first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vitpcm import storage
from vitpcm.config import Config
from vitpcm.run_files import HISTORY_JSON
from vitpcm.tracking.naming import finite_number
from vitpcm.tracking.sender import write_run_file
from vitpcm.tracking.spool import META_FILE, RUN_FILE, SPOOL_DIRNAME, Spool
from vitpcm.tracking.tracker import RunTracker

log = logging.getLogger("vitpcm.tracking")

# ``metrics.json`` key -> summary metric: the kept (best) epoch, not the last one.
_SUMMARY = {
    "best_epoch": "best/epoch",
    "epochs_run": "best/epochs_run",
    "miou": "best/val_miou",
    "train_miou": "best/train_miou",
}


def training_summary(result: Mapping[str, Any]) -> dict[str, float]:
    """A finished training's summary metrics: best epoch (from 1), epochs run, its mIoUs."""
    values = {metric: finite_number(result.get(key)) for key, metric in _SUMMARY.items()}
    return {metric: value for metric, value in values.items() if value is not None}


def log_training_files(tracker: RunTracker, out_uri: str) -> None:
    """Log ``history.json`` and the TensorBoard logs (artifact folder ``tensorboard/``) of a
    training output folder; missing ones are skipped."""
    with tempfile.TemporaryDirectory() as tmp:
        history = storage.join(out_uri, HISTORY_JSON)
        if storage.exists(history):
            Path(tmp, HISTORY_JSON).write_bytes(storage.read_bytes(history))
            tracker.log_artifact(Path(tmp, HISTORY_JSON), move=True)
        board = storage.join(out_uri, "tensorboard")
        files = storage.list_files(board) if storage.exists(board) else []
        for rel in files:
            target = Path(tmp, "tensorboard", *rel.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(storage.read_bytes(storage.join(board, rel)))
        if files:
            tracker.log_artifact(Path(tmp, "tensorboard"), move=True)


def local_spool_dir(out_uri: str | os.PathLike[str]) -> Path:
    """The spool of the training writing to ``out_uri``: inside it when local, else in this
    machine's temporary folder, named after the URI."""
    text = storage.local_path(out_uri).rstrip("/")
    if not storage.is_remote(text):
        return Path(text) / SPOOL_DIRNAME
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "vitpcm-mlflow" / digest / SPOOL_DIRNAME


class TrainingTracker:
    """The MLflow run of one training output folder, logged live by the chief worker. Never
    stops the training: outages wait in the spool, any other failure costs a warning.

    Args:
        cfg: the resolved config.
        out_uri: the training output folder (local or ``s3://``).
        tracking_uri: the MLflow tracking URI.
        spool_dir: the local spool (default :func:`local_spool_dir`); one outside
            ``<out_uri>/mlflow-spool`` is copied there.
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
        self.out_uri = storage.local_path(out_uri).rstrip("/")
        self.spool_dir = Path(spool_dir) if spool_dir else local_spool_dir(self.out_uri)
        self.spool_uri = storage.join(self.out_uri, SPOOL_DIRNAME)  # named in RUN_FILE
        elsewhere = storage.is_remote(self.out_uri) or (
            Path(self.spool_uri).resolve() != self.spool_dir.resolve()
        )
        self.mirror_uri = self.spool_uri if elsewhere else None
        self.tracker: RunTracker | None = RunTracker(
            cfg, self.out_uri, tracking_uri=tracking_uri, spool_dir=self.spool_dir,
            retry_interval_s=retry_interval_s,
        )  # fmt: skip
        self.run_info: dict[str, Any] | None = None
        self._mirrored: dict[str, tuple[int, int]] = {}
        self._warned = False
        # When the last epoch ended: the summary's time, so a re-run logs the same points.
        self._last_epoch_ms: float | None = None

    def _safely(self, what: str, action: Any, *args: Any) -> None:
        try:
            action(*args)
        except Exception as exc:  # tracking must never stop the training
            log.warning("%s (%s: %s); training goes on", what, type(exc).__name__, exc)
        self._mirror()

    def start(self, history: Sequence[Mapping[str, Any]] = ()) -> None:
        """Open (or reopen) the run and log the epochs of ``history`` the spool lacks."""
        self._safely("cannot open the MLflow run", self._start, history)

    def _start(self, history: Sequence[Mapping[str, Any]]) -> None:
        tracker, self.tracker = self.tracker, None
        assert tracker is not None
        if self.mirror_uri:
            self._fetch_mirror(self.mirror_uri, fresh=not history)
        tracker.start()
        self.tracker = tracker
        logged = {
            int(m["step"])
            for r in Spool(self.spool_dir).records()
            if r.kind == "metrics"
            for m in r.data["metrics"]
            if m["key"] == "train/loss"  # every epoch logs the loss
        }
        missing = [e for e in history if int(e.get("epoch", 0)) not in logged]
        if missing:
            log.info("logging %d epoch(s) the MLflow spool missed", len(missing))
        for entry in missing:
            tracker.epoch_callback(int(entry.get("epoch", 0)), entry)
        if history:
            self._last_epoch_ms = finite_number(history[-1].get("timestamp"))

    def __call__(self, epoch: int, logs: Mapping[str, Any]) -> None:
        """Log one epoch's curves (``epoch`` counted from 1)."""
        if self.tracker is not None:
            self._last_epoch_ms = finite_number(logs.get("timestamp"))
            self._safely(f"cannot record epoch {epoch} for MLflow", self.tracker.epoch_callback,
                         epoch, logs)  # fmt: skip

    def finish(self, result: Mapping[str, Any]) -> dict[str, Any] | None:
        """Log the training summary, end the run, write :data:`RUN_FILE` and return it."""
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            self._safely("cannot finish the MLflow run", self._finish, tracker, result)
        return self.run_info

    def _finish(self, tracker: RunTracker, result: Mapping[str, Any]) -> None:
        stamp = None if self._last_epoch_ms is None else int(self._last_epoch_ms)
        tracker.log_metrics(training_summary(result), timestamp=stamp)
        log_training_files(tracker, self.out_uri)
        tracker.finish("FINISHED")
        self.run_info = write_run_file(
            Spool(self.spool_dir),
            storage.join(self.out_uri, RUN_FILE),
            experiment=tracker.experiment,
            tracking_uri=tracker.tracking_uri,
            spool=self.spool_uri,
        )

    def close(self, status: str) -> None:
        """End the run early (``FAILED``, ``KILLED``); a resumed training reopens it."""
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            self._safely("cannot close the MLflow run", tracker.finish, status)

    def _mirror(self) -> None:
        """Copy what changed in a spool kept elsewhere to ``<out>/mlflow-spool``: files
        first, then journal and state, so the copy never names a file it lacks."""
        if not self.mirror_uri or not self.spool_dir.is_dir():
            return
        try:
            paths = sorted(
                (p.relative_to(self.spool_dir) for p in self.spool_dir.rglob("*") if p.is_file()),
                key=lambda rel: (len(rel.parts) == 1, rel.as_posix()),
            )
            for rel in paths:
                stat = (self.spool_dir / rel).stat()
                stamp = (stat.st_size, stat.st_mtime_ns)
                if self._mirrored.get(rel.as_posix()) == stamp or any(
                    part.startswith(".")
                    for part in rel.parts  # locks, temporary files
                ):
                    continue
                data = (self.spool_dir / rel).read_bytes()
                storage.write_bytes(storage.join(self.mirror_uri, *rel.parts), data)
                self._mirrored[rel.as_posix()] = stamp
        except Exception as exc:
            if not self._warned:
                log.warning("cannot copy the MLflow spool to %s (%s)", self.mirror_uri, exc)
            self._warned = True

    def _fetch_mirror(self, mirror: str, fresh: bool) -> None:
        """Take ``<out>/mlflow-spool`` as the local spool unless this machine holds the same
        one; a fresh training drops a local spool an earlier job left for this URI."""
        remote_meta = storage.join(mirror, META_FILE)
        if not storage.exists(remote_meta):
            if fresh and self.spool_dir.exists():
                shutil.rmtree(self.spool_dir)
            return
        remote_id = json.loads(storage.read_bytes(remote_meta)).get("spool_id")
        if (self.spool_dir / META_FILE).is_file() and Spool(self.spool_dir).spool_id == remote_id:
            return  # this machine's copy is the same spool and at least as new
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self._parent()))
        try:
            download(mirror, staging)
            shutil.rmtree(self.spool_dir, ignore_errors=True)
            os.replace(staging, self.spool_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("MLflow spool fetched from %s", mirror)

    def _parent(self) -> Path:
        self.spool_dir.parent.mkdir(parents=True, exist_ok=True)
        return self.spool_dir.parent


def download(source: str, target: Path) -> None:
    """Copy the files of a spool folder (local or ``s3://``) into the local ``target``
    (locks and temporary files left out)."""
    for rel in storage.list_files(source):
        if not any(part.startswith(".") for part in rel.split("/")):
            path = target.joinpath(*rel.split("/"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(storage.read_bytes(storage.join(source, rel)))
