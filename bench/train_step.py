"""Benchmark the ViT-PCM train step against this machine's dense-matmul ceiling.

Run: ``python bench/train_step.py [--model vit_s16] [--size 384] [--batch 4] [--json PATH]``
(``--device gpu`` switches the defaults to ViT-B/16, batch 16, bfloat16 and XLA).

The step is the real one: :class:`vitpcm.train._TrainingLoop` builds the model, the
optimizers and the distributed ``tf.function`` exactly as ``vitpcm train`` does, in the
fine-tuning phase (the last ``train.unfreeze_blocks`` blocks, the final LayerNorm, the
HV-BiLSTM and the classifier learn), with the ET loss, on one synthetic in-memory batch.

FLOPs are counted analytically (matmuls and convolutions, 2 per multiply-add; element-wise
ops, softmax and norms left out, as usual). Per image the step runs the main view forward and
backward, a no-gradient target pass on the main view, and a forward and backward pass on a
quarter of a 2x2 mosaic of second views. Two counts are given:

* ``convention``: the usual "backward = 2x forward" rule for every trained pass, i.e.
  3 + 1 + 3/4 = 4.75 forward passes per image, whatever is frozen;
* ``required``: what this step must compute: frozen layers need no backward at all, trained
  ones need 2x their forward.

The ceiling is a large square matmul (``--matmul-size``) in the step's precision, timed in
the same run: each of ``--rounds`` rounds times the step between two matmul samples, so
both share the neighbours' load; the ratio is the median over rounds (the ratio of the
best step to the best matmul is given too). On a GPU the utilisation is also given
against the datasheet peak (MFU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# bench/ is this script's folder, hence first on sys.path when it runs.
from common import run_context

# Datasheet dense peaks (FLOP/s) for the MFU of GPU runs: bfloat16 tensor cores, float32 (TF32
# would be higher: the float32 figure here is plain FP32).
GPU_PEAKS = {
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "L4": {"bf16": 121e12, "fp32": 30e12},
}
PRECISIONS = ("fp32", "bf16")


# ----------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class Dims:
    """What the FLOP count depends on."""

    image_size: int
    patch_size: int
    hidden_dim: int
    depth: int
    mlp_dim: int
    lstm_units: int
    num_classes: int
    unfreeze_blocks: int


def dims_from_config(cfg: Any) -> Dims:
    """The :class:`Dims` of a resolved config."""
    m = cfg.model
    return Dims(
        cfg.data.image_size,
        m.patch_size,
        m.hidden_dim,
        m.depth,
        m.mlp_dim,
        m.lstm_units,
        cfg.data.num_classes,
        cfg.train.unfreeze_blocks,
    )


def forward_flops(d: Dims) -> dict[str, float]:
    """Forward FLOPs of one image, per part of the network."""
    patches = (d.image_size // d.patch_size) ** 2
    tokens = patches + 1
    dim, mlp, units = d.hidden_dim, d.mlp_dim, d.lstm_units
    block = (
        2 * tokens * dim * 3 * dim  # query, key, value
        + 2 * 2 * tokens * tokens * dim  # scores and weighted values
        + 2 * tokens * dim * dim  # output projection
        + 2 * 2 * tokens * dim * mlp  # MLP
    )
    return {
        "patch_embedding": 2.0 * patches * d.patch_size**2 * 3 * dim,
        "block": float(block),
        "blocks": float(block * d.depth),
        # Four LSTMs (row/column x forward/backward) each see every patch once; a step is
        # one (input + recurrent) x 4 gates product.
        "hv_bilstm": 4 * 2.0 * patches * (dim + units) * 4 * units,
        "classifier": 2.0 * patches * 4 * units * d.num_classes,
    }


def train_step_flops(d: Dims) -> dict[str, float]:
    """FLOPs of one image's share of a train step (main view + target pass + 1/4 mosaic)."""
    f = forward_flops(d)
    forward = f["patch_embedding"] + f["blocks"] + f["hv_bilstm"] + f["classifier"]
    trained = f["hv_bilstm"] + f["classifier"] + f["block"] * min(d.unfreeze_blocks, d.depth)
    if d.unfreeze_blocks >= d.depth:
        trained += f["patch_embedding"]
    trained_passes = 1.0 + 0.25  # the main view, and a quarter of a mosaic
    return {
        "forward": forward,
        "convention": 3 * forward * trained_passes + forward,
        "required": (forward + 2 * trained) * trained_passes + forward,
    }


