"""Benchmark confusion-matrix accumulation on VOC-sized label maps.

Run: ``python bench/metrics.py [--images 200]``

Prints megapixels/s of :meth:`vitpcm.metrics.ConfusionMatrix.update` on 500 x 375 uint8
maps with 21 classes and ~5 % ignored (255) pixels, next to a naive per-class reference.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

from vitpcm.metrics import ConfusionMatrix

NUM_CLASSES = 21
HEIGHT, WIDTH = 375, 500


def make_maps(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(n):
        gt = rng.integers(0, NUM_CLASSES, size=(HEIGHT, WIDTH), dtype=np.uint8)
        gt[rng.random(gt.shape) < 0.05] = 255
        noise = rng.integers(0, NUM_CLASSES, size=gt.shape, dtype=np.uint8)
        pred = np.where(rng.random(gt.shape) < 0.7, np.minimum(gt, NUM_CLASSES - 1), noise)
        maps.append((gt, pred.astype(np.uint8)))
    return maps


def naive_update(matrix: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> None:
    """One boolean mask per ground-truth class: the obvious K-pass alternative."""
    for c in range(NUM_CLASSES):
        rows = pred[gt == c]
        matrix[c] += np.bincount(rows, minlength=NUM_CLASSES)


def timed(fn, maps) -> float:
    start = time.perf_counter()
    for gt, pred in maps:
        fn(gt, pred)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args(argv)
    maps = make_maps(args.images)
    megapixels = args.images * HEIGHT * WIDTH / 1e6

    cm = ConfusionMatrix(NUM_CLASSES)
    timed(cm.update, maps[:5])  # warm-up
    cm.reset()
    t_fast = min(timed(cm.update, maps) for _ in range(3)) if args.images else 0.0
    reference = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    t_naive = timed(lambda g, p: naive_update(reference, g, p), maps)
    agree = np.array_equal(cm.matrix // 3, reference)  # cm accumulated three passes

    start = time.perf_counter()
    metrics = cm.compute()
    t_compute = time.perf_counter() - start

    rows = [
        ("command", " ".join([os.path.basename(sys.executable), *sys.argv])),
        ("machine", f"{platform.platform()}, {platform.processor() or 'cpu'}"),
        ("cpu count", str(os.cpu_count())),
        ("date", datetime.datetime.now().astimezone().isoformat(timespec="seconds")),
        ("label maps", f"{args.images} x {WIDTH}x{HEIGHT} uint8, K={NUM_CLASSES}, 5% ignore"),
        ("ConfusionMatrix.update", f"{megapixels / t_fast:.0f} Mpx/s ({t_fast:.3f} s)"),
        ("naive per-class bincount", f"{megapixels / t_naive:.0f} Mpx/s ({t_naive:.3f} s)"),
        ("matrices agree", str(agree)),
        ("compute()", f"{t_compute * 1e3:.2f} ms (mIoU {metrics['miou']:.4f})"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
