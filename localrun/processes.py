"""Processes of ``make run-local`` in process groups of their own.

The local servers (:mod:`localrun.services`) and the ``kfp.local`` run
(:mod:`localrun.kfp_run`) each lead a process group: a Ctrl-C typed in the terminal reaches
only the command, which then stops each group whole -- the leader and everything it
started (steps, CRF or conversion workers, server workers).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# A step stopped by Ctrl-C gets this long to end before SIGKILL.
_STEP_GRACE_S = 10.0


def stop_group(proc: subprocess.Popen[Any], kill: bool = False, grace_s: float = 20.0) -> None:
    """Stop ``proc``'s whole process group (it leads one) and reap it.

    SIGTERM (``kill``: SIGKILL at once), then SIGKILL after ``grace_s``; what the leader
    started may outlive it for a moment (or for good, when it died first), so the group
    gets a last SIGKILL.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_in_own_group(
    command: Sequence[str], on_line: Callable[[str], None], env: Mapping[str, str] | None = None
) -> int:
    """Run ``command`` in a process group of its own; returns its exit code.

    Its output (stdout and stderr) goes to ``on_line`` line by line. A Ctrl-C in the
    terminal reaches only the caller (the command is in another group); if the caller is
    interrupted (KeyboardInterrupt), the command and everything it started are stopped
    before the interruption goes on.
    """
    with subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        env=None if env is None else dict(env),
        start_new_session=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, ""):
                on_line(line)
            return proc.wait()
        except BaseException:
            stop_group(proc, grace_s=_STEP_GRACE_S)
            raise
