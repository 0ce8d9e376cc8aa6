"""Benchmark the data path: TFRecord conversion (1 vs 2 workers) and the training reader.

Run: ``python bench/data.py [--images 600] [--size 448] [--json PATH]``

Figures, measured in one run so their ratios are meaningful on a noisy machine:

1. ``vitpcm data convert`` images/s with 1 and 2 worker processes on a synthetic VOC-layout
   dataset of VOC-sized JPEGs, their ratio, and whether the two outputs are byte-identical;
2. reader images/s for the 384-px training views (main view + ET second view, colour jitter,
   flips, crops) as configured in ``configs/voc12_vit_s16.yaml``.
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def _convert(src: Path, out: Path, workers: int, shards: int) -> float:
    from vitpcm.data.convert import convert_dataset

    start = time.perf_counter()
    info = convert_dataset("voc12", src, out, shards=shards, workers=workers, progress=False)
    elapsed = time.perf_counter() - start
    images = sum(split["num_examples"] for split in info["splits"].values())
    return images / elapsed


def _identical(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600, help="train images (val = 1/4)")
    parser.add_argument("--size", type=int, default=448, help="synthetic image side in px")
    parser.add_argument("--shards", type=int, default=8, help="shards per split")
    parser.add_argument("--batches", type=int, default=20, help="reader batches to time")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--workdir", help="keep the data here instead of a temp dir")
    args = parser.parse_args(argv)

    from vitpcm.config import load_config
    from vitpcm.data.reader import dataset_from_config, measure_throughput
    from vitpcm.data.synth import make_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        src = work / "raw"
        make_synthetic(src, train=args.images, val=args.images // 4, test=0, size=args.size,
                       seed=0, progress=False)  # fmt: skip
        one = _convert(src, work / "w1", workers=1, shards=args.shards)
        two = _convert(src, work / "w2", workers=2, shards=args.shards)
        identical = _identical(work / "w1", work / "w2")

        cfg = load_config(
            "voc12_vit_s16",
            ["data.train_split=train", "train.batch_size=16", "data.num_classes=6"],
        )
        ds = dataset_from_config(cfg, "train", training=True, uri=str(work / "w1"))
        reader = measure_throughput(ds.repeat(), args.batches, warmup=2)

    figures = {
        "convert_images_per_s_1_worker": round(one, 1),
        "convert_images_per_s_2_workers": round(two, 1),
        "convert_speedup_2_vs_1": round(two / one, 2),
        "convert_byte_identical": identical,
        "reader_images_per_s_384px_et_views": round(reader, 1),
        "images": args.images + args.images // 4,
        "image_size": args.size,
        "command": "python bench/data.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.platform()}",
        "load_average": round(os.getloadavg()[0], 2),
        "date": datetime.date.today().isoformat(),
    }
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
