"""The ViT-PCM authors' checkpoint format, written and run in plain NumPy.

:func:`write_reference_h5` writes a Keras 2 legacy HDF5 weights file with the layer and array
names, order and attributes of a real layout (``tests/data/reference_layout_*.json``, taken
from the authors' TF 2.9.1 code), shapes scaled down by :func:`reference_shape`.
:func:`reference_forward` runs the forward pass those arrays belong to, as the layout notes
describe it (their (D, D) attention kernels split into heads by column, Keras LSTM gate
order, exact GELU), without any code of the importer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from helpers.vit_numpy import _layer_norm, _softmax

LAYOUT_S16 = Path(__file__).parent.parent / "data" / "reference_layout_s16_tf2.9.1.json"


@dataclass(frozen=True)
class Dims:
    """Widths of an authors' model (the real S/16 VOC one by default)."""

    d: int = 384
    mlp: int = 1536
    heads: int = 6
    lstm: int = 192
    classes: int = 21
    patch: int = 16
    grid: int = 24


def load_layout(path: Path = LAYOUT_S16) -> dict[str, Any]:
    """A layout JSON: root attributes and every layer's arrays in file order."""
    return json.loads(path.read_text())


def reference_shape(name: str, dims: Dims) -> tuple[int, ...]:
    """The shape of an array from its name alone (``../reference-checkpoint/README.md``)."""
    d, m, h, c, p = dims.d, dims.mlp, dims.lstm, dims.classes, dims.patch
    leaf = name.removesuffix(":0").rsplit("/", 1)[-1]
    if name.startswith("embedding/"):
        return (p, p, 3, d) if leaf == "kernel" else (d,)
    if leaf == "cls":
        return (1, 1, d)
    if leaf == "pos_embedding":
        return (1, dims.grid * dims.grid + 1, d)
    if "patch_conditioning/" in name:
        return {"kernel": (d, 4 * h), "recurrent_kernel": (h, 4 * h), "bias": (4 * h,)}[leaf]
    if name.startswith("patch_classifier/"):
        return (4 * h, c)
    if "/Dense_0/" in name:
        return (d, m) if leaf == "kernel" else (m,)
    if "/Dense_1/" in name:
        return (m, d) if leaf == "kernel" else (d,)
    if "/MultiHeadDotProductAttention_1/" in name:
        return (d, d) if leaf == "kernel" else (d,)
    if leaf in ("gamma", "beta"):
        return (d,)
    raise KeyError(f"unknown array {name}")


