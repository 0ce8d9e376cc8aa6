"""Progress events: what a step reports for a watcher to show, apart from its log wording.

A step's log lines are for people and may be reworded; a watcher (``make run-local``'s
progress display, :mod:`localrun.progress`) reads events instead. :func:`emit` writes one
line, :data:`PREFIX` then a JSON object with the event's ``kind`` and fields, to stdout when
the environment has ``VITPCM_EVENTS=1`` (the local runner sets it for its steps), and
nothing otherwise. :func:`parse` finds one anywhere in a line (``kfp.local`` indents a
step's output).

Kinds and their fields, as emitted:

* ``epoch``: ``epoch``, ``epochs``, ``loss``, ``val_miou`` (one training epoch ended)
* ``resume``: ``epoch`` (training continues from a checkpoint at this epoch)
* ``early_stop``: ``patience`` (epochs without improvement)
* ``score``: ``split``, ``miou``, ``images`` (pseudo masks scored)
* ``crf_score``: ``split``, ``miou``, ``miou_crf``, ``images`` (before/after the CRF)
* ``registered``: ``run_id``, and once a model is registered ``model``, ``version``,
  ``promoted`` (the MLflow run exists; the MLflow outcome)
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

ENV = "VITPCM_EVENTS"
PREFIX = "vitpcm-event "


def emit(kind: str, **fields: Any) -> None:
    """Report an event (a no-op unless ``VITPCM_EVENTS=1``)."""
    if os.environ.get(ENV) != "1":
        return
    line = json.dumps({"kind": kind, **fields}, sort_keys=True, default=str)
    sys.stdout.write(f"{PREFIX}{line}\n")
    sys.stdout.flush()


def parse(line: str) -> dict[str, Any] | None:
    """The event in ``line``, or None when it holds none."""
    _, found, rest = line.partition(PREFIX)
    if not found:
        return None
    try:
        event = json.loads(rest)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "kind" in event else None
