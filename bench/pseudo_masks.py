"""``vitpcm test --crf`` at 960 px (ViT-S/16): images/s with the workers on all cores vs one.

Run: ``python bench/pseudo_masks.py [--images 6] [--json PATH]``.

A small synthetic split (``vitpcm data synth``, ``--size`` px images with masks) is converted
and run through :func:`vitpcm.infer.run_test` -- what ``vitpcm test --crf`` runs -- with a
ViT-S/16 model (random weights: the speed does not depend on them; the CRF sees the present
classes only, as always) at ``data.test_size`` 960, once with ``crf.workers=1`` (everything in
the main process) and once with all cores, in alternating order. Each run's wall time, the
main process's CPU time and its workers' CPU time are recorded.

Projections for VOC ``trainaug`` (10,582 images), stated as such:

* this machine: 10,582 / the all-cores images/s (wall clock, stretched by any load), and
  10,582 x the CPU seconds per image (main process and workers) / the cores (load-free);
* one GPU: the forward at the analytic FLOPs (:mod:`flops`) and an assumed 40% MFU of an
  H100's bf16 peak, overlapped with the per-image post-processing (the measured CPU seconds
  per image outside the forward) spread over 8 or 16 host cores; the slower of the two.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import run_context
from flops import Dims, forward_flops

TRAINAUG = 10_582
GPU_BF16_PEAK = 989e12  # H100 SXM dense bf16
ASSUMED_MFU = 0.4


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


OVERRIDES = [
    "model.backbone=vit_s16", "model.patch_size=16", "model.hidden_dim=384", "model.depth=12",
    "model.num_heads=6", "model.mlp_dim=1536", "model.lstm_units=192", "model.pos_embed_grid=24",
    "data.image_size=384", "data.test_size=960", "eval.batch_size=2", "train.et.view_size=192",
    "train.et.crop_size=128",
]  # fmt: skip


def prepare(root: Path, images: int, size: int) -> tuple[Path, Path]:
    """(data folder, model file) for the runs."""
    import keras

    from vitpcm.config import load_config
    from vitpcm.model.vitpcm import build_vitpcm

    script = Path(sys.executable).with_name("vitpcm")
    vitpcm = [str(script) if script.exists() else "vitpcm"]
    raw, data = root / "raw", root / "tfrecords"
    subprocess.run(
        [*vitpcm, "data", "synth", "--out", str(raw), "--train", "4", "--val", "2", "--test",
         str(images), "--size", str(size), "--no-progress"], check=True,
    )  # fmt: skip
    subprocess.run(
        [*vitpcm, "data", "convert", "--dataset", "voc12", "--src", str(raw), "--out",
         str(data), "--no-progress"], check=True,
    )  # fmt: skip
    cfg = load_config("synthetic", OVERRIDES)
    keras.utils.set_random_seed(0)
    model = build_vitpcm(cfg.model, cfg.data.num_classes)
    path = root / "model.keras"
    model.save(path)
    return data, path


def timed_run(model: Path, data: Path, out: Path, workers: int) -> dict[str, float]:
    """One ``vitpcm test --crf`` run: wall s, main-process CPU s, workers' CPU s."""
    from vitpcm.config import load_config
    from vitpcm.infer import run_test

    run_cfg = load_config("synthetic", [*OVERRIDES, f"crf.workers={workers}"])
    wall, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
    metrics = run_test(run_cfg, str(model), data_uri=str(data), out_dir=str(out), crf=True,
                       split="test", progress=False)  # fmt: skip
    return {
        "wall_s": time.perf_counter() - wall,
        "main_cpu_s": time.process_time() - cpu,
        "workers_cpu_s": _children_cpu() - children,
        "images": metrics["num_images"],
    }


def project(runs: dict[int, list[dict[str, float]]], cores: int) -> dict[str, Any]:
    """Per-image figures and the VOC trainaug projections (see the module docstring)."""
    best = {w: min(r["wall_s"] / r["images"] for r in rs) for w, rs in runs.items()}
    one, every = best[1], best[cores]
    # Outside the forward: the workers' CPU per image in the all-cores runs.
    post = min(r["workers_cpu_s"] / r["images"] for r in runs[cores])
    d = Dims(960, 16, 384, 12, 1536, 192, 21, 0)
    f = forward_flops(d)
    forward_gflop = (f["patch_embedding"] + f["blocks"] + f["hv_bilstm"] + f["classifier"]) / 1e9
    gpu_forward_s = forward_gflop * 1e9 / (GPU_BF16_PEAK * ASSUMED_MFU)
    gpu = {
        f"{host}_host_cores_h": round(TRAINAUG * max(gpu_forward_s, post / host) / 3600, 2)
        for host in (8, 16)
    }
    # Load cannot stretch CPU seconds: all CPU per image (forward, workers) over the cores.
    cpu_per_image = min((r["main_cpu_s"] + r["workers_cpu_s"]) / r["images"] for r in runs[cores])
    return {
        "cpu_s_per_image": round(cpu_per_image, 3),
        "projected_trainaug_here_cpu_time_h": round(TRAINAUG * cpu_per_image / cores / 3600, 2),
        "images_per_s_one_worker": round(1 / one, 3),
        "images_per_s_all_cores": round(1 / every, 3),
        "speedup": round(one / every, 3),
        "postprocess_cpu_s_per_image": round(post, 3),
        "forward_gflop_per_image": round(forward_gflop, 1),
        "projected_trainaug_here_h": round(TRAINAUG * every / 3600, 2),
        "projected_trainaug_one_gpu_h": gpu,
        "gpu_forward_s_per_image": round(gpu_forward_s, 4),
    }


def main(argv: list[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6, help="test images")
    parser.add_argument("--size", type=int, default=480, help="synthetic image side (px)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating runs per setting")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    command = " ".join(["python bench/pseudo_masks.py", *(sys.argv[1:] if argv is None else argv)])
    cores = os.cpu_count() or 1
    runs: dict[int, list[dict[str, float]]] = {1: [], cores: []}
    with tempfile.TemporaryDirectory() as tmp:
        data, model = prepare(Path(tmp), args.images, args.size)
        for index in range(args.rounds):
            for workers in (1, cores) if index % 2 == 0 else (cores, 1):
                out = Path(tmp, f"out-{workers}-{index}")
                runs[workers].append(timed_run(model, data, out, workers))
                print(f"workers {workers}: {runs[workers][-1]}", flush=True)
    figures = {
        "benchmark": "pseudo_masks",
        "images": args.images,
        "image_size": args.size,
        "cores": cores,
        "runs": {str(w): r for w, r in runs.items()},
        **project(runs, cores),
        **run_context(command),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
