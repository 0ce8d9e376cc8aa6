"""Where a train step's time goes: TensorFlow's profiler over `vitpcm train`'s own step.

Builds the step as ``bench/train_step.py`` does (fine-tuning phase, one in-memory batch),
warms it up, traces ``--steps`` steps with ``tf.profiler`` and sums the host op events by op
type and by model part (encoder blocks, their gradients, the rest). Op time is summed over
TensorFlow's compute threads, so with ops running side by side it exceeds the wall clock;
the shares are what to read.

    python bench/profile_step.py --set=model.backbone_dropout=0.0 --top 20
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from common import run_context  # noqa: E402


def part_of(op_name: str) -> str:
    """The model part an op belongs to, from its name scope."""
    scope = op_name.split(":")[0]
    grad = "gradient " if "gradient_tape" in scope else ""
    for part in ("encoderblock", "hv_bilstm", "horizontal", "vertical", "patch_classifier"):
        if part in scope:
            part = "HV-BiLSTM" if part in ("hv_bilstm", "horizontal", "vertical") else part
            return grad + part.replace("encoderblock", "encoder blocks")
    if scope.startswith(("adam", "Adam")):
        return "optimizer"
    return grad + "other"


def op_times(
    xspace_path: str,
) -> tuple[collections.Counter, collections.Counter, collections.Counter]:
    """(seconds by op type, calls by op type, seconds by model part) from one XSpace file."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    space.ParseFromString(Path(xspace_path).read_bytes())
    seconds: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    parts: collections.Counter = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                meta = plane.event_metadata[event.metadata_id]
                if not meta.display_name:  # executor bookkeeping, not an op
                    continue
                duration = event.duration_ps / 1e12
                seconds[meta.display_name] += duration
                calls[meta.display_name] += 1
                parts[part_of(meta.name)] += duration
    return seconds, calls, parts


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tensorflow as tf

    from train_step import build_step, make_config, synthetic_batch

    cfg = make_config(args.model, args.size, args.batch, "fp32", False, args.set)
    step, _ = build_step(cfg)
    batch = synthetic_batch(cfg, args.batch)
    for _ in range(2):
        step(batch)["loss"].numpy()
    wall = time.perf_counter()
    cpu = time.process_time()
    for _ in range(args.steps):
        step(batch)["loss"].numpy()
    wall = (time.perf_counter() - wall) / args.steps
    cpu = (time.process_time() - cpu) / args.steps
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(args.steps):
            step(batch)["loss"].numpy()
        tf.profiler.experimental.stop()
        seconds, calls, parts = op_times(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0])
    total = sum(seconds.values())
    per_step = {k: round(v / args.steps, 4) for k, v in seconds.items()}
    return {
        "benchmark": "train step profile (fp32, XLA off)",
        "model": args.model,
        "image_size": args.size,
        "batch": args.batch,
        "step_wall_s": round(wall, 3),
        "step_cpu_s": round(cpu, 3),
        "op_s_per_step": round(total / args.steps, 3),
        "ops_per_step": sum(calls.values()) // args.steps,
        "by_op_type": [
            {
                "op": k,
                "s": per_step[k],
                "share": round(v / total, 3),
                "calls": calls[k] // args.steps,
            }
            for k, v in seconds.most_common(args.top)
        ],
        "by_part": [
            {"part": k, "s": round(v / args.steps, 4), "share": round(v / total, 3)}
            for k, v in parts.most_common()
        ],
        **run_context("python bench/profile_step.py " + " ".join(sys.argv[1:])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_s16", choices=["vit_s16", "vit_b16"])
    parser.add_argument("--size", type=int, default=384, help="image side in px")
    parser.add_argument("--batch", type=int, default=4, help="per-step batch, multiple of 4")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps")
    parser.add_argument("--top", type=int, default=20, help="op types to list")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    figures = run(args)
    print(
        f"step {figures['step_wall_s']} s wall, {figures['step_cpu_s']} CPU s; "
        f"{figures['op_s_per_step']} op s in {figures['ops_per_step']} ops"
    )
    for row in figures["by_op_type"]:
        print(
            f"  {row['op']:32s} {row['s']:8.3f} s {100 * row['share']:5.1f}%  {row['calls']} calls"
        )
    for row in figures["by_part"]:
        print(f"  {row['part']:32s} {row['s']:8.3f} s {100 * row['share']:5.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
