"""The local MLflow spool: every tracking record is written here before it is sent.

MLflow being down must not lose metrics (DESIGN.md, "Bad input and faults"), so tracking is
a write-ahead journal: a record (params, metrics with their step and timestamp, tags, an
artifact file, a model) is appended to ``records.jsonl`` -- with any file it needs copied
under ``files/`` first -- and only then sent. The sender keeps an acknowledged watermark in
``state.json``: records at or below it reached MLflow and are never sent again, records
above it are pending and are sent, in order, whenever MLflow answers (the next epoch, the
end of the run, or ``vitpcm mlflow replay DIR``). ``state.json`` also holds the MLflow run
id, so a replay continues the same run instead of creating a new one.

Layout of a spool folder (normally ``<run output>/mlflow-spool/``)::

    spool.json      identity: spool id (tagged on the MLflow run), tracking URI, format
    records.jsonl   one JSON record per line: seq, id, kind, time (ms), data
    state.json      sender state: acked watermark, run/experiment id, per-record progress
    files/          artifact and model copies, as files/<seq>/<name>

Crash safety: a record line is written with one ``write`` + ``fsync`` and its files are
complete before it is; a torn last line (killed mid-write) is ignored by readers and cut
off by the next append; ``state.json`` is replaced atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitpcm import storage
from vitpcm.errors import TrackingError

SPOOL_DIRNAME = "mlflow-spool"
FORMAT_VERSION = 1
META_FILE = "spool.json"
JOURNAL_FILE = "records.jsonl"
STATE_FILE = "state.json"
FILES_DIR = "files"
# Two locks: appends are short and must never wait behind a slow send (a training epoch
# should not block on a replay running next to it); sends are serialised among themselves.
_APPEND_LOCK = ".append.lock"
_SEND_LOCK = ".send.lock"


def now_ms() -> int:
    """Wall-clock time in milliseconds, MLflow's timestamp unit."""
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Record:
    """One journal entry.

    Attributes:
        seq: position in the journal (0, 1, 2...); sending follows it.
        id: unique id (hex), used to make server-side effects idempotent.
        kind: what to do with it (``start_run``, ``params``, ``metrics``, ...).
        time: when it was recorded, in ms since the epoch.
        data: the kind's payload (JSON values only).
    """

    seq: int
    id: str
    kind: str
    time: int
    data: dict[str, Any]

    def to_line(self) -> str:
        payload = {"seq": self.seq, "id": self.id, "kind": self.kind, "time": self.time}
        payload["data"] = self.data
        return json.dumps(payload, allow_nan=True, separators=(",", ":")) + "\n"


@dataclass
class SpoolState:
    """What the sender has achieved so far (``state.json``).

    Attributes:
        acked: highest ``seq`` that is done (sent, or rejected by the server for good).
        run_id: the MLflow run this spool logs to, once known.
        experiment_id: its experiment.
        tracking_uri: where ``run_id`` lives; a replay elsewhere would need a new run.
        progress: per-record results of multi-step records (model id, version, decision).
        rejected: ``seq`` -> reason, for records MLflow refused permanently.
    """

    acked: int = -1
    run_id: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SpoolState:
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def resolve_spool_dir(directory: str | os.PathLike[str]) -> Path:
    """The spool folder for ``directory``: itself, or its ``mlflow-spool/`` child.

    Raises:
        TrackingError: ``directory`` holds no spool.
    """
    path = Path(storage.local_path(directory))
    for candidate in (path, path / SPOOL_DIRNAME):
        if (candidate / META_FILE).is_file():
            return candidate
    raise TrackingError(
        f"no MLflow spool in {path} (expected {path / SPOOL_DIRNAME / META_FILE}); pass the "
        "output folder of a tracked run or its mlflow-spool/ folder"
    )