# ----------------------------------------------------------------------------- timing


def select_device(device: str) -> str:
    """Hide the GPUs for ``cpu``; check one is there for ``gpu``. Returns a description."""
    import tensorflow as tf

    if device == "cpu":
        tf.config.set_visible_devices([], "GPU")
        return f"CPU: {cpu_name()}, {os.cpu_count()} cores"
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        raise SystemExit("--device gpu: TensorFlow sees no GPU here; run with --device cpu")
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"GPU: {details.get('device_name', 'unknown')} x{len(gpus)}"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_timer(n: int, precision: str) -> Any:
    """A function timing one n x n x n matmul in ``precision`` (seconds)."""
    import tensorflow as tf

    dtype = tf.bfloat16 if precision == "bf16" else tf.float32
    a = tf.cast(tf.random.normal((n, n), seed=1), dtype)
    b = tf.cast(tf.random.normal((n, n), seed=2), dtype)

    @tf.function
    def product(x: Any, y: Any) -> Any:
        # One element fetched: synchronises without copying the result.
        return tf.matmul(x, y)[0, 0]

    product(a, b).numpy()

    def timed() -> float:
        start = time.perf_counter()
        product(a, b).numpy()
        return time.perf_counter() - start

    return timed


def synthetic_batch(cfg: Any, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """One training batch as the reader yields it: views, labels and view parameters."""
    import tensorflow as tf

    from vitpcm.model.equivariance import sample_view_params

    size, patch, k = cfg.data.image_size, cfg.model.patch_size, cfg.data.num_classes
    grid = size // patch
    view = cfg.train.et.view_size or size // 2
    cells = max(1, min(grid, cfg.train.et.crop_size // patch))
    seeds = [tf.constant([seed, i]) for i in range(2 * batch_size)]
    params1 = [sample_view_params(s, grid, cells, 0.0) for s in seeds[:batch_size]]
    params2 = [
        sample_view_params(s, grid, cells, cfg.train.et.crop_prob) for s in seeds[batch_size:]
    ]
    classes = tf.random.stateless_uniform([batch_size], [seed, 99], 1, k, dtype=tf.int32)
    labels = tf.one_hot(tf.zeros([batch_size], tf.int32), k) + tf.one_hot(classes, k)
    return {
        "image": tf.random.stateless_uniform([batch_size, size, size, 3], [seed, 1], 0, 255),
        "labels": labels,
        "params1": tf.stack(params1),
        "view2": tf.random.stateless_uniform([batch_size, view, view, 3], [seed, 2], 0, 255),
        "params2": tf.stack(params2),
    }


def make_config(
    model: str, size: int, batch: int, precision: str, xla: bool, sets: list[str]
) -> Any:
    """The ``voc12`` recipe for ``model`` at ``size`` px, with the bench's settings."""
    from vitpcm.config import load_config

    base = "voc12_vit_b16" if model == "vit_b16" else "voc12_vit_s16"
    overrides = [
        "model.pretrained=null",  # speed only: no checkpoint download
        f"model.backbone={model}",
        f"data.image_size={size}",
        f"model.pos_embed_grid={size // 16}",
        f"train.et.view_size={size // 2}",
        f"train.batch_size={batch}",
        f"train.mixed_precision={precision == 'bf16'}",
        f"train.jit_compile={xla}",
        *sets,
    ]
    return load_config(base, overrides)


def build_step(cfg: Any) -> tuple[Any, Any]:
    """``(step, loop)``: the fine-tuning train step as ``vitpcm train`` builds it."""
    import keras
    import tensorflow as tf

    from vitpcm.distribute import make_strategy
    from vitpcm.train import _TrainingLoop, schedule

    tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if cfg.train.mixed_precision else "float32"
    )
    keras.utils.set_random_seed(cfg.train.seed)
    strategy = make_strategy()
    loop = _TrainingLoop(cfg, strategy, cfg.data.num_classes, cfg.train.batch_size)
    loop.enter_phase(schedule(cfg)[-1])
    return loop._step_fn, loop


@dataclass
class StepResult:
    """What one configuration measured: per round, the step time and the matmul time."""

    precision: str
    xla: bool
    batch: int
    first_step_s: float
    rounds: list[tuple[float, float, float]]
    loss: float

    def as_dict(
        self, d: Dims, n: int, peak: float | None, best_fp32_matmul: float
    ) -> dict[str, Any]:
        flops = train_step_flops(d)
        matmul_flops = 2.0 * n**3
        step_s = min(step for step, _, _ in self.rounds)
        ceiling = matmul_flops / min(matmul for _, matmul, _ in self.rounds)
        images_per_s = self.batch / step_s
        out: dict[str, Any] = {
            "precision": self.precision,
            "xla": self.xla,
            "batch": self.batch,
            "images_per_s": round(images_per_s, 3),
            "first_step_s": round(self.first_step_s, 1),
            "step_s": round(step_s, 3),
            # Each round's speed scaled to an unloaded machine (by how much slower this
            # round's fp32 matmul ran than the run's best), median over rounds: comparable
            # across settings measured minutes apart.
            "images_per_s_normalised": round(
                statistics.median(
                    self.batch / step * fp32 / best_fp32_matmul for step, _, fp32 in self.rounds
                ),
                3,
            ),
            "ceiling_gflops": round(ceiling / 1e9, 1),
            "loss": round(self.loss, 4),
            "rounds_s": [[round(x, 4) for x in times] for times in self.rounds],
        }
        for kind in ("convention", "required"):
            achieved = images_per_s * flops[kind]
            out[f"{kind}_gflops"] = round(achieved / 1e9, 1)
            # Each round's step against the matmul timed right around it (same neighbours),
            # median over rounds; the ratio of the two bests is given too.
            per_round = sorted(
                (self.batch / step * flops[kind]) / (matmul_flops / matmul)
                for step, matmul, _ in self.rounds
            )
            out[f"{kind}_ratio"] = round(statistics.median(per_round), 3)
            out[f"{kind}_ratio_of_bests"] = round(achieved / ceiling, 3)
            if peak:
                out[f"{kind}_mfu"] = round(achieved / peak, 3)
        return out


def measure_step(
    step: Any, batch: dict[str, Any], steps: int, rounds: int, matmul: Any, reference: Any
) -> tuple[float, list[tuple[float, float, float]], float]:
    """``(first step s, [(step s, matmul s, fp32 matmul s)] per round, last loss)``.

    Each round times ``steps`` steps between two samples of the matmul in the step's
    precision (and of the fp32 one, which puts rounds of every configuration on one scale),
    keeping the faster samples, so a round's figures share the neighbours' load.
    """
    start = time.perf_counter()
    loss = float(step(batch)["loss"])  # tracing and compilation
    first = time.perf_counter() - start
    float(step(batch)["loss"])  # one warm step: allocator and thread pools settle
    timings = []
    for _ in range(rounds):
        before, before_reference = matmul(), reference()
        start = time.perf_counter()
        for _ in range(steps):
            loss = float(step(batch)["loss"])
        elapsed = (time.perf_counter() - start) / steps
        timings.append((elapsed, min(before, matmul()), min(before_reference, reference())))
    return first, timings, loss


def run_config(args: argparse.Namespace, precision: str, xla: bool) -> StepResult:
    """Build and time one (precision, XLA) configuration."""
    cfg = make_config(args.model, args.size, args.batch, precision, xla, args.set)
    step, _loop = build_step(cfg)
    batch = synthetic_batch(cfg, args.batch)
    matmul = matmul_timer(args.matmul_size, precision)
    reference = matmul if precision == "fp32" else matmul_timer(args.matmul_size, "fp32")
    first, timings, loss = measure_step(step, batch, args.steps, args.rounds, matmul, reference)
    return StepResult(precision, xla, args.batch, first, timings, loss)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--model", choices=("vit_s16", "vit_b16"), help="default: S on CPU, B on GPU"
    )
    parser.add_argument("--size", type=int, default=384, help="image side in px")
    parser.add_argument("--batch", type=int, help="per-step batch, multiple of 4 (CPU 4, GPU 16)")
    parser.add_argument(
        "--precision", nargs="+", choices=PRECISIONS, help="default: both on CPU, bf16 on GPU"
    )
    parser.add_argument(
        "--xla", nargs="+", choices=("off", "on"), help="default: off on CPU, on on GPU"
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best kept)")
    parser.add_argument("--matmul-size", type=int, help="ceiling matmul side (CPU 3072, GPU 8192)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    args.command = " ".join(
        ["python bench/train_step.py", *(sys.argv[1:] if argv is None else argv)]
    )
    gpu = args.device == "gpu"
    args.model = args.model or ("vit_b16" if gpu else "vit_s16")
    args.batch = args.batch or (16 if gpu else 4)
    args.precision = args.precision or (["bf16"] if gpu else list(PRECISIONS))
    args.xla = [x == "on" for x in (args.xla or (["on"] if gpu else ["off"]))]
    args.matmul_size = args.matmul_size or (8192 if gpu else 3072)
    if args.batch % 4:
        parser.error("--batch must be a multiple of 4 (the ET mosaic tiles views in fours)")
    return args


def gpu_peak(device: str, precision: str) -> float | None:
    """The datasheet peak of a known GPU, or None."""
    for name, peaks in GPU_PEAKS.items():
        if name in device:
            return peaks[precision]
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every requested configuration; return the figures."""
    device = select_device(args.device)
    measured = []
    for precision in args.precision:
        for xla in args.xla:
            measured.append(run_config(args, precision, xla))
            print(f"{precision} XLA {'on' if xla else 'off'}: {measured[-1]}", flush=True)
    best_fp32 = min(fp32 for result in measured for _, _, fp32 in result.rounds)
    results = []
    for result in measured:
        cfg = make_config(args.model, args.size, args.batch, result.precision, result.xla, args.set)
        dims = dims_from_config(cfg)
        peak = gpu_peak(device, result.precision) if args.device == "gpu" else None
        results.append(result.as_dict(dims, args.matmul_size, peak, best_fp32))
        print(json.dumps(results[-1]), flush=True)
    flops = train_step_flops(dims)
    fastest = max(results, key=lambda r: r["images_per_s_normalised"])
    return {
        "benchmark": "train_step",
        "model": args.model,
        "image_size": args.size,
        "phase": f"finetune (last {dims.unfreeze_blocks} of {dims.depth} blocks trained)",
        "flops_method": "analytic (matmuls and convolutions)",
        "gflops_per_image": {k: round(v / 1e9, 2) for k, v in flops.items()},
        "matmul_size": args.matmul_size,
        "results": results,
        "fastest": {k: fastest[k] for k in ("precision", "xla", "images_per_s_normalised")},
        **run_context(args.command),
        "machine": device,  # the device the step ran on, not only the CPU
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures = run(args)
    print(json.dumps({k: v for k, v in figures.items() if k != "results"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
