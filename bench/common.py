"""What every benchmark records next to its figures: command, machine, load, date."""

from __future__ import annotations

import datetime
import json
import os
import platform
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
