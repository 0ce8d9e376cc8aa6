"""What every benchmark records next to its figures: command, machine, load, date."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
from pathlib import Path
from typing import Any


def machine() -> str:
    """CPU model and core count, as every benchmark names the machine."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name}, {os.cpu_count()} cores"


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and of its reaped children
    (a pool's workers once joined, a finished subprocess).

    Wall-clock throughput on a shared machine depends on what else runs; CPU seconds per
    item show whether parallel workers add work.
    """
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_context(command: str) -> dict[str, Any]:
    """The context fields of one run's figures; call it when the run ends (load average)."""
    return {
        "command": command,
        "machine": machine(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.date.today().isoformat(),
    }


def emit_figures(figures: dict[str, Any], json_path: str | None) -> None:
    """Print one aligned ``name  value`` line per figure; also write them to ``json_path``."""
    width = max(len(name) for name in figures)
    for name, value in figures.items():
        print(f"{name:<{width}}  {value}")
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")
