"""Benchmark the ViT-PCM train step against this machine's dense-matmul ceiling.

Run: ``python bench/train_step.py [--model vit_s16] [--size 384] [--batch 4] [--json PATH]``
(``--device gpu`` switches the defaults to ViT-B/16, batch 16, bfloat16 and XLA).

The step is the real one: :class:`vitpcm.training_loop.TrainingLoop` builds the model, the
optimizers and the distributed ``tf.function`` exactly as ``vitpcm train`` does, in the
fine-tuning phase (the last ``train.unfreeze_blocks`` blocks, the final LayerNorm, the
HV-BiLSTM and the classifier learn), with the ET loss, on one synthetic in-memory batch.

Every configuration (precision x XLA, and the earlier three-pass step with
``--baseline``) is built first and then timed in interleaved rounds, so all share the
neighbours' load; each round also times the ceiling, a large square matmul
(``--matmul-size``) in the step's precision and in fp32. Figures per configuration:

* images/s (best round) and process CPU seconds per image (load cannot flatter those);
* *executed* FLOPs per image (:mod:`flops`): read off the optimized HLO where XLA runs
  (XLA merges duplicated work), counted analytically for graph mode (say which);
* those FLOP/s as a fraction of the measured matmul ceiling (median over rounds of each
  round's ratio), of the fp32 matmul, and of the CPU's FMA peak (ISA, clock and cores from
  /proc/cpuinfo; per CPU-second against one core's peak too); on a GPU, of the datasheet
  peak (MFU);
* plain speed ratios: the one-pass step vs the earlier one, bf16 vs fp32, XLA vs not, each
  by wall clock (median of per-round ratios) and by CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bench/ is this script's folder, hence first on sys.path when it runs.
from common import run_context
from flops import cpu_peak, dims_from_config, executed_flops, hlo_flops

# Datasheet dense peaks (FLOP/s) for the MFU of GPU runs: bfloat16 tensor cores, float32 (TF32
# would be higher: the float32 figure here is plain FP32).
GPU_PEAKS = {
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "L4": {"bf16": 121e12, "fp32": 30e12},
}
PRECISIONS = ("fp32", "bf16")


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
    model: str,
    size: int,
    batch: int,
    precision: str,
    xla: bool,
    sets: list[str],
    fused: bool = True,
) -> Any:
    """The ``voc12`` recipe for ``model`` at ``size`` px, with the bench's settings."""
    from vitpcm.config import load_config
    from vitpcm.model.backbones import BACKBONES

    overrides = [
        "model.pretrained=null",  # speed only: no checkpoint download
        f"model.backbone={model}",
        f"data.image_size={size}",
        f"model.pos_embed_grid={size // BACKBONES[model].patch_size}",
        f"train.et.view_size={size // 2}",
        f"train.batch_size={batch}",
        f"train.mixed_precision={precision == 'bf16'}",
        f"train.jit_compile={xla}",
        f"train.fused_step={fused}",
        *sets,
    ]
    return load_config(f"voc12_{model}", overrides)


def build_step(cfg: Any) -> tuple[Any, Any]:
    """``(step, loop)``: the fine-tuning train step as ``vitpcm train`` builds it."""
    import keras
    import tensorflow as tf

    from vitpcm.distribute import make_strategy
    from vitpcm.training_loop import TrainingLoop, schedule

    tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if cfg.train.mixed_precision else "float32"
    )
    keras.utils.set_random_seed(cfg.train.seed)
    strategy = make_strategy()
    loop = TrainingLoop(cfg, strategy, cfg.data.num_classes, cfg.train.batch_size)
    loop.enter_phase(schedule(cfg)[-1])
    return loop._step_fn, loop


@dataclass
class Config:
    """One measured configuration and its per-round timings."""

    precision: str
    xla: bool
    fused: bool
    cfg: Any
    step: Any = None
    batch: Any = None
    matmul: Any = None
    reference: Any = None
    first_step_s: float = 0.0
    loss: float = 0.0
    flops: dict[str, Any] = field(default_factory=dict)
    # (step wall s, step CPU s, matmul s, fp32 matmul s) per round, per step
    rounds: list[tuple[float, float, float, float]] = field(default_factory=list)

    @property
    def name(self) -> str:
        path = "" if self.fused else ", earlier three-pass step"
        return f"{self.precision}, XLA {'on' if self.xla else 'off'}{path}"


