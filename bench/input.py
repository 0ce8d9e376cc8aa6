"""Benchmark the input pipeline against the train step it feeds: does training ever wait?

Run: ``python bench/input.py [--images 400] [--batch 4] [--json PATH]``

One run converts a small VOC-layout dataset (VOC-sized synthetic JPEGs, see
``bench/data.py``), then alternates, for ``--rounds`` rounds (best of each kept):

1. the reader alone: images/s of training batches as ``vitpcm train`` reads them (main
   384-px view with colour jitter, flips and transpose, plus the ET second view with its own
   jitter and crop, ``configs/voc12_vit_s16.yaml``);
2. the train step alone, on one batch held in memory (ViT-S/16, the default precision and
   XLA setting, built as in ``bench/train_step.py``);
3. the train step fed by the reader, as in a training epoch, alternating with 2.

The goal is a reader at least twice as fast as the step; the third figure checks it: when
the reader keeps up, the fed step runs at the in-memory step's speed (the median ratio of
adjacent fed and held steps is about 1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# bench/ is this script's folder, hence first on sys.path when it runs.
from common import emit_figures, run_context
from data import make_source
from train_step import build_step, make_config, select_device, synthetic_batch


def reader_throughput(iterator: Any, batches: int) -> float:
    """Images/s of ``batches`` batches pulled from a running iterator."""
    images = 0
    start = time.perf_counter()
    for _ in range(batches):
        images += int(next(iterator)["image"].shape[0])
    return images / (time.perf_counter() - start)


def step_throughput(step: Any, batches: Any, steps: int) -> float:
    """Images/s of ``steps`` train steps on batches from ``batches()``."""
    images = 0
    start = time.perf_counter()
    for _ in range(steps):
        batch = batches()
        float(step(batch)["loss"])
        images += int(batch["image"].shape[0])
    return images / (time.perf_counter() - start)


def run(args: argparse.Namespace, work: Path, command: str) -> dict[str, Any]:
    """Convert the data, then time the reader, the step and the fed step."""
    from vitpcm.data.convert import convert_dataset

    # Converted before TensorFlow is imported, so the converter may fork its workers.
    src = make_source(work, args.images, args.distinct, args.size)
    info = convert_dataset("voc12", src, work / "tfrecords", progress=False)

    device = select_device("cpu")
    from vitpcm.config import load_config
    from vitpcm.data.reader import dataset_from_config

    # The recipe's own precision and XLA setting: what `vitpcm train` would run.
    recipe = load_config("voc12_vit_s16").train
    precision = "bf16" if recipe.mixed_precision else "fp32"
    xla = recipe.jit_compile
    sets = [f"data.num_classes={info['num_classes']}", "data.train_split=train"]
    cfg = make_config("vit_s16", 384, args.batch, precision, xla, sets)
    dataset = dataset_from_config(cfg, "train", training=True, uri=str(work / "tfrecords"))
    reader = iter(dataset.repeat())
    step, _loop = build_step(cfg)
    held = synthetic_batch(cfg, args.batch)
    # Start-up, not timed: thread pools, autotuning, tracing and compilation.
    next(reader)
    float(step(held)["loss"])
    float(step(next(reader))["loss"])

    best = {"reader": 0.0, "step": 0.0, "fed": 0.0}
    fed_vs_held = []
    for _ in range(args.rounds):
        best["reader"] = max(best["reader"], reader_throughput(reader, args.reader_batches))
        # Held and fed steps alternate, so each pair shares the neighbours' load.
        for _ in range(args.steps):
            held_speed = step_throughput(step, lambda: held, 1)
            fed_speed = step_throughput(step, lambda: next(reader), 1)
            best["step"], best["fed"] = max(best["step"], held_speed), max(best["fed"], fed_speed)
            fed_vs_held.append(fed_speed / held_speed)
    return {
        "benchmark": "input",
        "images": args.images,
        "image_size": args.size,
        "batch": args.batch,
        "train_step": f"ViT-S/16 384 px, {precision}, XLA {'on' if xla else 'off'}",
        "reader_images_per_s": round(best["reader"], 1),
        "step_images_per_s": round(best["step"], 3),
        "fed_step_images_per_s": round(best["fed"], 3),
        "reader_vs_step": round(best["reader"] / best["step"], 1),
        "fed_vs_held": round(statistics.median(fed_vs_held), 3),
        **run_context(command),
        "machine": device,  # the device the step ran on, not only the CPU
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="train images converted")
    parser.add_argument("--distinct", type=int, default=100, help="distinct synthetic images")
    parser.add_argument("--size", type=int, default=448, help="synthetic image side in px")
    parser.add_argument("--batch", type=int, default=4, help="batch of the reader and the step")
    parser.add_argument("--reader-batches", type=int, default=25, help="batches per reader round")
    parser.add_argument("--steps", type=int, default=2, help="train steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (best kept)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    command = "python bench/input.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        figures = run(args, Path(tmp), command.strip())
    emit_figures(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
