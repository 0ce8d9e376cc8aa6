"""Benchmark learning: ViT-PCM on the synthetic dataset, max pooling vs average pooling.

Run: ``python bench/learning.py [--quick] [--json PATH] [--workdir DIR] [--set KEY=VALUE ...]``

One run makes the synthetic dataset (``vitpcm data synth`` + ``data convert``), then, with
the same data and seed, trains ``configs/synthetic.yaml`` twice: as configured (global max
pooling, the method) and with ``model.pooling=avg`` (the CAM-style ablation). Each model is
selected on ``val`` by the training loop and scored on the held-out ``test`` split, never
used for selection: baseline pseudo masks (BPM) before and after the dense CRF, at the
labels' original resolution. ``--quick`` runs a smaller dataset and fewer epochs (the CI
regression test, ``tests/test_learning.py``, runs exactly that).

The table also gives the *grid oracle*: the mIoU of the true patch-level class fractions
pushed through the same label merge, bilinear upsampling and arg-max. No network can beat
it at this patch grid, so it says how much of the gap is the grid and how much is learning.

Time on a shared machine: wall-clock seconds depend on the neighbours, so the table adds
the CPU seconds of this process and its children, the per-epoch wall and CPU time, and the
1-minute load average sampled after every epoch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # imported as a file (tests), not run as a script
    sys.path.insert(0, str(BENCH))

from common import cpu_seconds  # noqa: E402
from vitpcm.config import POOLINGS  # noqa: E402

# FULL is `vitpcm data synth`'s defaults (vitpcm.data.synth.DEFAULT_*, checked by
# tests/test_synth.py), so this measures what README's step-by-step commands give.
FULL: dict[str, Any] = {"train": 2000, "val": 100, "test": 200, "overrides": []}
QUICK: dict[str, Any] = {"train": 1000, "val": 50, "test": 100, "overrides": ["train.epochs=4"]}


def make_data(work: Path, train: int, val: int, test: int, size: int, seed: int) -> Path:
    """Synthesise the VOC-layout dataset and convert it; returns the TFRecord folder."""
    from vitpcm.data.convert import convert_dataset
    from vitpcm.data.synth import make_synthetic

    raw, records = work / "raw", work / "tfrecords"
    make_synthetic(raw, train=train, val=val, test=test, size=size, seed=seed, progress=False)
    convert_dataset("voc12", raw, records, workers=1, progress=False)
    return records


def grid_oracle_miou(cfg: Any, data: Path, split: str) -> float:
    """mIoU of the true per-patch class fractions after label merge + bilinear + arg-max.

    The ceiling any patch-level prediction reaches at ``model.patch_size`` on this split.
    """
    import numpy as np

    from vitpcm.data.reader import dataset_from_config
    from vitpcm.eval import merged_probabilities
    from vitpcm.metrics import ConfusionMatrix

    k, patch, size = cfg.data.num_classes, cfg.model.patch_size, cfg.data.image_size
    grid = size // patch
    matrix = ConfusionMatrix(k)
    dataset = dataset_from_config(cfg, split, training=False, uri=str(data), with_label=True)
    for tensors in dataset:
        batch = {key: value.numpy() for key, value in tensors.items()}
        for i in range(batch["mask"].shape[0]):
            h, w = int(batch["height"][i]), int(batch["width"][i])
            mask = batch["mask"][i, :h, :w]
            # The class fractions of each cell of the network's grid, read off the label map
            # resized (nearest) to the network's input size, as the network sees the image.
            rows = (np.arange(size) * h // size)[:, None]
            cols = (np.arange(size) * w // size)[None, :]
            seen = mask[rows, cols]
            onehot = np.zeros((size, size, k), np.float32)
            valid = seen < k
            onehot[valid, seen[valid]] = 1.0
            fractions = onehot.reshape(grid, patch, grid, patch, k).mean(axis=(1, 3))
            merged = merged_probabilities(fractions, batch["labels"][i], h, w)
            matrix.update(mask, merged.argmax(axis=-1))
    return float(matrix.compute()["miou"])


def train_and_test(cfg: Any, data: Path, out: Path, progress: bool) -> dict[str, Any]:
    """Train one config, test it with the CRF; return one row of the table."""
    from vitpcm.infer import run_test
    from vitpcm.train import train

    epochs: list[dict[str, float]] = []
    clock = {"cpu": cpu_seconds()}

    def on_epoch(epoch: int, logs: dict[str, float]) -> None:
        now = cpu_seconds()
        epochs.append(
            {
                "epoch": epoch,
                "wall_s": logs["train_seconds"],
                "cpu_s": now - clock["cpu"],
                "val_miou": logs["val_miou"],
                "load_1min": os.getloadavg()[0],
            }
        )
        clock["cpu"] = now
        if progress:
            print(
                f"  [{cfg.model.pooling}] epoch {epoch}: loss {logs['loss']:.3f} "
                f"(bce {logs['bce']:.3f}, et {logs['et']:.3f}) val BPM mIoU "
                f"{logs['val_miou']:.3f}, {logs['train_seconds']:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    start_wall, start_cpu = time.perf_counter(), cpu_seconds()
    trained = train(cfg, data_uri=str(data), out_uri=str(out), progress=False, callbacks=[on_epoch])
    train_wall, train_cpu = time.perf_counter() - start_wall, cpu_seconds() - start_cpu

    start_wall, start_cpu = time.perf_counter(), cpu_seconds()
    tested = run_test(
        cfg, str(out), data_uri=str(data), out_dir=str(out.with_name(f"{out.name}-test")), crf=True,
        split="test", progress=False,
    )  # fmt: skip
    test_wall, test_cpu = time.perf_counter() - start_wall, cpu_seconds() - start_cpu
    return {
        "pooling": cfg.model.pooling,
        "val_bpm_miou": round(trained["miou"], 4),
        "test_bpm_miou": round(tested["miou"], 4),
        "test_crf_miou": round(tested["miou_crf"], 4),
        "test_class_iou": [None if v is None else round(v, 4) for v in tested["class_iou"]],
        "epochs": trained["epochs_run"],
        "best_epoch": trained["best_epoch"],
        "train_s": round(train_wall, 1),
        "train_cpu_s": round(train_cpu, 1),
        "epoch_s_median": round(statistics.median(e["wall_s"] for e in epochs), 1),
        "epoch_cpu_s_median": round(statistics.median(e["cpu_s"] for e in epochs), 1),
        "test_crf_s": round(test_wall, 1),
        "test_crf_cpu_s": round(test_cpu, 1),
        "load_1min_mean": round(statistics.mean(e["load_1min"] for e in epochs), 2),
        "val_miou_per_epoch": [round(e["val_miou"], 4) for e in epochs],
    }


COLUMNS = (
    ("pooling", "pooling", "{}"),
    ("val BPM", "val_bpm_miou", "{:.3f}"),
    ("test BPM", "test_bpm_miou", "{:.3f}"),
    ("test CRF", "test_crf_miou", "{:.3f}"),
    ("epochs", "epochs", "{}"),
    ("best", "best_epoch", "{}"),
    ("train s", "train_s", "{:.0f}"),
    ("CPU s", "train_cpu_s", "{:.0f}"),
    ("s/epoch", "epoch_s_median", "{:.1f}"),
    ("CPU s/epoch", "epoch_cpu_s_median", "{:.1f}"),
    ("test+CRF s", "test_crf_s", "{:.0f}"),
    ("load", "load_1min_mean", "{:.2f}"),
)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (BENCHMARKS.md takes it as is)."""
    cells = [[fmt.format(row[key]) for _, key, fmt in COLUMNS] for row in rows]
    heads = [head for head, _, _ in COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
              for r in cells]  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Defaults: --train 2000 --val 100 --test 200 with configs/synthetic.yaml; "
        f"--quick: {QUICK['train']}/{QUICK['val']}/{QUICK['test']} images and "
        f"--set {' --set '.join(QUICK['overrides'])}.",
    )
    parser.add_argument("--quick", action="store_true", help="the short CI setting")
    parser.add_argument("--config", help="config name or file (default: synthetic)")
    parser.add_argument("--train", type=int, help="training images")
    parser.add_argument("--val", type=int, help="validation images (model selection)")
    parser.add_argument("--test", type=int, help="held-out test images (reported)")
    parser.add_argument("--size", type=int, default=128, help="synthetic image side in px")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument(
        "--pooling", choices=POOLINGS, action="append",
        help="train only this pooling (repeatable; default: both)",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="config override for both runs, e.g. train.epochs=5",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the table and context to this JSON file")
    parser.add_argument("--workdir", help="keep data and runs here instead of a temp dir")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines on stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = QUICK if args.quick else FULL
    config = args.config or "synthetic"
    overrides = [*preset["overrides"], *args.overrides]
    counts = {key: getattr(args, key) or preset[key] for key in ("train", "val", "test")}

    from vitpcm.config import load_config

    base = load_config(config, overrides)  # fail on a bad config before any work
    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="vitpcm-bench-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data_start = time.perf_counter()
        data = make_data(work, **counts, size=args.size, seed=args.seed)
        data_seconds = time.perf_counter() - data_start
        oracle = grid_oracle_miou(base, data, "test")
        rows = []
        for pooling in args.pooling or POOLINGS:
            cfg = load_config(config, [*overrides, f"model.pooling={pooling}"])
            rows.append(train_and_test(cfg, data, work / f"run-{pooling}", not args.quiet))

    command = " ".join(["python bench/learning.py", *(argv if argv is not None else sys.argv[1:])])
    context = {
        "command": command,
        "config": config,
        "overrides": overrides,
        "data": {**counts, "size": args.size, "seed": args.seed, "seconds": round(data_seconds, 1)},
        "grid_oracle_test_miou": round(oracle, 4),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "date": started.isoformat(timespec="seconds"),
        "load_average_at_start": [round(x, 2) for x in load_before],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(format_table(rows))
    print()
    for key, value in context.items():
        print(f"{key}: {value}")
    if args.json:
        payload = {"rows": rows, **context}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
