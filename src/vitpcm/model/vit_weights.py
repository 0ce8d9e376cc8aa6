"""Load the public Google ViT ``.npz`` checkpoints into a :class:`ViTBackbone`.

The files come from google-research/vision_transformer (B/16, L/16, B/8) and the AugReg
release (Ti/16, S/16): flax parameter trees flattened with ``/``. Tensors are copied without
reshaping because the Keras layers keep the flax layouts (conv ``(p, p, 3, D)``, attention
``(D, heads, head_dim)`` and ``(heads, head_dim, D)``). Older files number the block's modules
globally (``LayerNorm_0``, ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``);
big_vision's files number them per type (``..._0``, ``LayerNorm_1``, ``MlpBlock_0``). Both load.
The classifier (``head/*``, ``pre_logits/*``) is not used.
"""

from __future__ import annotations

import io
import logging
import math
import re
import zipfile
import zlib
from typing import Any

import keras
import numpy as np

from vitpcm import storage
from vitpcm.errors import ModelError
from vitpcm.model.vit_backbone import ViTBackbone
from vitpcm.model.vit_layers import resize_position_grid

log = logging.getLogger(__name__)

POS_EMBEDDING_KEYS = ("Transformer/posembed_input/pos_embedding", "pos_embedding")
# (attention, layer norm before the MLP, MLP) module names per checkpoint naming scheme.
_BLOCK_NAMINGS = (
    ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"),
    ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"),
)
_BLOCK_KEY = re.compile(r"^Transformer/encoderblock_(\d+)/")
_LIST_LIMIT = 8


def find_backbone(model_or_layer: keras.layers.Layer) -> ViTBackbone:
    """The :class:`ViTBackbone` itself, or the one nested in a model as layer ``backbone``."""
    if isinstance(model_or_layer, ViTBackbone):
        return model_or_layer
    if isinstance(model_or_layer, keras.Model):
        for layer in model_or_layer.layers:
            if isinstance(layer, ViTBackbone):
                return layer
    raise ModelError(
        f"{getattr(model_or_layer, 'name', model_or_layer)!r} is not a ViT backbone and has "
        "none nested; pass the model built by build_vitpcm or its backbone"
    )


def load_vit_npz(backbone_model_or_layer: keras.layers.Layer, uri: str) -> list[str]:
    """Copy a ViT ``.npz`` checkpoint into a backbone.

    Args:
        backbone_model_or_layer: A :class:`ViTBackbone`, or a model that nests one.
        uri: Local path, ``file://``, ``http(s)://`` or ``s3://`` URI of the ``.npz`` file.

    Returns:
        The checkpoint keys that were loaded.

    Raises:
        ModelError: The file is not a readable ``.npz``, lacks keys, or has tensors whose
            shapes do not match the backbone (message names the keys and shapes).
        StorageError: The file cannot be read.
    """
    backbone = find_backbone(backbone_model_or_layer)
    checkpoint = _open_npz(storage.read_bytes(uri), uri)
    try:
        return _load(backbone, checkpoint, uri)
    finally:
        checkpoint.close()


def save_vit_npz(backbone_model_or_layer: keras.layers.Layer, uri: str) -> list[str]:
    """Write a backbone as a ``.npz`` in the public checkpoints' layout (:func:`load_vit_npz`).

    Keys follow the original naming (``LayerNorm_0``, ``MultiHeadDotProductAttention_1``,
    ``LayerNorm_2``, ``MlpBlock_3``); values are float32.

    Args:
        backbone_model_or_layer: A :class:`ViTBackbone`, or a model that nests one.
        uri: Destination path or ``s3://`` URI (written whole, atomically where local).

    Returns:
        The keys written, sorted.
    """
    backbone = find_backbone(backbone_model_or_layer)
    table = checkpoint_table(backbone, set())
    buffer = io.BytesIO()
    np.savez(buffer, **{key: np.asarray(v.numpy(), np.float32) for key, v in table.items()})
    storage.write_bytes(uri, buffer.getvalue())
    log.info("saved %d tensors to %s", len(table), uri)
    return sorted(table)


def _open_npz(data: bytes, uri: str) -> Any:
    try:
        checkpoint = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ModelError(
            f"{uri} is not a readable .npz checkpoint ({exc}); download it again"
        ) from exc
    if not isinstance(checkpoint, np.lib.npyio.NpzFile):
        raise ModelError(f"{uri} holds a single array, not an .npz checkpoint of named tensors")
    return checkpoint


def _read(checkpoint: Any, key: str, uri: str) -> np.ndarray:
    try:
        return np.asarray(checkpoint[key])
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ModelError(f"{uri}: tensor {key} is unreadable ({exc}); download it again") from exc


def _block_naming(keys: set[str], block: int) -> tuple[str, str, str]:
    root = f"Transformer/encoderblock_{block}"
    for naming in _BLOCK_NAMINGS:
        if f"{root}/{naming[2]}/Dense_0/kernel" in keys:
            return naming
    return _BLOCK_NAMINGS[0]