def random_arrays(layout: dict[str, Any], dims: Dims, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 arrays for every name of the layout (``name_in_group`` keys)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for layer in layout["layers"]:
        for weight in layer["weights"]:
            name = weight["name_in_group"]
            shape = reference_shape(name, dims)
            leaf = name.removesuffix(":0").rsplit("/", 1)[-1]
            if leaf == "gamma":
                value = 1.0 + 0.1 * rng.standard_normal(shape)
            elif leaf in ("beta", "bias", "cls", "pos_embedding"):
                value = 0.1 * rng.standard_normal(shape)
            else:
                fan_in = int(np.prod(shape[:-1]))
                value = rng.standard_normal(shape) / math.sqrt(fan_in)
                if name.startswith("patch_classifier/"):
                    value *= 4.0  # peaky per-patch softmax: differences show
            arrays[name] = value.astype(np.float32)
    return arrays


def write_reference_h5(
    path: Path, layout: dict[str, Any], arrays: dict[str, np.ndarray], *, as_bytes: bool = True
) -> Path:
    """Write ``arrays`` as Keras 2's ``save_weights`` does for an ``.h5`` path."""
    import h5py

    def text(values: list[str]) -> Any:
        return np.array([v.encode() for v in values]) if as_bytes else values

    root_attrs = layout["root_attrs"]
    with h5py.File(path, "w") as handle:
        handle.attrs["backend"] = root_attrs["backend"]
        handle.attrs["keras_version"] = root_attrs["keras_version"]
        handle.attrs["layer_names"] = text(root_attrs["layer_names"])
        handle.create_group("top_level_model_weights").attrs["weight_names"] = np.array([])
        for layer in layout["layers"]:
            group = handle.create_group(layer["layer_name"])
            names = [w["name_in_group"] for w in layer["weights"]]
            group.attrs["weight_names"] = text(names) if names else np.array([])
            for name in names:
                group.create_dataset(name, data=arrays[name])
    return path


def _gelu(x: np.ndarray, exact: bool) -> np.ndarray:
    if exact:
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _lstm(x: np.ndarray, kernel: np.ndarray, recurrent: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Keras LSTM over (N, T, D) sequences, zero start, gates i, f, c~, o; (N, T, H)."""
    n, steps, _ = x.shape
    units = recurrent.shape[0]
    h = np.zeros((n, units))
    c = np.zeros((n, units))
    out = np.zeros((n, steps, units))
    for t in range(steps):
        z = x[:, t] @ kernel + h @ recurrent + bias
        i, f, g, o = np.split(z, 4, axis=-1)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        out[:, t] = h
    return out


def _bidirectional(x: np.ndarray, arrays: dict[str, np.ndarray], axis_name: str) -> np.ndarray:
    def weights(direction: str) -> list[np.ndarray]:
        prefix = f"patch_conditioning/{direction}_lstm_{axis_name}/"
        found = {k.rsplit("/", 1)[-1]: v for k, v in arrays.items() if k.startswith(prefix)}
        return [found["kernel"], found["recurrent_kernel"], found["bias"]]

    forward = _lstm(x, *weights("forward"))
    backward = _lstm(x[:, ::-1], *weights("backward"))[:, ::-1]
    return np.concatenate([forward, backward], axis=-1)


def reference_forward(
    named: dict[str, np.ndarray], images: np.ndarray, heads: int, *, exact_gelu: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The authors' inference forward pass on images in [0, 255] at the stored grid's size.

    Args:
        named: arrays keyed by ``name_in_group`` (``:0`` suffixes and cell numbers as written).
        images: (B, H, W, 3), H = W = grid * patch.
        heads: attention heads.
        exact_gelu: erf GELU (the authors'); False for the tanh approximation.

    Returns:
        ``(patch_probs (B, g, g, C), class_probs (B, C))`` in float64.
    """
    w = {k.removesuffix(":0"): np.asarray(v, np.float64) for k, v in named.items()}
    x = (np.asarray(images, np.float64) - 127.5) / 127.5
    kernel = w["embedding/kernel"]
    p, d = kernel.shape[0], kernel.shape[-1]
    b, height, width, _ = x.shape
    gh, gw = height // p, width // p
    patches = x.reshape(b, gh, p, gw, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
    tokens = patches @ kernel.reshape(-1, d) + w["embedding/bias"]
    tokens = np.concatenate([np.broadcast_to(w["class_token/cls"], (b, 1, d)), tokens], axis=1)
    tokens = tokens + w["Transformer/posembed_input/pos_embedding"]
    eps = 1e-6
    head_dim = d // heads
    depth = len({k.split("/")[1] for k in w if k.startswith("Transformer/encoderblock_")})
    for i in range(depth):
        r = f"Transformer/encoderblock_{i}"
        a = f"{r}/MultiHeadDotProductAttention_1"
        y = _layer_norm(tokens, w[f"{r}/LayerNorm_0/gamma"], w[f"{r}/LayerNorm_0/beta"], eps)
        q, k, v = (y @ w[f"{a}/{n}/kernel"] + w[f"{a}/{n}/bias"] for n in ("query", "key", "value"))
        context = []
        for head in range(heads):
            cols = slice(head * head_dim, (head + 1) * head_dim)
            scores = q[..., cols] @ k[..., cols].transpose(0, 2, 1) / math.sqrt(head_dim)
            context.append(_softmax(scores) @ v[..., cols])
        attended = np.concatenate(context, axis=-1) @ w[f"{a}/out/kernel"] + w[f"{a}/out/bias"]
        tokens = tokens + attended
        y = _layer_norm(tokens, w[f"{r}/LayerNorm_2/gamma"], w[f"{r}/LayerNorm_2/beta"], eps)
        y = _gelu(y @ w[f"{r}/Dense_0/kernel"] + w[f"{r}/Dense_0/bias"], exact_gelu)
        tokens = tokens + y @ w[f"{r}/Dense_1/kernel"] + w[f"{r}/Dense_1/bias"]
    tokens = _layer_norm(
        tokens, w["Transformer/encoder_norm/gamma"], w["Transformer/encoder_norm/beta"], eps
    )
    grid = tokens[:, 1:].reshape(b, gh, gw, d)
    rows = _bidirectional(grid.reshape(b * gh, gw, d), w, "rows").reshape(b, gh, gw, -1)
    cols = grid.transpose(0, 2, 1, 3).reshape(b * gw, gh, d)
    cols = _bidirectional(cols, w, "cols").reshape(b, gw, gh, -1).transpose(0, 2, 1, 3)
    features = np.concatenate([rows, cols], axis=-1)
    patch_probs = _softmax(features @ w["patch_classifier/kernel"])
    return patch_probs, patch_probs.max(axis=(1, 2))
