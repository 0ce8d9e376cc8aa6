"""GPU smoke figures beside the train step: one synthetic epoch, 960 px inference speed.

Run: ``python bench/gpu_extra.py epoch --json FILE`` (one epoch of ``vitpcm train`` on a
small synthetic dataset; the strategy is ``vitpcm.distribute.make_strategy``'s, a
MirroredStrategy over the visible GPUs) or ``python bench/gpu_extra.py inference --json
FILE`` (images/s of the model forward at ``--size`` px, as ``vitpcm test`` runs it).
``--dry`` shrinks both to seconds on a CPU (checks the script, measures nothing useful).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import run_context


def _device() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU (no GPU visible)"
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    return f"GPU: {name} x{len(gpus)}"


def epoch(args: argparse.Namespace) -> dict[str, Any]:
    """One training epoch (warm-up phase skipped) on a synthetic dataset, timed."""
    script = Path(sys.executable).with_name("vitpcm")
    vitpcm = [str(script) if script.exists() else "vitpcm"]
    images = 16 if args.dry else 256
    with tempfile.TemporaryDirectory() as tmp:
        raw, data, out = Path(tmp, "raw"), Path(tmp, "tfrecords"), Path(tmp, "run")
        quiet = ["--no-progress"]
        subprocess.run(
            [*vitpcm, "data", "synth", "--out", str(raw), "--train", str(images), "--val", "8",
             "--test", "8", *quiet], check=True,
        )  # fmt: skip
        subprocess.run(
            [*vitpcm, "data", "convert", "--dataset", "voc12", "--src", str(raw), "--out",
             str(data), *quiet], check=True,
        )  # fmt: skip
        sets = ["train.epochs=1", "train.warmup_epochs=0", "eval.train_miou_images=0"]
        if args.dry:
            sets += ["train.steps_per_epoch=2", "train.batch_size=4"]
        start = time.perf_counter()
        subprocess.run(
            [*vitpcm, "train", "-c", "synthetic", "--data", str(data), "--out", str(out),
             *[x for s in sets for x in ("--set", s)], *quiet], check=True,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    return {
        "figure": "one synthetic training epoch (configs/synthetic.yaml, MirroredStrategy)",
        "value": f"{images} training images in {seconds:.1f} s, process start, data and "
        "validation included",
        "seconds": round(seconds, 1),
        "images": images,
        **run_context(" ".join(["python bench/gpu_extra.py", *sys.argv[1:]])),
        "machine": _device(),
    }


def inference(args: argparse.Namespace) -> dict[str, Any]:
    """Forward images/s at ``--size`` px (B/16, bf16, as ``vitpcm test``) on one device."""
    import keras
    import tensorflow as tf

    from vitpcm.config import load_config
    from vitpcm.model.vitpcm import build_vitpcm

    size, batch, model_name = args.size, args.batch, "voc12_vit_b16"
    if args.dry:
        size, batch, model_name = 128, 2, "voc12_vit_s16"
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    cfg = load_config(model_name, ["model.pretrained=null"])
    model = build_vitpcm(cfg.model, cfg.data.num_classes)
    images = tf.random.uniform((batch, size, size, 3), 0, 255)
    # As `vitpcm test` runs it: graph mode (XLA has no bicubic resize for the position grid).
    forward = tf.function(lambda x: model(x, training=False)["patch_probs"])
    start = time.perf_counter()
    forward(images).numpy()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        forward(images).numpy()
        times.append(time.perf_counter() - start)
    best = batch / min(times)
    return {
        "figure": f"{size} px inference, {cfg.model.backbone}, bf16, graph mode, batch {batch}",
        "value": f"**{best:.1f} img/s** (best of {args.rounds}; compile {compile_s:.0f} s)",
        "images_per_s": round(best, 2),
        **run_context(" ".join(["python bench/gpu_extra.py", *sys.argv[1:]])),
        "machine": _device(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("epoch", "inference"))
    parser.add_argument("--size", type=int, default=960, help="inference image side (px)")
    parser.add_argument("--batch", type=int, default=8, help="inference batch")
    parser.add_argument("--rounds", type=int, default=5, help="timed inference batches")
    parser.add_argument("--dry", action="store_true", help="tiny sizes: check, measure nothing")
    parser.add_argument("--json", required=True, help="write the figures here")
    args = parser.parse_args(argv)
    result = epoch(args) if args.what == "epoch" else inference(args)
    print(json.dumps(result, indent=2))
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
