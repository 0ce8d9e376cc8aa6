"""Progress of a ``kfp.local`` run: one line per DAG step, the full logs in a file.

``kfp.local`` prints every step's logs (and its own ``Executing task ...`` / ``Task ...
finished with status ...`` lines) to ``sys.stdout``. :func:`capture_kfp_output` puts a
:class:`KfpLogSink` there for the run: everything goes to a log file, and the sink turns the
task lines and a few result lines (epochs, mIoU) into calls on a :class:`StepDisplay`,
which draws one line per step with its elapsed time -- redrawn every second on a terminal,
printed once at start and end (plus throttled details) in a log or a pipe.

:func:`isolated_step_processes` starts each step in a process group of its own, so that
stopping the run (Ctrl-C, SIGTERM) ends the step and everything it started (CRF workers).
"""

from __future__ import annotations

import collections
import contextlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# Display names of the DAG's tasks (their kfp names are the component names).
STEP_LABELS = {
    "check-run": "check dataset and config",
    "download-data": "download / synthesise data",
    "importer": "import dataset folder",
    "convert-data": "convert to TFRecords",
    "gpu-placement": "GPU placement",
    "train-model": "train ViT-PCM",
    "evaluate-model": "evaluate baseline pseudo masks",
    "infer-crf": "infer pseudo masks + CRF",
    "register-model": "register in MLflow",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK_START = re.compile(r"Executing task '([^']+)'")
_TASK_END = re.compile(r"Task '([^']+)' finished with status (\w+)")
_EXECUTOR_PREFIX = re.compile(r"^\s*\[KFP Executor [^\]]*\]:\s*")
# Result lines of the library worth showing next to a step.
_DETAILS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"epoch (\d+/\d+) \w+: loss ([\d.]+) .*val mIoU ([\d.]+)"),
        "epoch {0} · loss {1} · val mIoU {2}",
    ),
    (re.compile(r"resuming .* at epoch (\d+)"), "resuming at epoch {0}"),
    (re.compile(r"early stopping: (.*)"), "early stop: {0}"),
    (re.compile(r"^(\w+) mIoU ([\d.]+) on (\d+) images"), "{0} mIoU {1} ({2} images)"),
    (
        re.compile(r"^(\w+): BPM mIoU ([\d.]+), after CRF ([\d.]+)"),
        "{0}: mIoU {1} -> {2} after CRF",
    ),
    (re.compile(r"^MLflow run (\w+)"), "MLflow run {0}"),
    (re.compile(r"^(\S+ v\d+): .* -> (champion.*)$"), "{0}: {1}"),
)
_TAIL_LINES = 40
_TITLE_WIDTH = 38
_QUIET_DETAIL_EVERY_S = 30.0
_STOP_GRACE_S = 10.0


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
        stream: where to draw (the real terminal, not the redirected ``sys.stdout``).
        total: number of numbered steps (for ``[3/6]``); 0 leaves the numbers out.
        live: redraw the running step every second (default: when ``stream`` is a tty).
    """

    def __init__(self, stream: IO[str], total: int = 0, live: bool | None = None) -> None:
        self.stream = stream
        self.total = total
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
            step = StepRecord(name, label or STEP_LABELS.get(name, name), number)
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
    import os

    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    # A pseudo-terminal without a size (e.g. under `script`) reports 0 columns.
    return columns if columns >= 40 else 100


class KfpLogSink:
    """A ``sys.stdout`` stand-in for a ``kfp.local`` run: log file + step events.

    Args:
        log: the open log file (receives every line, colour codes removed).
        display: the step display fed with task starts/ends and result details.
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
        self._buffer = ""

    # The parts of the TextIO interface that logging handlers and print() use.
    encoding = "utf-8"

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self._line(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        if self.echo is not None:
            self.echo.flush()

    def isatty(self) -> bool:
        return False

    def _line(self, line: str) -> None:
        self.log.write(line + "\n")
        if self.echo is not None:
            self.echo.write(line + "\n")
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
        message = _EXECUTOR_PREFIX.sub("", line)
        if message == line:  # not a log record of the step (JSON of its inputs, prints)
            return
        for pattern, template in _DETAILS:
            found = pattern.search(message)
            if found:
                if self.display is not None:
                    self.display.detail(template.format(*found.groups()))
                return


@contextlib.contextmanager
def capture_kfp_output(sink: KfpLogSink) -> Iterator[KfpLogSink]:
    """Route ``sys.stdout`` (where ``kfp.local`` writes) to ``sink`` for the block."""
    with contextlib.redirect_stdout(sink):  # type: ignore[type-var]
        try:
            yield sink
        finally:
            if sink._buffer:
                sink.write("\n")
            sink.flush()


def _stop_step(proc: subprocess.Popen[Any]) -> None:
    """End a step's whole process group: SIGTERM, then SIGKILL after a grace period."""
    import os

    for sig, wait in ((signal.SIGTERM, _STOP_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # Children of the step (CRF or conversion workers) may outlive it by a moment.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_step_process(full_command: Sequence[str]) -> int:
    """Run one step like ``kfp.local`` does, but in its own process group.

    Its output is printed line by line (into the sink); if the caller is interrupted,
    the step and everything it started are stopped before the interruption goes on.
    """
    with subprocess.Popen(
        list(full_command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        start_new_session=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, ""):
                print(line, end="")
            return proc.wait()
        except BaseException:
            _stop_step(proc)
            raise


@contextlib.contextmanager
def isolated_step_processes() -> Iterator[None]:
    """Make ``kfp.local``'s SubprocessRunner start steps with :func:`run_step_process`.

    ``kfp.local`` (2.13) starts steps in the caller's process group and, when interrupted,
    waits for them; this swaps its module-level runner function for the block. If a kfp
    release renames it, steps run the stock way (and a Ctrl-C in the terminal still reaches
    them, as members of the foreground group).
    """
    from kfp.local import subprocess_task_handler as handler

    original = getattr(handler, "run_local_subprocess", None)
    if original is None:
        yield
        return
    handler.run_local_subprocess = run_step_process
    try:
        yield
    finally:
        handler.run_local_subprocess = original


def open_log(path: Path) -> IO[str]:
    """Open (create) a run's log file, line-buffered."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", encoding="utf-8", buffering=1)  # the caller closes it


def real_stdout() -> IO[str]:
    """The process's stdout even while ``sys.stdout`` is redirected."""
    return sys.__stdout__ or sys.stdout
