"""Benchmark confusion-matrix accumulation on VOC-sized label maps.

Run: ``python bench/metrics.py [--images 200] [--json PATH]``

Prints megapixels/s of :meth:`vitpcm.metrics.ConfusionMatrix.update` on 500 x 375 uint8
maps with 21 classes and ~5 % ignored (255) pixels, next to a naive per-class reference,
and next to the per-image step that ``vitpcm eval`` runs before it: label merge of a 24 x 24
patch grid, bilinear upsampling to the label's size and arg-max
(:func:`vitpcm.eval.merged_probabilities`). The accumulation must never be the slow step.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from common import emit_figures, run_context
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


def merge_seconds_per_image(n: int, seed: int = 1) -> float:
    """Best per-image time of eval's label merge + upsampling + arg-max (24 x 24 grid, K=21)."""
    from vitpcm.eval import merged_probabilities

    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 24, 24, NUM_CLASSES)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = np.zeros((n, NUM_CLASSES), np.float32)
    labels[:, [0, 5, 12]] = 1.0
    merged_probabilities(probs[0], labels[0], HEIGHT, WIDTH).argmax(-1)  # warm-up
    best = float("inf")
    for i in range(n):
        start = time.perf_counter()
        merged_probabilities(probs[i], labels[i], HEIGHT, WIDTH).argmax(-1)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--merge-images", type=int, default=20, help="images for eval's merge")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    maps = make_maps(args.images)
    megapixels = args.images * HEIGHT * WIDTH / 1e6

    cm = ConfusionMatrix(NUM_CLASSES)
    timed(cm.update, maps[:5])  # warm-up
    cm.reset()
    t_fast = min(timed(cm.update, maps) for _ in range(3))
    reference = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    t_naive = timed(lambda g, p: naive_update(reference, g, p), maps)
    agree = np.array_equal(cm.matrix // 3, reference)  # cm accumulated three passes

    start = time.perf_counter()
    metrics = cm.compute()
    t_compute = time.perf_counter() - start
    update_ms = 1e3 * t_fast / args.images
    merge_ms = 1e3 * merge_seconds_per_image(args.merge_images)

    figures = {
        "benchmark": "metrics",
        "label_maps": f"{args.images} x {WIDTH}x{HEIGHT} uint8, K={NUM_CLASSES}, 5% ignore",
        "update_megapixels_per_s": round(megapixels / t_fast, 1),
        "naive_megapixels_per_s": round(megapixels / t_naive, 1),
        "matrices_agree": bool(agree),
        "update_ms_per_image": round(update_ms, 3),
        "eval_merge_upsample_argmax_ms_per_image": round(merge_ms, 3),
        "update_share_of_both": round(update_ms / (update_ms + merge_ms), 3),
        "compute_ms": round(t_compute * 1e3, 2),
        "miou": round(metrics["miou"], 4),
        **run_context(
            " ".join(["python bench/metrics.py", *(sys.argv[1:] if argv is None else argv)])
        ),
    }
    emit_figures(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