def checkpoint_table(backbone: ViTBackbone, keys: set[str]) -> dict[str, Any]:
    """Map each checkpoint key the backbone needs to its Keras variable.

    The position embedding is mapped under the first of :data:`POS_EMBEDDING_KEYS` present.
    """
    embedding = backbone.patch_embedding
    pos_key = next((k for k in POS_EMBEDDING_KEYS if k in keys), POS_EMBEDDING_KEYS[0])
    table: dict[str, Any] = {
        "embedding/kernel": embedding.embedding.kernel,
        "embedding/bias": embedding.embedding.bias,
        "cls": embedding.cls,
        pos_key: embedding.pos_embedding,
    }
    for index, block in enumerate(backbone.encoder_blocks):
        attention_name, norm_name, mlp_name = _block_naming(keys, index)
        root = f"Transformer/encoderblock_{index}"
        attention = block.attention
        parts = {
            "LayerNorm_0/scale": block.layer_norm_0.gamma,
            "LayerNorm_0/bias": block.layer_norm_0.beta,
            f"{norm_name}/scale": block.layer_norm_2.gamma,
            f"{norm_name}/bias": block.layer_norm_2.beta,
            f"{mlp_name}/Dense_0/kernel": block.dense_0.kernel,
            f"{mlp_name}/Dense_0/bias": block.dense_0.bias,
            f"{mlp_name}/Dense_1/kernel": block.dense_1.kernel,
            f"{mlp_name}/Dense_1/bias": block.dense_1.bias,
        }
        for name in ("query", "key", "value", "out"):
            projection = getattr(attention, name)
            parts[f"{attention_name}/{name}/kernel"] = projection.kernel
            parts[f"{attention_name}/{name}/bias"] = projection.bias
        table.update({f"{root}/{part}": variable for part, variable in parts.items()})
    norm = backbone.encoder_norm
    table["Transformer/encoder_norm/scale"] = norm.gamma
    table["Transformer/encoder_norm/bias"] = norm.beta
    return table


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    more = len(names) - _LIST_LIMIT
    return shown + (f" (and {more} more)" if more > 0 else "")


def _describe(backbone: ViTBackbone) -> str:
    return (
        f"the backbone has patch {backbone.patch_size}, dim {backbone.hidden_dim}, "
        f"depth {backbone.depth}, {backbone.num_heads} heads, MLP {backbone.mlp_dim}; "
        "check model.backbone and model.pretrained"
    )


def _load(backbone: ViTBackbone, checkpoint: Any, uri: str) -> list[str]:
    keys = set(checkpoint.files)
    table = checkpoint_table(backbone, keys)
    missing = sorted(key for key in table if key not in keys)
    if missing:
        raise ModelError(f"{uri} lacks checkpoint keys {_listing(missing)}; {_describe(backbone)}")
    depths = {int(m.group(1)) for k in keys if (m := _BLOCK_KEY.match(k))}
    if depths and max(depths) + 1 != backbone.depth:
        raise ModelError(f"{uri} has {max(depths) + 1} encoder blocks but {_describe(backbone)}")

    values: dict[str, np.ndarray] = {}
    mismatched: list[str] = []
    for key, variable in table.items():
        value = _read(checkpoint, key, uri)
        expected = tuple(variable.shape)
        if key in POS_EMBEDDING_KEYS:
            value = _fit_position_embedding(value, expected, key, uri)
        if value.shape != expected:
            mismatched.append(f"{key} expected {expected} found {value.shape}")
            continue
        values[key] = value
    if mismatched:
        raise ModelError(
            f"{uri} does not match the backbone: {_listing(mismatched)}; {_describe(backbone)}"
        )
    # Assign only after every tensor checked out, so a bad file leaves the model untouched.
    for key, variable in table.items():
        variable.assign(values[key].astype(variable.dtype))
    log.info("loaded %d tensors from %s", len(values), uri)
    return sorted(values)


def _fit_position_embedding(
    value: np.ndarray, expected: tuple[int, ...], key: str, uri: str
) -> np.ndarray:
    """Resize a (1, 1 + s*s, D) position embedding to the backbone's stored grid."""
    if value.shape == expected or value.ndim != 3 or value.shape[-1] != expected[-1]:
        return value  # equal, or a mismatch the shape check reports with both shapes
    source = math.isqrt(value.shape[1] - 1)
    target = math.isqrt(expected[1] - 1)
    if value.shape[0] != 1 or source * source != value.shape[1] - 1:
        raise ModelError(
            f"{uri}: {key} has shape {value.shape}, which is not a class token plus a square "
            f"grid; expected {expected}"
        )
    grid = value[:, 1:].reshape(1, source, source, value.shape[-1])
    resized = np.asarray(resize_position_grid(grid, (target, target)))
    log.info(
        "resized %s from a %dx%d to a %dx%d grid (bicubic)", key, source, source, target, target
    )
    flat = resized.reshape(1, target * target, value.shape[-1]).astype(value.dtype)
    return np.concatenate([value[:, :1], flat], axis=1)