class Spool:
    """A spool folder: append records, read them back, keep the sender's state.

    Args:
        directory: the spool folder (created when missing). Local paths only: the journal
            is appended to and fsynced, which object stores cannot do.
        tracking_uri: remembered in ``spool.json`` as the default target of a replay.
    """

    def __init__(self, directory: str | os.PathLike[str], tracking_uri: str | None = None) -> None:
        text = storage.local_path(directory)
        if storage.is_remote(text):
            raise TrackingError(
                f"the MLflow spool must be on a local disk, got {text}; give the tracker a "
                "local spool_dir when the run's outputs go to object storage"
            )
        self.path = Path(text)
        self.files_dir = self.path / FILES_DIR
        try:
            self.files_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the MLflow spool {self.path}: {exc}") from exc
        meta_path = self.path / META_FILE
        if meta_path.is_file():
            self.meta = json.loads(meta_path.read_text())
            if self.meta.get("format") != FORMAT_VERSION:
                raise TrackingError(
                    f"{meta_path} has spool format {self.meta.get('format')}, this vitpcm "
                    f"reads {FORMAT_VERSION}; replay it with the vitpcm version that wrote it"
                )
            if tracking_uri and not self.meta.get("tracking_uri"):
                self.meta["tracking_uri"] = tracking_uri
                _write_json_atomic(meta_path, self.meta)
        else:
            self.meta = {
                "format": FORMAT_VERSION,
                "spool_id": uuid.uuid4().hex,
                "created": now_ms(),
                "tracking_uri": tracking_uri,
            }
            _write_json_atomic(meta_path, self.meta)

    @property
    def spool_id(self) -> str:
        """Unique id of this spool, tagged on its MLflow run to find the run again."""
        return str(self.meta["spool_id"])

    @property
    def tracking_uri(self) -> str | None:
        """The tracking URI the spool was written for (``None``: not configured)."""
        return self.meta.get("tracking_uri")

    # -- locks ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _flock(self, name: str, blocking: bool) -> Iterator[bool]:
        handle = open(self.path / name, "a+")  # noqa: SIM115  (held for the block's duration)
        try:
            flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
            try:
                fcntl.flock(handle, flags)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        finally:
            handle.close()

    def send_lock(self, blocking: bool = True) -> contextlib.AbstractContextManager[bool]:
        """Exclusive right to send (yields ``False`` when non-blocking and already taken)."""
        return self._flock(_SEND_LOCK, blocking)

    # -- journal --------------------------------------------------------------------------

    def append(
        self,
        kind: str,
        data: Mapping[str, Any],
        files: Mapping[str, str | os.PathLike[str]] | None = None,
        *,
        move: bool = False,
    ) -> Record:
        """Append one record, first copying ``files`` into the spool.

        Args:
            kind: the record kind.
            data: its payload; must be JSON-serialisable.
            files: ``{data key: local file or folder}``; each is copied to
                ``files/<seq>/<name>`` and ``data[key]`` is set to that spool-relative path.
            move: move the files in instead of copying (the caller's temporary files: a
                saved model can be hundreds of MB).

        Returns:
            The record as written.
        """
        payload = dict(data)
        with self._flock(_APPEND_LOCK, blocking=True):
            journal = self.path / JOURNAL_FILE
            seq = self._repair_and_next_seq(journal)
            for key, source in (files or {}).items():
                payload[key] = self._copy_in(seq, Path(source), move)
            record = Record(seq, uuid.uuid4().hex, kind, now_ms(), payload)
            line = record.to_line().encode("utf-8")
            try:
                with open(journal, "ab") as handle:
                    handle.write(line)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                raise TrackingError(f"cannot append to the MLflow spool {journal}: {exc}") from exc
        return record

    def _repair_and_next_seq(self, journal: Path) -> int:
        """Cut a torn last line (a crash mid-append) and return the next sequence number."""
        if not journal.exists():
            return 0
        data = journal.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(journal, "r+b") as handle:
                handle.truncate(keep)
            data = data[:keep]
        last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        return int(json.loads(last)["seq"]) + 1 if last else 0

    def _copy_in(self, seq: int, source: Path, move: bool) -> str:
        if not source.exists():
            raise TrackingError(f"cannot log {source}: no such file or folder")
        folder = self.files_dir / f"{seq:06d}"
        target = folder / source.name
        staging = self.files_dir / f".{seq:06d}-{source.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            folder.mkdir(exist_ok=True)
            if move:
                shutil.move(source, staging)
            elif source.is_dir():
                shutil.copytree(source, staging)
            else:
                shutil.copyfile(source, staging)
            if target.exists():  # left by an append that died before its journal line
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(staging, target)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                staging.unlink()
            raise TrackingError(f"cannot copy {source} into the MLflow spool: {exc}") from exc
        return f"{FILES_DIR}/{seq:06d}/{source.name}"

    def records(self) -> list[Record]:
        """Every complete record, in order (a torn trailing line is skipped)."""
        journal = self.path / JOURNAL_FILE
        if not journal.exists():
            return []
        records = []
        for line in journal.read_text(encoding="utf-8").splitlines(keepends=True):
            if not line.endswith("\n"):
                break
            raw = json.loads(line)
            records.append(Record(raw["seq"], raw["id"], raw["kind"], raw["time"], raw["data"]))
        return records

    def pending(self) -> list[Record]:
        """Records above the acknowledged watermark, in order."""
        acked = self.load_state().acked
        return [r for r in self.records() if r.seq > acked]

    def file_path(self, relative: str) -> Path:
        """Absolute path of a file the journal refers to."""
        return self.path / relative

    # -- state ----------------------------------------------------------------------------

    def load_state(self) -> SpoolState:
        """The sender state (a fresh one before the first send)."""
        path = self.path / STATE_FILE
        if not path.exists():
            return SpoolState()
        return SpoolState.from_dict(json.loads(path.read_text()))

    def save_state(self, state: SpoolState) -> None:
        """Replace ``state.json`` atomically."""
        _write_json_atomic(self.path / STATE_FILE, state.to_dict())


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise TrackingError(f"cannot write {path}: {exc}") from exc
