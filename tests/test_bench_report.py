"""BENCHMARKS.md's learning rows: the timing row and the max-vs-average comparison."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _report() -> Any:
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(pooling: str, bpm: float, train_s: float = 400.0) -> dict[str, Any]:
    return {"pooling": pooling, "test_bpm_miou": bpm, "test_crf_miou": bpm + 0.05,
            "train_s": train_s, "test_crf_s": 10.0}  # fmt: skip


def _payload(command: str, *rows: dict[str, Any]) -> dict[str, Any]:
    return {
        "rows": list(rows),
        "command": command,
        "machine": "x86_64, 2 CPUs, Linux",
        "date": "2026-11-24T18:00:00+00:00",
        "load_average_at_end": [1.0, 1.1, 1.2],
        "data": {"seconds": 10.0},
        "grid_oracle_test_miou": 0.93,
    }


def test_both_poolings_in_one_run_give_both_rows() -> None:
    rows = _report().learning_rows(_payload("both", _row("max", 0.8), _row("avg", 0.7)))
    assert [r["verdict"] for r in rows] == ["met", "met"]
    assert "+0.100" in rows[1]["value"]
    assert rows[0]["command"] == rows[1]["command"] == "`both`"


def test_a_max_only_run_keeps_the_comparison_of_the_ablation_run() -> None:
    report = _report()
    primary = _payload("max only", _row("max", 0.82, train_s=1000.0))
    ablation = _payload("both", _row("max", 0.8), _row("avg", 0.85))
    timing, comparison = report.learning_rows(primary, ablation)
    assert timing["command"] == "`max only`"
    assert timing["verdict"] != "met"  # 1000 s of training: over 15 minutes
    assert comparison["command"] == "`both`"
    assert "-0.050" in comparison["value"] and comparison["verdict"] != "met"
    # Without an ablation file there is no comparison row.
    assert len(report.learning_rows(primary)) == 1


def _seed(seed: int, bpm: float, wall_s: float = 600.0) -> dict[str, Any]:
    return {"seed": seed, "test_bpm_miou": bpm, "test_crf_miou": bpm + 0.07, "wall_s": wall_s,
            "val_bpm_miou": bpm,
            "cpu_s": 700.0, "load_1min_mean": 2.0}  # fmt: skip


def test_the_seeds_row_summarises_readme_commands_and_names_a_weak_seed() -> None:
    import importlib.util as util

    spec = util.spec_from_file_location("learning_steps", ROOT / "bench" / "learning_steps.py")
    assert spec is not None and spec.loader is not None
    steps = util.module_from_spec(spec)
    spec.loader.exec_module(steps)
    report = _report()
    rows = [_seed(0, 0.84), _seed(1, 0.80), _seed(2, 0.68)]
    payload = {**_payload("seeds", *rows), "summary": steps.summarise(rows)}
    row = report.learning_steps_row(payload)
    # mean 0.7733, sample sd of (0.84, 0.80, 0.68) = 0.0833
    assert "BPM mean **0.773** (sd 0.083, min 0.680, max 0.840)" in row["value"]
    assert "seed 2: 0.680 / 0.750 in 10.0 min (CPU 11.7 min, load 2.0)" in row["value"]
    assert row["verdict"] == "**not met**"  # seed 2 is below 0.70
    fine = [_seed(0, 0.84), _seed(1, 0.8, wall_s=1000.0)]
    row = report.learning_steps_row({**_payload("seeds", *fine), "summary": steps.summarise(fine)})
    assert row["verdict"].startswith("mIoU met; **time not met**")


def test_the_recipe_rows_compare_each_pooling_with_the_run_without_it() -> None:
    def row(pooling: str, bpm: float, cpu: float) -> dict[str, Any]:
        return {**_row(pooling, bpm), "epoch_cpu_s_median": cpu}

    clean = _payload("clean", row("max", 0.817, 68.0), row("avg", 0.717, 70.0))
    recipe = _payload("recipe", row("max", 0.822, 85.0))
    (only,) = _report().learning_recipe_rows(recipe, clean)
    assert "max pooling" in only["figure"] and only["command"] == "`recipe`"
    assert "0.822 vs 0.817 (**+0.005**)" in only["value"]
    assert "85.0 vs 68.0 (1.25x)" in only["value"]