def prepare(args: argparse.Namespace, c: Config) -> None:
    """Build the step, count its FLOPs, compile it and run one warm step."""
    c.step, _loop = build_step(c.cfg)
    c.batch = synthetic_batch(c.cfg, args.batch)
    dims = dims_from_config(c.cfg)
    analytic = executed_flops(dims, c.fused)
    c.flops = {"analytic": analytic["executed"], "convention": analytic["convention"]}
    c.flops.update(method="analytic (graph mode runs every pass it is given)")
    if c.xla:
        hlo = c.step.replica_step.experimental_get_compiler_ir(c.batch)(stage="optimized_hlo")
        counted = hlo_flops(hlo, loop_trips=dims.image_size // dims.patch_size)
        c.flops.update(
            hlo=counted["total"] / args.batch,
            hlo_loops=int(counted["loops"]),
            method="XLA optimized HLO (dot, convolution, oneDNN matmul; loops x grid side)",
        )
    c.flops["executed"] = c.flops.get("hlo", c.flops["analytic"])
    c.matmul = matmul_timer(args.matmul_size, c.precision)
    c.reference = c.matmul if c.precision == "fp32" else matmul_timer(args.matmul_size, "fp32")
    start = time.perf_counter()
    c.loss = float(c.step(c.batch)["loss"])  # tracing and compilation
    c.first_step_s = time.perf_counter() - start
    float(c.step(c.batch)["loss"])  # one warm step: allocator and thread pools settle


def time_round(c: Config, steps: int) -> None:
    """One round: ``steps`` steps between two samples of each matmul (faster kept)."""
    before, before_reference = c.matmul(), c.reference()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        c.loss = float(c.step(c.batch)["loss"])
    wall = (time.perf_counter() - wall) / steps
    cpu = (time.process_time() - cpu) / steps
    c.rounds.append((wall, cpu, min(before, c.matmul()), min(before_reference, c.reference())))


def figures(c: Config, args: argparse.Namespace, peak: dict[str, Any] | None, gpu: float | None):
    """The JSON figures of one configuration."""
    batch, n3 = args.batch, 2.0 * args.matmul_size**3
    executed = c.flops["executed"]
    wall = min(r[0] for r in c.rounds)
    images_per_s = batch / wall
    achieved = images_per_s * executed
    per_round = [batch / r[0] * executed / (n3 / r[2]) for r in c.rounds]
    per_round_fp32 = [batch / r[0] * executed / (n3 / r[3]) for r in c.rounds]
    cpu_per_image = statistics.median(r[1] for r in c.rounds) / batch
    out: dict[str, Any] = {
        "name": c.name,
        "precision": c.precision,
        "xla": c.xla,
        "fused": c.fused,
        "batch": batch,
        "images_per_s": round(images_per_s, 3),
        "cpu_s_per_image": round(cpu_per_image, 3),
        "first_step_s": round(c.first_step_s, 1),
        "executed_gflop_per_image": round(executed / 1e9, 2),
        "analytic_gflop_per_image": round(c.flops["analytic"] / 1e9, 2),
        "convention_gflop_per_image": round(c.flops["convention"] / 1e9, 2),
        "flops_method": c.flops["method"],
        "gflops": round(achieved / 1e9, 1),
        "ceiling_gflops": round(n3 / min(r[2] for r in c.rounds) / 1e9, 1),
        "fp32_ceiling_gflops": round(n3 / min(r[3] for r in c.rounds) / 1e9, 1),
        "ratio": round(statistics.median(per_round), 3),
        "ratio_of_bests": round(achieved / (n3 / min(r[2] for r in c.rounds)), 3),
        "ratio_to_fp32_ceiling": round(statistics.median(per_round_fp32), 3),
        "loss": round(c.loss, 4),
        "rounds_s": [[round(x, 4) for x in r] for r in c.rounds],
    }
    if "hlo" in c.flops:
        out["hlo_loops"] = c.flops["hlo_loops"]
    if peak:
        out["peak_ratio"] = round(achieved / peak[c.precision], 3)
        # FLOPs per CPU-second against one core's peak: the share of the cores the step
        # had that it turned into matmul work, whatever the neighbours did.
        out["cpu_time_peak_ratio"] = round(
            executed / cpu_per_image / (peak[c.precision] / peak["cores"]), 3
        )
    if gpu:
        out["mfu"] = round(achieved / gpu, 3)
    return out


def _ratio(a: Config, b: Config, batch: int) -> dict[str, float]:
    """Speed of ``a`` over ``b``: wall clock (median of per-round ratios) and CPU time."""
    wall = statistics.median(rb[0] / ra[0] for ra, rb in zip(a.rounds, b.rounds, strict=True))
    cpu = statistics.median(rb[1] for rb in b.rounds) / statistics.median(r[1] for r in a.rounds)
    return {
        "wall": round(wall, 3),
        "best_wall": round(min(r[0] for r in b.rounds) / min(r[0] for r in a.rounds), 3),
        "cpu_time": round(cpu, 3),
        "executed_flops": round(a.flops["executed"] / b.flops["executed"], 3),
    }


def comparisons(configs: list[Config], batch: int) -> dict[str, Any]:
    """Plain speed ratios between the measured configurations."""
    find = {(c.precision, c.xla, c.fused): c for c in configs}
    out: dict[str, Any] = {}
    for xla in (False, True):
        new, old = find.get(("fp32", xla, True)), find.get(("fp32", xla, False))
        if new and old:
            out[f"one_pass_vs_three_pass_xla_{'on' if xla else 'off'}"] = _ratio(new, old, batch)
        bf16, fp32 = find.get(("bf16", xla, True)), find.get(("fp32", xla, True))
        if bf16 and fp32:
            out[f"bf16_vs_fp32_xla_{'on' if xla else 'off'}"] = _ratio(bf16, fp32, batch)
    for precision in PRECISIONS:
        on, off = find.get((precision, True, True)), find.get((precision, False, True))
        if on and off:
            out[f"xla_vs_graph_{precision}"] = _ratio(on, off, batch)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from vitpcm.config import available_configs
    from vitpcm.model.backbones import BACKBONES

    recipes = [name for name in BACKBONES if f"voc12_{name}" in available_configs()]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--model", choices=recipes, help="backbone (default: vit_s16 on CPU, vit_b16 on GPU)"
    )
    parser.add_argument("--size", type=int, default=384, help="image side in px")
    parser.add_argument("--batch", type=int, help="per-step batch, multiple of 4 (CPU 4, GPU 16)")
    parser.add_argument(
        "--precision", nargs="+", choices=PRECISIONS, help="default: both on CPU, bf16 on GPU"
    )
    parser.add_argument(
        "--xla", nargs="+", choices=("off", "on"), help="default: off on CPU, on on GPU"
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also time the earlier three-pass step (train.fused_step=false; fp32, XLA off, "
        "the earlier default), interleaved with the others",
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--matmul-size", type=int, help="ceiling matmul side (CPU 3072, GPU 8192)")
    parser.add_argument("--fma-units", type=int, default=2, help="FMA units per core (peak)")
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
    """Measure every requested configuration, interleaved; return the figures."""
    from tqdm.auto import tqdm

    device = select_device(args.device)
    wanted = [(p, x, True) for p in args.precision for x in args.xla]
    if args.baseline:
        wanted.append(("fp32", False, False))
    configs = []
    for precision, xla, fused in wanted:
        cfg = make_config(args.model, args.size, args.batch, precision, xla, args.set, fused)
        configs.append(Config(precision, xla, fused, cfg))
    for c in tqdm(configs, desc="build and compile", unit="config"):
        prepare(args, c)
    for _ in tqdm(range(args.rounds), desc="timed rounds", unit="round"):
        for c in configs:
            time_round(c, args.steps)
    peak = cpu_peak(args.fma_units) if args.device == "cpu" else None
    results = []
    for c in configs:
        gpu = gpu_peak(device, c.precision) if args.device == "gpu" else None
        results.append(figures(c, args, peak, gpu))
        print(json.dumps(results[-1]), flush=True)
    dims = dims_from_config(configs[0].cfg)
    return {
        "benchmark": "train_step",
        "model": args.model,
        "image_size": args.size,
        "phase": f"finetune (last {dims.unfreeze_blocks} of {dims.depth} blocks trained)",
        "matmul_size": args.matmul_size,
        "cpu_peak": peak,
        "results": results,
        "comparisons": comparisons(configs, args.batch),
        **run_context(args.command),
        "machine": device,  # the device the step ran on, not only the CPU
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "results"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
