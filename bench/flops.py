"""FLOP counts of the train step and this CPU's peak, for ``bench/train_step.py``.

Two counts of the FLOPs one train step executes (matmuls and convolutions, 2 per
multiply-add; element-wise ops, softmax and norms left out, as usual):

* :func:`hlo_flops`: read off XLA's *optimized* HLO (what an XLA step really runs, after
  XLA merged duplicated work): every ``dot``, ``convolution`` and oneDNN matmul custom call,
  with the bodies of ``while`` loops (the HV-BiLSTM scans) counted once per iteration;
* :func:`executed_flops`: the analytic count of what the graph (non-XLA) step runs, per
  path: the one-pass step (``train.fused_step``: target from the main pass's activations
  where exact) or the earlier three separate passes.

:func:`cpu_peak` gives the FMA peak from the ISA flags, clock and core count.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    backbone_dropout: float = 0.0
    frozen_dropout: bool = False


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
        float(m.backbone_dropout or 0.0),
        bool(getattr(m, "frozen_dropout", False)),
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


def executed_flops(d: Dims, fused: bool) -> dict[str, float]:
    """Analytic FLOPs of one image's share of a graph-mode train step.

    Per image: the main view and a quarter of a 2x2 mosaic forward and backward (frozen
    layers need no backward, trained ones 2x their forward), plus the ET target. The
    separate path runs the target as a whole forward pass; the one-pass step recomputes only
    the backbone layers from the first one whose dropout runs in training (none when
    ``backbone_dropout`` is 0, the trained blocks otherwise) and the head.

    Returns:
        ``executed`` (this path), ``forward`` (one forward pass) and ``convention`` (every
        trained pass charged 3 forwards, the target 1: the usual 3x rule).
    """
    f = forward_flops(d)
    head = f["hv_bilstm"] + f["classifier"]
    forward = f["patch_embedding"] + f["blocks"] + head
    trained_blocks = min(d.unfreeze_blocks, d.depth)
    trained = head + f["block"] * trained_blocks
    if trained_blocks >= d.depth:
        trained += f["patch_embedding"]
    if not fused or (d.backbone_dropout > 0.0 and d.frozen_dropout):
        target = forward  # dropout everywhere (or the separate path): a whole second pass
    elif d.backbone_dropout == 0.0:
        target = head
    else:  # frozen layers run without dropout: they are shared
        target = head + f["block"] * trained_blocks
        if trained_blocks >= d.depth:
            target += f["patch_embedding"]
    trained_passes = 1.0 + 0.25  # the main view, and a quarter of a mosaic
    return {
        "executed": (forward + 2 * trained) * trained_passes + target,
        "forward": forward,
        "convention": 3 * forward * trained_passes + forward,
    }


# ----------------------------------------------------------------------------- HLO

_SHAPE = re.compile(r"(?:pred|[subf]\d+|bf16)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$")


def _dims(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _instruction_flops(line: str) -> float:
    """FLOPs of one HLO instruction line (0 for anything but a matmul or convolution)."""
    line = line.split(", metadata=")[0]
    if "=" not in line:
        return 0.0
    result, _, rest = line.partition("=")
    rest = rest.strip()
    out_match = _SHAPE.search(rest)
    if out_match is None:
        return 0.0
    out = math.prod(_dims(out_match.group(1)))
    if " dot(" in rest:
        operands = _SHAPE.findall(rest.split(" dot(", 1)[1])
        lhs = _dims(operands[0])
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        k = math.prod(lhs[i] for i in _dims(contracting.group(1))) if contracting else 1
        return 2.0 * out * k
    if " convolution(" in rest:
        operands = _SHAPE.findall(rest.split(" convolution(", 1)[1])
        kernel = _dims(operands[1])
        labels = re.search(r"dim_labels=\w+_(\w+)->", rest)
        out_features = kernel[labels.group(1).index("o")] if labels else kernel[-1]
        # A kernel holds (input features / groups) x window per output feature.
        return 2.0 * out * math.prod(kernel) / out_features
    if '"__onednn$matmul"' in rest:
        operands = _SHAPE.findall(rest.split(" custom-call(", 1)[1])
        lhs = _dims(operands[0])
        transpose_a = '"transpose_a":true' in rest
        return 2.0 * out * (lhs[-2] if transpose_a else lhs[-1])
    return 0.0


def hlo_flops(hlo: str, loop_trips: int) -> dict[str, float]:
    """Matmul and convolution FLOPs of an optimized HLO module.

    Args:
        hlo: Text of ``experimental_get_compiler_ir(...)(stage="optimized_hlo")``.
        loop_trips: Iterations of every ``while`` loop (the HV-BiLSTM scans run one per
            grid row; optimized CPU HLO does not record trip counts).

    Returns:
        ``total``, ``in_loops`` (the part inside loop bodies) and ``loops`` (their count).
    """
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = match.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.strip() and line.strip() != "}":
            computations[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    loops = 0
    cache: dict[str, float] = {}

    def count(name: str) -> float:
        nonlocal loops
        if name in cache:
            return cache[name]
        total = 0.0
        for line in computations.get(name, []):
            total += _instruction_flops(line)
            head = line.split(", metadata=")[0]
            if " while(" in head:
                loops += 1
                body = re.search(r"body=%([\w.\-]+)", head)
                if body:
                    total += loop_trips * count(body.group(1))
            else:
                for called in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", head):
                    total += count(called)
        cache[name] = total
        return total

    total = count(entry)
    in_loops = sum(
        count(body)
        for lines in computations.values()
        for line in lines
        for body in re.findall(r"body=%([\w.\-]+)", line.split(", metadata=")[0])
    )
    return {"total": total, "in_loops": in_loops * loop_trips, "loops": float(loops)}


# ----------------------------------------------------------------------------- CPU peak


def cpu_peak(fma_units: int = 2) -> dict[str, Any]:
    """This CPU's FMA peak (FLOP/s) from /proc/cpuinfo: ISA, clock, cores.

    Args:
        fma_units: FMA units per core (2 on Xeon Scalable Gold/Platinum and later, AMD Zen;
            1 on some Silver/Bronze parts): the flags cannot tell, so it is stated.

    Returns:
        ``isa``, ``clock_ghz``, ``cores``, ``fp32`` and ``bf16`` peaks (FLOP/s; bf16 with
        AVX512-BF16 is 2x fp32, without it the fp32 rate), ``amx_bf16`` (the AMX tile peak
        where the flag is there, else None) and ``formula``.
    """
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set()
    clock = 0.0
    for line in info.splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("cpu MHz") and not clock:
            clock = float(line.split(":", 1)[1]) / 1000.0
    lanes, isa = 4, "SSE"
    if "avx512f" in flags:
        lanes, isa = 16, "AVX-512"
    elif "avx2" in flags and "fma" in flags:
        lanes, isa = 8, "AVX2+FMA"
    cores = os.cpu_count() or 1
    fp32 = cores * clock * 1e9 * lanes * 2 * fma_units
    bf16 = 2 * fp32 if "avx512_bf16" in flags else fp32
    amx = cores * clock * 1e9 * 1024 if "amx_bf16" in flags else None
    return {
        "isa": isa
        + (" + AVX512-BF16" if "avx512_bf16" in flags else "")
        + (" + AMX-BF16" if amx else ""),
        "clock_ghz": round(clock, 3),
        "cores": cores,
        "fma_units": fma_units,
        "fp32": fp32,
        "bf16": bf16,
        "amx_bf16": amx,
        "formula": f"{cores} cores x {clock:.2f} GHz x {lanes} fp32 lanes x 2 (FMA) x "
        f"{fma_units} FMA units",
    }
