"""Benchmark the dense CRF: present classes vs all classes, and split throughput vs workers.

Run: ``python bench/crf.py [--images 3] [--split 10] [--workers 0]``

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
import datetime
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator

import numpy as np

from vitpcm.crf import CrfParams, crf_map, crf_present_classes, crf_refine

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


def bench_present_vs_all(n: int, params: CrfParams) -> list[tuple[str, str]]:
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
    return [
        ("images (500x375, 21 ch, 2 present)", str(n)),
        ("CRF over 2 present classes, CPU s/img (median)", f"{t_present:.3f}"),
        ("CRF over all 21 classes, CPU s/img (median)", f"{t_all:.3f}"),
        ("speed-up (all / present)", f"{t_all / t_present:.1f}x"),
        ("identical label maps", f"{identical}/{n}"),
        ("pixel agreement (min)", f"{min(agree):.6f}"),
    ]


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers, once joined).

    Wall-clock throughput on a shared machine depends on what else runs (and the kernel's
    per-session fair share); CPU seconds per image show whether the pool adds work.
    """
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_throughput(n: int, workers: int, params: CrfParams) -> list[tuple[str, str]]:
    rows = []
    reference = None
    for count in (1, workers):
        cpu_start = _cpu_seconds()
        start = time.perf_counter()
        first = None
        out = []
        for _key, labels in crf_map(split_items(n), params, workers=count, progress=False):
            first = first or time.perf_counter() - start
            out.append(labels.sum(dtype=np.int64))
        elapsed = time.perf_counter() - start
        cpu = _cpu_seconds() - cpu_start
        if reference is None:
            reference = out
        same = "same labels" if out == reference else "LABELS DIFFER"
        rows.append(
            (
                f"crf_map, {count} worker(s), {n} images",
                f"{n / elapsed:.2f} img/s, {cpu / n:.2f} CPU s/img, "
                f"first result after {first:.1f} s ({same})",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3, help="images for the per-image test")
    parser.add_argument("--split", type=int, default=10, help="images for the throughput test")
    parser.add_argument("--workers", type=int, default=0, help="0 = all cores")
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args(argv)
    params = CrfParams(iterations=args.iterations)
    workers = args.workers or os.cpu_count() or 1
    rows = [
        ("command", " ".join([os.path.basename(sys.executable), *sys.argv])),
        ("machine", f"{platform.platform()}, {platform.processor() or 'cpu'}"),
        ("cpu count", str(os.cpu_count())),
        ("date", datetime.datetime.now().astimezone().isoformat(timespec="seconds")),
        ("CRF params", str(params)),
    ]
    rows += bench_present_vs_all(args.images, params)
    rows += bench_throughput(args.split, workers, params)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
