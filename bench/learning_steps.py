"""Benchmark README's step-by-step commands on the synthetic data, over several data seeds.

Run: ``python bench/learning_steps.py [--seeds 0 1 2] [--json PATH] [--workdir DIR]``

For each seed ``S`` this runs, as separate processes, exactly the commands README's
"One step at a time" section shows, with their defaults (only the folders, ``--seed S`` and
``--set train.seed=S`` added, and progress bars off)::

    vitpcm data synth --out W/synth --seed S
    vitpcm data convert --dataset voc12 --src W/synth --out W/synth-tfr
    vitpcm train -c synthetic --data W/synth-tfr --out W/run --set train.seed=S
    vitpcm test  -c synthetic -m W/run --data W/synth-tfr --out W/test --crf

and records the held-out test BPM mIoU before and after the dense CRF (``metrics.json`` of
``vitpcm test``), the validation mIoU of the selected epoch, and per step the wall-clock and
CPU seconds (user + system of the child process, from ``getrusage``), the child's peak RSS
and the machine's 1-minute load average (sampled every 10 s). The JSON file is rewritten
after every seed, so a long run that is stopped keeps what it measured.

``bench/learning.py`` measures the same data and config in one process (and adds the
average-pooling ablation and the grid oracle); this script checks that a user who types
README's commands gets that result, and how much it moves with the data seed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

GOAL_MIOU = 0.70
GOAL_MINUTES = 15.0


class LoadSampler:
    """Samples the 1-minute load average every ``period`` seconds in a daemon thread."""

    def __init__(self, period: float = 10.0) -> None:
        self.period = period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.period):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self) -> float:
        """Mean of the samples taken so far."""
        return statistics.mean(self.samples) if self.samples else os.getloadavg()[0]


def run_step(name: str, command: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run one command, its output appended to ``log``; return its wall, CPU and load figures.

    Raises:
        SystemExit: The command failed (its log names why).
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log.open("a") as out, LoadSampler() as load:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        sys.exit(f"error: `{' '.join(command)}` failed ({code}); see {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "step": name,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "max_rss_mib": round(after.ru_maxrss / 1024, 1),  # peak over the children so far
        "load_1min_mean": round(load.mean(), 2),
    }


def commands(work: Path, seed: int, overrides: list[str]) -> dict[str, list[str]]:
    """README's four commands for one seed, with their output folders under ``work``."""
    vitpcm = str(Path(sys.executable).with_name("vitpcm"))
    raw, records, run, test = (str(work / n) for n in ("synth", "synth-tfr", "run", "test"))
    sets = [arg for o in [f"train.seed={seed}", *overrides] for arg in ("--set", o)]
    quiet = ["--no-progress"]
    return {
        "synth": [vitpcm, "data", "synth", "--out", raw, "--seed", str(seed), *quiet],
        "convert": [vitpcm, "data", "convert", "--dataset", "voc12", "--src", raw,
                    "--out", records, *quiet],
        "train": [vitpcm, "train", "-c", "synthetic", "--data", records, "--out", run,
                  *sets, *quiet],
        "test": [vitpcm, "test", "-c", "synthetic", "-m", run, "--data", records,
                 "--out", test, "--crf", *quiet],
    }  # fmt: skip


def one_seed(work: Path, seed: int, overrides: list[str]) -> dict[str, Any]:
    """Run the four commands for one seed; return its row."""
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)  # measure the commands, not an MLflow server
    log = work / "steps.log"
    steps = [run_step(name, cmd, env, log) for name, cmd in commands(work, seed, overrides).items()]
    trained = json.loads((work / "run" / "metrics.json").read_text())
    tested = json.loads((work / "test" / "metrics.json").read_text())
    history = json.loads((work / "run" / "history.json").read_text())
    wall = sum(s["wall_s"] for s in steps)
    return {
        "seed": seed,
        "test_split": tested["split"],
        "test_images": tested["num_images"],
        "test_bpm_miou": round(tested["miou"], 4),
        "test_crf_miou": round(tested["miou_crf"], 4),
        "val_bpm_miou": round(trained["miou"], 4),
        "best_epoch": trained["best_epoch"],
        "epochs": len(history),
        "val_miou_per_epoch": [round(e["val_miou"], 4) for e in history],
        "wall_s": round(wall, 1),
        "cpu_s": round(sum(s["cpu_s"] for s in steps), 1),
        "load_1min_mean": round(
            sum(s["load_1min_mean"] * s["wall_s"] for s in steps) / max(wall, 1e-9), 2
        ),
        "steps": steps,
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max of each figure over the seeds."""
    out: dict[str, Any] = {}
    for key in ("test_bpm_miou", "test_crf_miou", "val_bpm_miou", "wall_s", "cpu_s"):
        values = [row[key] for row in rows]
        out[key] = {
            "mean": round(statistics.mean(values), 4),
            "stdev": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
        }
    out["seeds_below_goal"] = [r["seed"] for r in rows if r["test_bpm_miou"] < GOAL_MIOU]
    out["seeds_over_time"] = [r["seed"] for r in rows if r["wall_s"] > GOAL_MINUTES * 60]
    return out


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| seed | test BPM | test CRF | val BPM | best/epochs | wall s | CPU s | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['seed']} | {r['test_bpm_miou']:.3f} | {r['test_crf_miou']:.3f} | "
        f"{r['val_bpm_miou']:.3f} | {r['best_epoch']}/{r['epochs']} | {r['wall_s']:.0f} | "
        f"{r['cpu_s']:.0f} | {r['load_1min_mean']:.2f} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="data seeds")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="extra config override for train and test (default: none, as in README)",
    )  # fmt: skip
    parser.add_argument("--json", help="write rows, summary and context to this JSON file")
    parser.add_argument("--workdir", help="keep data and runs here instead of a temp dir")
    args = parser.parse_args(argv)
    command = " ".join(["python bench/learning_steps.py", *(argv or sys.argv[1:])])
    context = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "nice": os.nice(0),
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vitpcm-steps-") as tmp:
        work = Path(args.workdir or tmp)
        for seed in args.seeds:
            print(f"seed {seed}: README's commands ...", file=sys.stderr, flush=True)
            row = one_seed(work / f"seed-{seed}", seed, args.overrides)
            rows.append(row)
            print(format_rows([row]).splitlines()[-1], file=sys.stderr, flush=True)
            if args.json:
                payload = {"rows": rows, "summary": summarise(rows), **context}
                payload["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    print(format_rows(rows))
    print(json.dumps(summarise(rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
