"""Benchmark the dense CRF: present classes vs all classes, and split throughput vs workers.

Run: ``python bench/crf.py [--images 3] [--split 24] [--workers 0] [--json PATH]``

Two figures, on synthetic VOC-sized samples (500 x 375, 21 channels, 2 present classes,
textured objects and noisy merged probabilities):

1. per-image CPU time of the CRF over the 2 present channels vs over all 21, and whether
   the label maps are identical (CPU time, because the CRF is single-threaded and wall
   time on a shared machine measures the neighbours);
2. whole-split throughput of :func:`vitpcm.crf.crf_map` (images/s wall, and CPU s/img)
   with 1 worker (in-process) and with all workers (process pool).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator

import numpy as np

from common import cpu_seconds, emit_figures, run_context
from vitpcm.config import CrfConfig
from vitpcm.crf import crf_map, crf_present_classes, crf_refine

NUM_CLASSES = 21
HEIGHT, WIDTH = 375, 500


def voc_like_sample(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A textured ellipse on a textured background, with noisy merged probabilities."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    cy, cx = rng.uniform(120, 255), rng.uniform(150, 350)
    ry, rx = rng.uniform(60, 120), rng.uniform(80, 160)
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0
    background_rgb = rng.uniform(60, 200, 3)
    object_rgb = rng.uniform(0, 255, 3)
    image = np.where(inside[..., None], object_rgb, background_rgb)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    object_class = int(rng.integers(1, NUM_CLASSES))
    # Coarse, blurry object evidence (as an upsampled patch grid would give) plus noise.
    grid = inside[::16, ::16].astype(np.float32)
    coarse = np.kron(grid, np.ones((16, 16), np.float32))[:HEIGHT, :WIDTH]
    p_object = np.clip(0.25 + 0.5 * coarse + rng.normal(0, 0.2, coarse.shape), 0.01, 0.99)
    probs = np.zeros((HEIGHT, WIDTH, NUM_CLASSES), dtype=np.float32)
    probs[..., object_class] = p_object
    probs[..., 0] = 1.0 - p_object
    labels = np.zeros(NUM_CLASSES, dtype=np.float32)
    labels[[0, object_class]] = 1.0
    return image, probs, labels


def split_items(n: int) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    for i in range(n):
        image, probs, labels = voc_like_sample(1000 + i)
        yield f"img{i:04d}", image, probs, labels


def bench_present_vs_all(n: int, params: CrfConfig) -> dict[str, object]:
    present_times, all_times, identical, agree = [], [], 0, []
    for i in range(n):
        image, probs, labels = voc_like_sample(i)
        start = time.process_time()
        present = crf_present_classes(image, probs, labels, params)
        present_times.append(time.process_time() - start)
        start = time.process_time()
        everything = crf_refine(image, probs, params)
        all_times.append(time.process_time() - start)
        identical += int(np.array_equal(present, everything))
        agree.append(float((present == everything).mean()))
    t_present, t_all = float(np.median(present_times)), float(np.median(all_times))
    return {
        "images": n,
        "present_cpu_s_per_image": round(t_present, 3),
        "all_classes_cpu_s_per_image": round(t_all, 3),
        "speedup_present_vs_all": round(t_all / t_present, 2),
        "identical_label_maps": f"{identical}/{n}",
        "all_identical": identical == n,
        "min_pixel_agreement": round(min(agree), 6),
    }


def bench_throughput(n: int, workers: int, params: CrfConfig) -> dict[str, object]:
    figures: dict[str, object] = {"split_images": n, "workers": workers}
    reference = None
    for label, count in (("1_worker", 1), ("all_workers", workers)):
        cpu_start = cpu_seconds()
        start = time.perf_counter()
        first = None
        out = []
        for _key, labels in crf_map(split_items(n), params, workers=count, progress=False):
            first = first or time.perf_counter() - start
            out.append(labels.sum(dtype=np.int64))
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds() - cpu_start
        if reference is None:
            reference = out
        figures[f"images_per_s_{label}"] = round(n / elapsed, 3)
        figures[f"cpu_s_per_image_{label}"] = round(cpu / n, 3)
        figures[f"first_result_s_{label}"] = round(first or 0.0, 2)
        figures[f"same_labels_{label}"] = out == reference
    figures["speedup_all_workers_vs_1"] = round(
        float(figures["images_per_s_all_workers"]) / float(figures["images_per_s_1_worker"]), 2
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3, help="images for the per-image test")
    parser.add_argument("--split", type=int, default=24, help="images for the throughput test")
    parser.add_argument("--workers", type=int, default=0, help="0 = all cores")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    params = CrfConfig(iterations=args.iterations)
    workers = args.workers or os.cpu_count() or 1
    figures: dict[str, object] = {
        "benchmark": "crf",
        "crf_params": str(params),
        "sample": f"{WIDTH}x{HEIGHT}, {NUM_CLASSES} channels, 2 present classes",
        **bench_present_vs_all(args.images, params),
        **bench_throughput(args.split, workers, params),
        **run_context(" ".join(["python bench/crf.py", *(sys.argv[1:] if argv is None else argv)])),
    }
    emit_figures(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
