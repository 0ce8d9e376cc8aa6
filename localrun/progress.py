"""Progress of a ``kfp.local`` run: one line per DAG step, the full logs in a file.

The run's output (``kfp.local``'s own ``Executing task ...`` / ``Task ... finished with
status ...`` lines and every step's output) is fed line by line into a :class:`KfpLogSink`:
everything goes to a log file, and the sink turns the task lines and the steps' progress
events (:mod:`vitpcm.events`, never the wording of their log lines) into calls on a
:class:`StepDisplay`, which draws one line per step with its elapsed time -- redrawn every
second on a terminal, printed once at start and end (plus throttled details) in a log or a
pipe.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from vitpcm import events

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# kfp.local's own lines around each task (kfp/local/task_dispatcher.py).
_TASK_START = re.compile(r"Executing task '([^']+)'")
_TASK_END = re.compile(r"Task '([^']+)' finished with status (\w+)")


def _score(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"


def _registered(event: Mapping[str, Any]) -> str:
    if event.get("version") is None:
        return f"MLflow run {event['run_id']}"
    verdict = {True: "new champion", False: "champion unchanged"}.get(event.get("promoted"))
    return f"{event['model']} v{event['version']}: {verdict or 'registered'}"


# How each kind of progress event is shown next to its step.
_SHOWN: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "epoch": lambda e: (
        f"epoch {e['epoch']}/{e['epochs']} · loss {_score(e['loss'])} · "
        f"val mIoU {_score(e['val_miou'])}"
    ),
    "resume": lambda e: f"resuming at epoch {e['epoch']}",
    "early_stop": lambda e: f"early stop: no improvement for {e['patience']} epochs",
    "score": lambda e: f"{e['split']} mIoU {_score(e['miou'])} ({e['images']} images)",
    "crf_score": lambda e: (
        f"{e['split']}: mIoU {_score(e['miou'])} -> {_score(e['miou_crf'])} after CRF"
    ),
    "registered": _registered,
}
_TAIL_LINES = 40
_TITLE_WIDTH = 38
_QUIET_DETAIL_EVERY_S = 30.0


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class StepRecord:
    """One step as displayed: what it is, how long it took, how it ended."""

    name: str
    label: str
    number: int | None = None
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    status: str = "running"
    detail: str = ""


class StepDisplay:
    """One line per step with elapsed time and the latest detail.

    Args:
        stream: where to draw.
        total: number of numbered steps (for ``[3/6]``); 0 leaves the numbers out.
        live: redraw the running step every second (default: when ``stream`` is a tty).
        labels: what each step (by task name) is called on screen.
    """

    def __init__(
        self,
        stream: IO[str],
        total: int = 0,
        live: bool | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.stream = stream
        self.total = total
        self.labels = dict(labels or {})
        self.live = stream.isatty() if live is None else live
        self.steps: list[StepRecord] = []
        self._current: StepRecord | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._numbered = 0
        self._last_quiet_detail = 0.0
        encoding = (getattr(stream, "encoding", None) or "ascii").lower()
        utf = encoding.replace("-", "").startswith("utf")
        self._marks = {"ok": "✓" if utf else "ok", "failed": "✗" if utf else "FAILED"}

    # -- events ---------------------------------------------------------------------------

    def begin(self, name: str, label: str | None = None, numbered: bool = True) -> None:
        """A step starts (ends the previous one as done if it is still open)."""
        with self._lock:
            if self._current is not None:
                self.end(self._current.name)
            number = None
            if numbered:
                self._numbered += 1
                number = self._numbered
            step = StepRecord(name, label or self.labels.get(name, name), number)
            self.steps.append(step)
            self._current = step
            if self.live:
                self._draw_live()
                self._start_ticker()
            else:
                self._write(f"  {self._prefix(step)}{step.label} ...\n")

    def detail(self, text: str) -> None:
        """The running step's latest news (e.g. ``epoch 3/30 · val mIoU 0.41``)."""
        with self._lock:
            if self._current is None:
                return
            self._current.detail = text
            if self.live:
                self._draw_live()
            elif time.monotonic() - self._last_quiet_detail >= _QUIET_DETAIL_EVERY_S:
                self._last_quiet_detail = time.monotonic()
                self._write(f"      {self._current.label}: {text}\n")

    def end(self, name: str, ok: bool = True, detail: str | None = None) -> None:
        """A step ended; its line is printed for good."""
        with self._lock:
            step = self._current
            if step is None or step.name != name:
                return
            self._current = None
            step.seconds = time.monotonic() - step.started
            step.status = "ok" if ok else "failed"
            if detail is not None:
                step.detail = detail
            title = f"{self._prefix(step)}{step.label}"
            line = f"{self._marks[step.status]} {title:<{_TITLE_WIDTH}} {_clock(step.seconds):>7}"
            if step.detail:
                line += f"  {step.detail}"
            self._write(("\r\x1b[K" if self.live else "") + f"  {line}\n")

    def note(self, text: str) -> None:
        """A plain line above the running step."""
        with self._lock:
            if self.live and self._current is not None:
                self._write(f"\r\x1b[K  {text}\n")
                self._draw_live()
            else:
                self._write(f"  {text}\n")

    def close(self) -> None:
        """Stop redrawing; a step still open is marked as failed (the run was cut short)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        with self._lock:
            if self._current is not None:
                self.end(self._current.name, ok=False)

    # -- drawing --------------------------------------------------------------------------

    def _prefix(self, step: StepRecord) -> str:
        if step.number is None or not self.total:
            return ""
        return f"[{step.number}/{self.total}] "

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _draw_live(self) -> None:
        step = self._current
        if step is None:
            return
        elapsed = _clock(time.monotonic() - step.started)
        title = f"{self._prefix(step)}{step.label}"
        line = f"  … {title:<{_TITLE_WIDTH}} {elapsed:>7}"
        if step.detail:
            line += f"  {step.detail}"
        width = _terminal_width(self.stream)
        # A wrapped line cannot be redrawn in place with \r.
        self._write("\r\x1b[K" + line[: width - 1])

    def _start_ticker(self) -> None:
        if self._ticker is not None:
            return

        def tick() -> None:
            while not self._stop.wait(1.0):
                with self._lock:
                    self._draw_live()

        self._ticker = threading.Thread(target=tick, name="step-display", daemon=True)
        self._ticker.start()


def _terminal_width(stream: IO[str]) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    # A pseudo-terminal without a size (e.g. under `script`) reports 0 columns.
    return columns if columns >= 40 else 100


class KfpLogSink:
    """Where a ``kfp.local`` run's output goes, line by line: log file + step display.

    Args:
        log: the open log file (receives every line, colour codes removed).
        display: the step display fed with task starts/ends and progress events.
        echo: also copy every line to this stream (``--verbose``).
    """

    def __init__(
        self, log: IO[str], display: StepDisplay | None = None, echo: IO[str] | None = None
    ) -> None:
        self.log = log
        self.display = display
        self.echo = echo
        self.current: str | None = None
        self.failed: str | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)

    def line(self, text: str) -> None:
        """One line of the run's output."""
        line = _ANSI.sub("", text.rstrip("\n"))
        self.log.write(line + "\n")
        if self.echo is not None:
            self.echo.write(line + "\n")
            self.echo.flush()
        started = _TASK_START.search(line)
        if started:
            self.current = started.group(1)
            self.tail.clear()
            if self.display is not None:
                self.display.begin(self.current)
            return
        ended = _TASK_END.search(line)
        if ended:
            name, status = ended.groups()
            if status != "SUCCESS":
                self.failed = name
            if self.display is not None:
                self.display.end(name, ok=status == "SUCCESS")
            self.current = None
            return
        if self.current is None:
            return
        self.tail.append(line)
        event = events.parse(line)
        show = _SHOWN.get(event["kind"]) if event else None
        if show is not None and self.display is not None:
            with contextlib.suppress(KeyError, TypeError, ValueError):  # a malformed event
                self.display.detail(show(event))


def open_log(path: Path) -> IO[str]:
    """Open (create) a run's log file, line-buffered."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", encoding="utf-8", buffering=1)  # the caller closes it
