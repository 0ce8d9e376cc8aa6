"""Run the benchmarks and write ``BENCHMARKS.md``: one row per figure, goal, value, verdict.

Run: ``python bench/report.py [--out BENCHMARKS.md] [--only NAME ...] [--from-json DIR]``
(``make bench`` runs it with the sizes below: about 10 minutes on 2 cores).

Every benchmark runs as its own process (``python bench/<name>.py ... --json FILE``), so
each starts from a clean TensorFlow state, and its JSON lands in ``--json-dir``;
``--from-json`` rebuilds the table from such a folder without measuring again. The rows
name the exact command, the machine, the date and the load average: the figures are
ratios taken within one run, because a shared machine's absolute speeds move with the
neighbours' load. ``bench/learning.py`` (minutes to hours of training) is not run here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(BENCH) not in sys.path:  # imported as a file (tests), not run as a script
    sys.path.insert(0, str(BENCH))

from report_train import gpu_rows, pseudo_mask_rows, recipe_step_rows, train_step_rows  # noqa: E402

EARLIER_DROPOUT = (
    "backbone_dropout=0.0",
    "frozen_dropout=false",
    "dropout=0.1",
    "lstm_dropout=0.0",
)
# The sizes `make bench` uses: large enough to amortise start-up, small enough for 2 cores.
RUNS: dict[str, list[str]] = {
    # The earlier S/16 defaults (no backbone dropout, 0.1 head dropout), so the one-pass
    # step and the earlier one are compared on the model config they both ran.
    "train_step": "--precision fp32 bf16 --xla off on --baseline --rounds 3".split()
    + [f"--set=model.{s}" for s in EARLIER_DROPOUT],
    # The paper configs as shipped (the authors' recipe: dropout in every backbone block,
    # frozen ones too): no activation is shared with the ET target, so the one-pass step
    # can only batch, not skip, work. fp32, XLA off: the default path.
    "train_step_recipe": "--precision fp32 --xla off --baseline --rounds 3".split(),
    "input": ["--images", "400", "--rounds", "3"],
    "data": ["--images", "6000", "--rounds", "6"],
    "crf": ["--images", "5", "--split", "24"],
    "metrics": ["--images", "200"],
    "pseudo_masks": ["--images", "6"],
}


# Runs of one script with other arguments: name -> script.
SCRIPTS = {"train_step_recipe": "train_step"}


def run_benchmark(name: str, args: list[str], json_dir: Path) -> dict[str, Any]:
    """Run ``bench/<script>.py`` with ``args`` and return its JSON figures (``<name>.json``)."""
    out = json_dir / f"{name}.json"
    shown = os.path.relpath(out, ROOT) if out.is_relative_to(ROOT) else str(out)
    script = SCRIPTS.get(name, name)
    command = [sys.executable, str(BENCH / f"{script}.py"), *args, "--json", shown]
    print("$", " ".join(["python", f"bench/{script}.py", *args]), flush=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run(command, check=True, cwd=ROOT, env=env)
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- rows


def _verdict(met: bool) -> str:
    return "met" if met else "**not met**"


def _context(figures: dict[str, Any]) -> dict[str, str]:
    load = figures.get("load_average")
    load_text = ", ".join(str(x) for x in load) if isinstance(load, list) else str(load)
    return {
        "command": f"`{figures['command']}`",
        "machine": str(figures["machine"]),
        "date": str(figures["date"]),
        "load": load_text,
    }


def input_rows(f: dict[str, Any]) -> list[dict[str, str]]:
    value = (
        f"reader {f['reader_images_per_s']} img/s vs step {f['step_images_per_s']} img/s "
        f"= **{f['reader_vs_step']}x**; the step fed by the reader runs at "
        f"{f['fed_vs_held']} of its in-memory speed ({f['train_step']}, batch {f['batch']})"
    )
    return [
        {
            "figure": "Input pipeline: reader (main view + ET second view) vs train step",
            "goal": ">= 2x the step's images/s",
            "value": value,
            "verdict": _verdict(f["reader_vs_step"] >= 2),
            **_context(f),
        }
    ]


def data_rows(f: dict[str, Any]) -> list[dict[str, str]]:
    value = (
        f"{f['images_per_s_2_workers']} vs {f['images_per_s_1_worker']} img/s = "
        f"**{f['speedup_2_vs_1']}x** on {f['images']} {f['image_size']}-px JPEGs; "
        f"CPU {f['cpu_ms_per_image_2_workers']} vs {f['cpu_ms_per_image_1_worker']} ms/img; "
        + (
            f"cores busy {f['cores_busy_2_workers']} vs {f['cores_busy_1_worker']} (the "
            "1-worker run's shard check already decodes in parallel threads); "
            if "cores_busy_1_worker" in f
            else ""
        )
        + f"byte-identical: {f['byte_identical']}"
    )
    return [
        {
            "figure": "Conversion, 2 workers vs 1",
            "goal": ">= 1.7x, byte-identical output",
            "value": value,
            "verdict": _verdict(f["speedup_2_vs_1"] >= 1.7 and f["byte_identical"]),
            **_context(f),
        }
    ]


def crf_rows(f: dict[str, Any]) -> list[dict[str, str]]:
    per_image = (
        f"{f['present_cpu_s_per_image']} vs {f['all_classes_cpu_s_per_image']} CPU s/img = "
        f"**{f['speedup_present_vs_all']}x**; identical labels {f['identical_label_maps']}"
    )
    split = (
        f"{f['workers']} workers: {f['images_per_s_all_workers']} img/s vs 1 worker "
        f"{f['images_per_s_1_worker']} img/s (**{f['speedup_all_workers_vs_1']}x**, "
        f"{f['split_images']} images, start-up included); CPU {f['cpu_s_per_image_all_workers']}"
        f" vs {f['cpu_s_per_image_1_worker']} s/img; same labels: {f['same_labels_all_workers']}"
    )
    spread = (
        f["workers"] == (os.cpu_count() or 1)
        and f["same_labels_all_workers"]
        and f["speedup_all_workers_vs_1"] >= 1.0
    )
    return [
        {
            "figure": "CRF: present classes vs all 21, per image (500x375)",
            "goal": ">= 2.5x, identical labels",
            "value": per_image,
            "verdict": _verdict(f["speedup_present_vs_all"] >= 2.5 and f["all_identical"]),
            **_context(f),
        },
        {
            "figure": "CRF: whole split over all cores (`crf_map`)",
            "goal": "one worker per core, faster than one, same labels",
            "value": split,
            "verdict": _verdict(spread),
            **_context(f),
        },
    ]


def metrics_rows(f: dict[str, Any]) -> list[dict[str, str]]:
    value = (
        f"**{f['update_megapixels_per_s']} Mpx/s** ({f['update_ms_per_image']} ms per 500x375 "
        f"map) vs {f['eval_merge_upsample_argmax_ms_per_image']} ms for eval's label merge + "
        f"upsampling + arg-max of the same image: {round(100 * f['update_share_of_both'])}% "
        f"of the two; naive per-class loop {f['naive_megapixels_per_s']} Mpx/s"
    )
    slow_step = f["update_ms_per_image"] >= f["eval_merge_upsample_argmax_ms_per_image"]
    return [
        {
            "figure": "Evaluation: confusion-matrix accumulation",
            "goal": "never the slow step of `vitpcm eval`",
            "value": value,
            "verdict": _verdict(f["matrices_agree"] and not slow_step),
            **_context(f),
        }
    ]


ROWS: dict[str, Callable[[dict[str, Any]], list[dict[str, str]]]] = {
    "train_step": train_step_rows,
    "train_step_recipe": recipe_step_rows,
    "input": input_rows,
    "data": data_rows,
    "crf": crf_rows,
    "metrics": metrics_rows,
    "pseudo_masks": pseudo_mask_rows,
}


def _learning_context(f: dict[str, Any]) -> dict[str, str]:
    """:func:`_context` of a ``bench/learning.py`` run, whose fields are named differently."""
    arch, cpus = f["machine"].split(",")[:2]
    return _context(
        {
            "command": f["command"],
            "machine": f"{arch}, {cpus.strip()}",
            "date": f["date"][:10],
            "load_average": f["load_average_at_end"],
        }
    )


def learning_rows(
    f: dict[str, Any], ablation: dict[str, Any] | None = None
) -> list[dict[str, str]]:
    """Rows from ``bench/learning.py --json`` (run on its own; picked up when present).

    The max-vs-average row comes from ``f`` when it ran both poolings, else from
    ``ablation`` (``learning-ablation.json``), so a later max-only run can refresh the
    timing row without dropping the comparison.
    """
    rows = {row["pooling"]: row for row in f["rows"]}
    context = _learning_context(f)
    rows_pair, pair_context = rows, context
    if not {"max", "avg"} <= rows.keys() and ablation is not None:
        pair = {row["pooling"]: row for row in ablation["rows"]}
        if {"max", "avg"} <= pair.keys():
            rows_pair, pair_context = pair, _learning_context(ablation)
    out = []
    if "max" in rows:
        r = rows["max"]
        minutes = (f["data"]["seconds"] + r["train_s"] + r["test_crf_s"]) / 60
        met = r["test_bpm_miou"] >= 0.70 and minutes <= 15
        out.append(
            {
                "figure": "Learning: synthetic held-out test, configs/synthetic.yaml (max pooling)",
                "goal": "BPM mIoU >= 0.70 within 15 min on 2 cores",
                "value": f"BPM **{r['test_bpm_miou']:.3f}**, after CRF {r['test_crf_miou']:.3f} "
                f"in {minutes:.1f} min (data {f['data']['seconds']:.0f} s, training "
                f"{r['train_s']:.0f} s, test + CRF {r['test_crf_s']:.0f} s); grid oracle "
                f"{f['grid_oracle_test_miou']:.3f}",
                "verdict": _verdict(met),
                **context,
            }
        )
    if "max" in rows_pair and "avg" in rows_pair:
        top, avg = rows_pair["max"], rows_pair["avg"]
        gap = top["test_bpm_miou"] - avg["test_bpm_miou"]
        out.append(
            {
                "figure": "Learning: max pooling vs the average-pooling ablation",
                "goal": "max pooling ahead",
                "value": f"test BPM {top['test_bpm_miou']:.3f} vs "
                f"{avg['test_bpm_miou']:.3f} (**{gap:+.3f}**); after CRF "
                f"{top['test_crf_miou']:.3f} vs {avg['test_crf_miou']:.3f}",
                "verdict": _verdict(gap > 0),
                **pair_context,
            }
        )
    return out


def learning_recipe_rows(recipe: dict[str, Any], clean: dict[str, Any]) -> list[dict[str, str]]:
    """The authors' regularisation (``learning-recipe.json``: ``bench/learning.py`` with the
    paper configs' dropout settings) against the same benchmark without it (``learning.json``),
    one row per pooling both ran."""
    ours = {row["pooling"]: row for row in clean["rows"]}
    out = []
    for row in recipe["rows"]:
        base = ours.get(row["pooling"])
        if base is None:
            continue
        gap = row["test_bpm_miou"] - base["test_bpm_miou"]
        cpu = row["epoch_cpu_s_median"] / base["epoch_cpu_s_median"]
        out.append(
            {
                "figure": f"Learning: the authors' dropout recipe vs without it ({row['pooling']} "
                "pooling, synthetic)",
                "goal": "report both (docs/METHOD-NOTES.md)",
                "value": f"test BPM {row['test_bpm_miou']:.3f} vs {base['test_bpm_miou']:.3f} "
                f"(**{gap:+.3f}**); after CRF {row['test_crf_miou']:.3f} vs "
                f"{base['test_crf_miou']:.3f}; CPU s/epoch {row['epoch_cpu_s_median']:.1f} vs "
                f"{base['epoch_cpu_s_median']:.1f} ({cpu:.2f}x)",
                "verdict": "reported",
                **_learning_context(recipe),
            }
        )
    return out


def learning_steps_row(f: dict[str, Any]) -> dict[str, str]:
    """The row of ``bench/learning_steps.py --json``: README's commands over data seeds.

    The goal is every seed at BPM mIoU >= 0.70 within 15 minutes; wall-clock minutes on a
    shared machine depend on the neighbours, so the value gives CPU minutes and the mean
    load next to them.
    """
    rows, summary = f["rows"], f["summary"]
    bpm, crf = summary["test_bpm_miou"], summary["test_crf_miou"]
    seeds = "; ".join(
        f"seed {r['seed']}: {r['test_bpm_miou']:.3f} / {r['test_crf_miou']:.3f} in "
        f"{r['wall_s'] / 60:.1f} min (CPU {r['cpu_s'] / 60:.1f} min, "
        f"load {r['load_1min_mean']:.1f})"
        for r in rows
    )
    learned = not summary["seeds_below_goal"]
    in_time = not summary["seeds_over_time"]
    verdict = _verdict(learned and in_time)
    if learned and not in_time:
        verdict = "mIoU met; **time not met** on the loaded machine (see load)"
    return {
        "figure": f"Learning: README's step-by-step commands, {len(rows)} data seeds "
        "(configs/synthetic.yaml, `vitpcm data synth` defaults)",
        "goal": "every seed: test BPM mIoU >= 0.70 within 15 min on 2 cores",
        "value": f"BPM mean **{bpm['mean']:.3f}** (sd {bpm['stdev']:.3f}, min {bpm['min']:.3f}, "
        f"max {bpm['max']:.3f}); after CRF mean {crf['mean']:.3f} (sd {crf['stdev']:.3f}); "
        + seeds,
        "verdict": verdict,
        **_learning_context(f),
    }


def render(figures: dict[str, dict[str, Any]], json_dir: Path | None = None) -> str:
    """BENCHMARKS.md's text from the benchmarks' JSON figures."""
    rows: list[dict[str, str]] = []
    for name, make_rows in ROWS.items():
        if name in figures:
            rows.extend(make_rows(figures[name]))
        if name == "train_step_recipe":  # after every CPU train-step row
            rows.extend(gpu_rows(json_dir or ROOT / "build" / "bench"))
    if "learning" in figures:
        rows.extend(learning_rows(figures["learning"], figures.get("learning_ablation")))
        if "learning_recipe" in figures:
            rows.extend(learning_recipe_rows(figures["learning_recipe"], figures["learning"]))
    if "learning_steps" in figures:
        rows.append(learning_steps_row(figures["learning_steps"]))
    header = ["figure", "goal", "value", "verdict", "command", "machine", "date", "load avg"]
    keys = ["figure", "goal", "value", "verdict", "command", "machine", "date", "load"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python bench/report.py`) on "
        f"{datetime.date.today().isoformat()}; each row is one figure of one benchmark run, "
        "with the exact command that produced it (run it again to check a row). The machine "
        "may be shared: the figures are ratios measured within one run, and the 1-, 5- and "
        "15-minute load averages at the end of the run sit next to them.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [row[k].replace("|", "\\|").replace("\n", " ") for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *NOTES]
    return "\n".join(lines) + "\n"


NOTES = [
    "## How the figures are taken",
    "",
    "- **Train step**: `vitpcm train`'s own step (`TrainingLoop`, fine-tuning phase: the "
    "last 5 of 12 blocks, the final LayerNorm, the HV-BiLSTM and the classifier train; "
    "ET loss on) on one in-memory batch of 4, with the earlier S/16 dropout settings "
    "(no backbone dropout, 0.1 head dropout) so both steps run one model config. *One pass* "
    "(`train.fused_step`, default): main views and mosaics in one batch, the ET target from "
    "the main pass's activations where exact; *earlier three-pass step*: "
    "`train.fused_step=false`. All configurations are built first, then timed in interleaved "
    "rounds. *Executed* FLOPs (matmuls and convolutions): read off XLA's optimized HLO where "
    "XLA runs (it merges duplicated work), analytic in graph mode. Ratios: to a 3072^3 matmul "
    "timed around each round in the same precision (median over rounds) and in fp32, and to "
    "the CPU's FMA peak (ISA, clock and cores from /proc/cpuinfo; 2 FMA units per core "
    "assumed), per CPU-second against one core's peak. Speed ratios are given by wall clock "
    "and by CPU time per image, so load cannot flatter them.",
    "- **Paper config (authors' dropout recipe)**: the same step on the paper configs as "
    "shipped (dropout 0.1 in every backbone block, frozen ones too; 0.2 at the head and in "
    "the LSTMs). There no activation of the main pass equals the ET target's, so the one pass "
    "runs the same FLOPs as the three (111.39 GFLOP/img) and can only batch them: about 1.0x. "
    "The goals are judged on the config without backbone dropout, where sharing is exact.",
    "- **Where the time goes**: `python bench/profile_step.py` (TensorFlow's profiler over "
    "the same step; op time by op type and by model part, the shares summed over compute "
    "threads). The one-pass step's speed-up is bounded by its FLOPs: it skips 28% of the "
    "earlier step's work (0.722x), the most efficient part (forward matmuls of the target "
    "pass), so at equal efficiency it would be 1.385x; what remains is the backward of the "
    "trained blocks and the HV-BiLSTM's many small matmuls (about a quarter of op time).",
    "- **Mixed bfloat16** and **XLA** stay opt-in (`--set train.mixed_precision=true`, "
    "`--set train.jit_compile=true`): both change the losses (defaults row). bf16 vs fp32 "
    "is given as a plain speed ratio. Under XLA the HV-BiLSTM runs its fused scan "
    "(`vitpcm.model.hv_bilstm`, one loop for all four LSTMs: 48 sequential iterations per "
    "step at 384 px); in graph mode Keras' LSTMs, which are faster there on a CPU.",
    "- **GPU**: `bench/gpu_smoke.sh` (one run, < 8 minutes; `--dry` checks it on a CPU): the "
    "device, `bench/train_step.py --device gpu` (ViT-B/16, 384 px, batch 16, bf16, XLA; MFU "
    "against the datasheet peak and a measured 8192^3 bf16 matmul), one synthetic training "
    "epoch (MirroredStrategy) and 960 px inference throughput; JSON under `$OUT` "
    "(`build/bench/gpu/` is read by the report).",
    "- **Pseudo masks**: `bench/pseudo_masks.py` runs `vitpcm test --crf`'s function at 960 "
    "px with `crf.workers=1` and with all cores; the trainaug rows are projections, and say "
    "how they are made.",
    "- **Conversion**: 1- and 2-worker runs alternate six times, best of each; CPU ms per "
    "image shows whether the workers add work (start-up, messages) or only wait for cores.",
    "- **Learning**: `bench/learning.py` (two training runs, max vs average pooling, about "
    "15 minutes on 2 cores) is not run by `make bench`; its rows come from "
    "`build/bench/learning.json` when that file is there, the max-vs-average row from "
    "`build/bench/learning-ablation.json` if `learning.json` ran max pooling only "
    "(`python bench/learning.py --json build/bench/learning.json`), the authors' dropout "
    "recipe against it from `build/bench/learning-recipe.json` (the same command with "
    "`--set model.backbone_dropout=0.1 --set model.frozen_dropout=true --set model.dropout=0.2 "
    "--set model.lstm_dropout=0.2`). "
    "`bench/learning_steps.py` runs README's step-by-step commands (`vitpcm data synth`, "
    "`data convert`, `train -c synthetic`, `test --crf`) as separate processes for data "
    "seeds 0, 1, 2 (`train.seed` = data seed); its row comes from "
    "`build/bench/learning-steps.json`.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="Markdown file")
    parser.add_argument("--json-dir", default=str(ROOT / "build" / "bench"), help="JSON figures")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these")
    parser.add_argument("--from-json", action="store_true", help="do not run: reuse --json-dir")
    args = parser.parse_args(argv)
    json_dir = Path(args.json_dir)
    json_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, dict[str, Any]] = {}
    for name, bench_args in RUNS.items():
        path = json_dir / f"{name}.json"
        if args.from_json or (args.only and name not in args.only):
            if path.is_file():  # an earlier run's figures, kept in the table
                figures[name] = json.loads(path.read_text())
            continue
        figures[name] = run_benchmark(name, bench_args, json_dir)
    for name in ("learning", "learning_ablation", "learning_recipe", "learning_steps"):
        path = json_dir / f"{name.replace('_', '-')}.json"
        if path.is_file():
            figures[name] = json.loads(path.read_text())
    text = render(figures, json_dir)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
