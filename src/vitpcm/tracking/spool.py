"""The MLflow spool (``<run output>/mlflow-spool/``): a write-ahead journal of records.

MLflow being down must not lose metrics (DESIGN.md): a record is appended to
``records.jsonl`` (its files copied to ``files/<seq>/`` first) and only then sent.
``state.json`` holds the sender's acknowledged watermark (records at or below it are never
sent again), the run and per-record progress; ``spool.json`` the spool's id (tagged on the
run) and the URI it was written for. A record line is one ``write`` + ``fsync``; a torn
last line (killed mid-write) is skipped and cut off by the next append.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vitpcm import storage
from vitpcm.errors import TrackingError

SPOOL_DIRNAME = "mlflow-spool"
RUN_FILE = "mlflow_run.json"  # beside a tracked training's metrics.json: its run and spool
META_FILE = "spool.json"
JOURNAL_FILE = "records.jsonl"
STATE_FILE = "state.json"


def now_ms() -> int:
    """Wall-clock time in milliseconds, MLflow's timestamp unit."""
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Record:
    """One journal entry: position, unique id, kind, time (ms), JSON payload."""

    seq: int
    id: str
    kind: str
    time: int
    data: dict[str, Any]


@dataclass
class SpoolState:
    """``state.json``: the acked watermark, the run (and the server holding it),
    per-record progress of multi-step records, and the records MLflow refused for good."""

    acked: int = -1
    run_id: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)


def resolve_spool_dir(directory: str | os.PathLike[str]) -> Path:
    """The spool in ``directory``: itself, or its ``mlflow-spool/`` child."""
    path = Path(storage.local_path(directory))
    for candidate in (path, path / SPOOL_DIRNAME):
        if (candidate / META_FILE).is_file():
            return candidate
    raise TrackingError(
        f"no MLflow spool in {path} (expected {path / SPOOL_DIRNAME / META_FILE}); pass the "
        "output folder of a tracked run or its mlflow-spool/ folder"
    )


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise TrackingError(f"cannot write {path}: {exc}") from exc


class Spool:
    """A spool folder on a local disk (object stores cannot append and fsync), created
    when missing; ``tracking_uri`` is kept as the default target of a replay."""

    def __init__(self, directory: str | os.PathLike[str], tracking_uri: str | None = None) -> None:
        text = storage.local_path(directory)
        if storage.is_remote(text):
            raise TrackingError(
                f"the MLflow spool must be on a local disk, got {text}; give the tracker a "
                "local spool_dir when the run's outputs go to object storage"
            )
        self.path = Path(text)
        try:
            (self.path / "files").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the MLflow spool {self.path}: {exc}") from exc
        meta = self.path / META_FILE
        self.meta = json.loads(meta.read_text()) if meta.is_file() else {}
        if not self.meta or (tracking_uri and not self.meta.get("tracking_uri")):
            self.meta = {"spool_id": uuid.uuid4().hex, **self.meta, "tracking_uri": tracking_uri}
            _write_json(meta, self.meta)

    @property
    def spool_id(self) -> str:
        """Unique id of this spool, tagged on its MLflow run to find the run again."""
        return str(self.meta["spool_id"])

    @property
    def tracking_uri(self) -> str | None:
        """The tracking URI the spool was written for (``None``: not configured)."""
        return self.meta.get("tracking_uri")

    @contextlib.contextmanager
    def lock(self, name: str, blocking: bool = True) -> Iterator[bool]:
        """Hold the lock ``name`` (``append``, or ``send``: an epoch never waits behind a
        replay); yields ``False`` when it is taken and ``blocking`` is off."""
        with open(self.path / f".{name}.lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def append(
        self,
        kind: str,
        data: Mapping[str, Any],
        files: Mapping[str, str | os.PathLike[str]] | None = None,
        *,
        move: bool = False,
    ) -> Record:
        """Append one record; each of ``files`` (``{data key: local file or folder}``) is
        first copied (``move``: moved) to ``files/<seq>/<name>``, its path set in ``data``."""
        payload = dict(data)
        journal = self.path / JOURNAL_FILE
        with self.lock("append"):
            raw = journal.read_bytes() if journal.exists() else b""
            if raw and not raw.endswith(b"\n"):  # a torn last line: cut it off
                raw = raw[: raw.rfind(b"\n") + 1]
                with open(journal, "r+b") as handle:
                    handle.truncate(len(raw))
            last = raw.rstrip(b"\n").rsplit(b"\n", 1)[-1]
            seq = int(json.loads(last)["seq"]) + 1 if last else 0
            for key, source in (files or {}).items():
                payload[key] = self._copy_in(seq, Path(source), move)
            record = Record(seq, uuid.uuid4().hex, kind, now_ms(), payload)
            line = json.dumps(asdict(record), separators=(",", ":")) + "\n"
            try:
                with open(journal, "ab") as handle:
                    handle.write(line.encode("utf-8"))
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                raise TrackingError(f"cannot append to the MLflow spool {journal}: {exc}") from exc
        return record

    def _copy_in(self, seq: int, source: Path, move: bool) -> str:
        if not source.exists():
            raise TrackingError(f"cannot log {source}: no such file or folder")
        relative = f"files/{seq:06d}/{source.name}"
        target = self.path / relative
        staging = self.path / "files" / f".{seq:06d}-{uuid.uuid4().hex[:8]}"
        try:
            target.parent.mkdir(exist_ok=True)
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
        return relative

    def records(self) -> list[Record]:
        """Every complete record, in order (a torn trailing line is skipped)."""
        journal = self.path / JOURNAL_FILE
        text = journal.read_text(encoding="utf-8") if journal.exists() else ""
        lines = text.splitlines(keepends=True)
        return [Record(**json.loads(line)) for line in lines if line.endswith("\n")]

    def pending(self) -> list[Record]:
        """Records above the acknowledged watermark, in order."""
        acked = self.load_state().acked
        return [r for r in self.records() if r.seq > acked]

    def load_state(self) -> SpoolState:
        """The sender state (a fresh one before the first send)."""
        path = self.path / STATE_FILE
        return SpoolState(**json.loads(path.read_text())) if path.exists() else SpoolState()

    def save_state(self, state: SpoolState) -> None:
        """Replace ``state.json`` atomically."""
        _write_json(self.path / STATE_FILE, asdict(state))
