"""A ViT forward pass in plain NumPy, read straight from checkpoint keys, to check the Keras one.

Also writes random checkpoints with the public Google ViT ``.npz`` key names and shapes.
Only the case where the input grid equals the stored position grid is implemented: that is the
path the weight loader must reproduce exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

# (attention, layer norm before the MLP, MLP) for the two naming schemes of the public files.
NAMINGS = {
    "old": ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"),
    "new": ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"),
}


def random_vit_weights(
    *,
    patch_size: int,
    hidden_dim: int,
    depth: int,
    num_heads: int,
    mlp_dim: int,
    grid: int,
    seed: int = 0,
    naming: str = "old",
    with_head: bool = True,
) -> dict[str, np.ndarray]:
    """Random float32 tensors under the official key names, scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    head_dim = hidden_dim // num_heads
    attention, norm, mlp = NAMINGS[naming]

    def normal(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    def small(shape: tuple[int, ...]) -> np.ndarray:
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    def scale(shape: tuple[int, ...]) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)

    d = hidden_dim
    weights = {
        "embedding/kernel": normal((patch_size, patch_size, 3, d), patch_size * patch_size * 3),
        "embedding/bias": small((d,)),
        "cls": small((1, 1, d)),
        "Transformer/posembed_input/pos_embedding": small((1, grid * grid + 1, d)),
        "Transformer/encoder_norm/scale": scale((d,)),
        "Transformer/encoder_norm/bias": small((d,)),
    }
    for i in range(depth):
        root = f"Transformer/encoderblock_{i}"
        weights[f"{root}/LayerNorm_0/scale"] = scale((d,))
        weights[f"{root}/LayerNorm_0/bias"] = small((d,))
        weights[f"{root}/{norm}/scale"] = scale((d,))
        weights[f"{root}/{norm}/bias"] = small((d,))
        for name in ("query", "key", "value"):
            weights[f"{root}/{attention}/{name}/kernel"] = normal((d, num_heads, head_dim), d)
            weights[f"{root}/{attention}/{name}/bias"] = small((num_heads, head_dim))
        weights[f"{root}/{attention}/out/kernel"] = normal((num_heads, head_dim, d), d)
        weights[f"{root}/{attention}/out/bias"] = small((d,))
        weights[f"{root}/{mlp}/Dense_0/kernel"] = normal((d, mlp_dim), d)
        weights[f"{root}/{mlp}/Dense_0/bias"] = small((mlp_dim,))
        weights[f"{root}/{mlp}/Dense_1/kernel"] = normal((mlp_dim, d), mlp_dim)
        weights[f"{root}/{mlp}/Dense_1/bias"] = small((d,))
    if with_head:
        weights["head/kernel"] = small((d, 10))
        weights["head/bias"] = small((10,))
        weights["pre_logits/kernel"] = small((d, d))
        weights["pre_logits/bias"] = small((d,))
    return weights


def write_npz(path: str | Path, weights: Mapping[str, np.ndarray]) -> Path:
    """Save tensors under their (slash-separated) names, as the public files do."""
    path = Path(path)
    with path.open("wb") as handle:
        np.savez(handle, **weights)
    return path


def _layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def vit_forward(
    weights: Mapping[str, np.ndarray], images: np.ndarray, eps: float = 1e-6
) -> np.ndarray:
    """ViT encoder on images already scaled to [-1, 1]; returns the (B, G_h, G_w, D) grid.

    Dimensions are read off the tensors; the block naming scheme is detected per block.
    """
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    x = np.asarray(images, dtype=np.float64)
    p = w["embedding/kernel"].shape[0]
    d = w["embedding/kernel"].shape[-1]
    b, h, wd, c = x.shape
    gh, gw = h // p, wd // p

    patches = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, gh * gw, p * p * c)
    tokens = patches @ w["embedding/kernel"].reshape(p * p * c, d) + w["embedding/bias"]
    cls = np.broadcast_to(w["cls"], (b, 1, d))
    pos = w["Transformer/posembed_input/pos_embedding"]
    assert pos.shape[1] == gh * gw + 1, "the NumPy reference does not interpolate positions"
    tokens = np.concatenate([cls, tokens], axis=1) + pos

    depth = len({k.split("/")[1] for k in w if k.startswith("Transformer/encoderblock_")})
    for i in range(depth):
        root = f"Transformer/encoderblock_{i}"
        naming = "old" if f"{root}/MlpBlock_3/Dense_0/kernel" in w else "new"
        attention, norm, mlp = NAMINGS[naming]
        a = f"{root}/{attention}"
        y = _layer_norm(tokens, w[f"{root}/LayerNorm_0/scale"], w[f"{root}/LayerNorm_0/bias"], eps)
        q = np.einsum("btd,dnh->btnh", y, w[f"{a}/query/kernel"]) + w[f"{a}/query/bias"]
        k = np.einsum("btd,dnh->btnh", y, w[f"{a}/key/kernel"]) + w[f"{a}/key/bias"]
        v = np.einsum("btd,dnh->btnh", y, w[f"{a}/value/kernel"]) + w[f"{a}/value/bias"]
        scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
        context = np.einsum("bnqk,bknh->bqnh", _softmax(scores), v)
        y = np.einsum("bqnh,nhd->bqd", context, w[f"{a}/out/kernel"]) + w[f"{a}/out/bias"]
        tokens = tokens + y
        y = _layer_norm(tokens, w[f"{root}/{norm}/scale"], w[f"{root}/{norm}/bias"], eps)
        y = _gelu_tanh(y @ w[f"{root}/{mlp}/Dense_0/kernel"] + w[f"{root}/{mlp}/Dense_0/bias"])
        y = y @ w[f"{root}/{mlp}/Dense_1/kernel"] + w[f"{root}/{mlp}/Dense_1/bias"]
        tokens = tokens + y

    tokens = _layer_norm(
        tokens, w["Transformer/encoder_norm/scale"], w["Transformer/encoder_norm/bias"], eps
    )
    return tokens[:, 1:].reshape(b, gh, gw, d)
