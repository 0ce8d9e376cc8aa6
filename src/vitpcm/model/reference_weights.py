"""Import the ViT-PCM authors' released checkpoints (Keras 2 HDF5) into a ViT-PCM model.

The authors' TF 2.9 / Keras 2 training code saved its best epoch with
``ModelCheckpoint(save_weights_only=True)`` to a legacy HDF5 weights file: one group per
layer (names in the root attribute ``layer_names``, graph order), each with a
``weight_names`` attribute listing its arrays in load order. Their loader matched layers by
name and silently skipped anything that did not fit; this importer instead requires every
array, refuses any extra or mis-shaped one, and names them all in the message.

How their arrays map to ours (``../reference-checkpoint/README.md``):

* ``embedding``, ``class_token``, ``Transformer/posembed_input``, ``encoder_norm``: as in the
  Google ``.npz`` files (LayerNorm ``gamma``/``beta`` for ``scale``/``bias``).
* Attention ``query``/``key``/``value`` kernels are (D, D) with head ``h`` in columns
  ``h*D/heads ... (h+1)*D/heads``: a row-major reshape to our (D, heads, head_dim); ``out``
  (D, D) -> (heads, head_dim, D); biases (D) -> (heads, head_dim).
* ``patch_conditioning``: four Keras LSTMs (forward/backward x rows/columns) -> our
  HV-BiLSTM's ``horizontal``/``vertical`` bidirectional layers. Their cell names carry a
  per-process counter (``lstm_cell_4``) and are never matched on.
* ``patch_classifier/kernel`` (4H, C), no bias -> our classifier kernel.

Their GELU is the exact (erf) form, so the imported model is built with ``model.gelu=exact``.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitpcm.errors import ModelError
from vitpcm.run_files import CONFIG_FILE, MODEL_FILE

log = logging.getLogger(__name__)

_CELL = re.compile(r"/lstm_cell(_\d+)?/")
_LIST_LIMIT = 8
LSTM_LAYERS = {
    # their LSTM name -> (our bidirectional layer, direction)
    "forward_lstm_rows": ("horizontal", "forward_layer"),
    "backward_lstm_rows": ("horizontal", "backward_layer"),
    "forward_lstm_cols": ("vertical", "forward_layer"),
    "backward_lstm_cols": ("vertical", "backward_layer"),
}


@dataclass(frozen=True)
class Target:
    """One of our variables and how an authors' array becomes its value."""

    variable: Any
    convert: Callable[[np.ndarray], np.ndarray]


def _decode(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _names(attribute: Any) -> list[str]:
    return [_decode(v) for v in np.asarray(attribute).reshape(-1)]


def normalise_name(name: str) -> str:
    """An array's name without the ``:0`` suffix and with any ``lstm_cell_N`` as ``lstm_cell``."""
    name = name[:-2] if name.endswith(":0") else name
    return _CELL.sub("/lstm_cell/", name)


def read_reference_h5(data: bytes, source: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every array of an authors' HDF5 weights file, by normalised name.

    Args:
        data: The file's bytes.
        source: Its path or URI, for messages.

    Returns:
        ``(arrays, attributes)``: float32 arrays keyed by :func:`normalise_name`, and the
        root ``backend`` / ``keras_version`` attributes.

    Raises:
        ModelError: Not an HDF5 file, not a Keras 2 weights file, or an array is unreadable.
    """
    import h5py

    try:
        handle = h5py.File(io.BytesIO(data), "r")
    except OSError as exc:
        raise ModelError(
            f"{source} is not an HDF5 file ({exc}); pass the authors' .h5 checkpoint"
        ) from exc
    with handle:
        root = handle.get("model_weights", handle)
        if "layer_names" not in root.attrs:
            raise ModelError(
                f"{source} is HDF5 but not a Keras 2 weights file (no layer_names attribute); "
                "pass the .h5 written by the authors' ModelCheckpoint"
            )
        attributes = {
            k: _decode(root.attrs[k]) for k in ("backend", "keras_version") if k in root.attrs
        }
        arrays: dict[str, np.ndarray] = {}
        for layer in _names(root.attrs["layer_names"]):
            if layer not in root:
                raise ModelError(
                    f"{source}: layer {layer} is listed but has no group; re-export it"
                )
            group = root[layer]
            for name in _names(group.attrs.get("weight_names", [])):
                try:
                    value = np.asarray(group[name], dtype=np.float32)
                except (KeyError, OSError, ValueError, TypeError) as exc:
                    raise ModelError(
                        f"{source}: array {layer}/{name} is unreadable ({exc})"
                    ) from exc
                key = normalise_name(name)
                if key in arrays:
                    raise ModelError(f"{source}: array {key} appears twice; the file is malformed")
                arrays[key] = value
    return arrays, attributes


def _same(value: np.ndarray) -> np.ndarray:
    return value


def _reshaper(shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    def convert(value: np.ndarray) -> np.ndarray:
        if value.size != int(np.prod(shape)):
            return value  # left for the shape check to report
        return value.reshape(shape)

    return convert


def reference_table(model: Any) -> dict[str, Target]:
    """Map each array name of an authors' checkpoint to our variable (and its conversion)."""
    from vitpcm.model.vitpcm import backbone_of, patch_classifier_of

    backbone = backbone_of(model)
    embedding = backbone.patch_embedding
    table: dict[str, Target] = {
        "embedding/kernel": Target(embedding.embedding.kernel, _same),
        "embedding/bias": Target(embedding.embedding.bias, _same),
        "class_token/cls": Target(embedding.cls, _same),
        "Transformer/posembed_input/pos_embedding": Target(embedding.pos_embedding, _same),
    }
    for index, block in enumerate(backbone.encoder_blocks):
        root = f"Transformer/encoderblock_{index}"
        attention = block.attention
        heads, head_dim, width = attention.num_heads, attention.head_dim, attention.hidden_dim
        for name in ("query", "key", "value"):
            projection = getattr(attention, name)
            a = f"{root}/MultiHeadDotProductAttention_1/{name}"
            table[f"{a}/kernel"] = Target(projection.kernel, _reshaper((width, heads, head_dim)))
            table[f"{a}/bias"] = Target(projection.bias, _reshaper((heads, head_dim)))
        out = f"{root}/MultiHeadDotProductAttention_1/out"
        table[f"{out}/kernel"] = Target(attention.out.kernel, _reshaper((heads, head_dim, width)))
        table[f"{out}/bias"] = Target(attention.out.bias, _same)
        table.update(
            {
                f"{root}/Dense_0/kernel": Target(block.dense_0.kernel, _same),
                f"{root}/Dense_0/bias": Target(block.dense_0.bias, _same),
                f"{root}/Dense_1/kernel": Target(block.dense_1.kernel, _same),
                f"{root}/Dense_1/bias": Target(block.dense_1.bias, _same),
                f"{root}/LayerNorm_0/gamma": Target(block.layer_norm_0.gamma, _same),
                f"{root}/LayerNorm_0/beta": Target(block.layer_norm_0.beta, _same),
                f"{root}/LayerNorm_2/gamma": Target(block.layer_norm_2.gamma, _same),
                f"{root}/LayerNorm_2/beta": Target(block.layer_norm_2.beta, _same),
            }
        )
    table["Transformer/encoder_norm/gamma"] = Target(backbone.encoder_norm.gamma, _same)
    table["Transformer/encoder_norm/beta"] = Target(backbone.encoder_norm.beta, _same)
    conditioning = model.get_layer("hv_bilstm")
    for theirs, (ours, direction) in LSTM_LAYERS.items():
        cell = getattr(getattr(conditioning, ours), direction).cell
        for part in ("kernel", "recurrent_kernel", "bias"):
            name = f"patch_conditioning/{theirs}/lstm_cell/{part}"
            table[name] = Target(getattr(cell, part), _same)
    table["patch_classifier/kernel"] = Target(patch_classifier_of(model).kernel, _same)
    return table


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    more = len(names) - _LIST_LIMIT
    return shown + (f" (and {more} more)" if more > 0 else "")


def load_reference_arrays(model: Any, arrays: dict[str, np.ndarray], source: str) -> int:
    """Copy an authors' checkpoint (from :func:`read_reference_h5`) into ``model``.

    Every array must be used and every variable filled, each with its exact shape; the
    model is only touched once all of them check out.

    Returns:
        The number of arrays copied.

    Raises:
        ModelError: Missing, extra or mis-shaped arrays (named, with the shapes).
    """
    from vitpcm.model.vit_weights import _fit_position_embedding

    table = reference_table(model)
    missing = sorted(set(table) - set(arrays))
    extra = sorted(set(arrays) - set(table))
    hint = (
        "check that -c names the config of this checkpoint (backbone, data.num_classes, "
        "model.lstm_units)"
    )
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks {_listing(missing)}")
        if extra:
            parts.append(f"has arrays the model does not: {_listing(extra)}")
        raise ModelError(f"{source} {'; '.join(parts)}; {hint}")
    values: dict[str, np.ndarray] = {}
    mismatched = []
    for name, target in table.items():
        expected = tuple(target.variable.shape)
        value = target.convert(arrays[name])
        if name.endswith("pos_embedding"):
            value = _fit_position_embedding(value, expected, name, source)
        if tuple(value.shape) != expected:
            mismatched.append(f"{name} {tuple(arrays[name].shape)} (model needs {expected})")
            continue
        values[name] = value
    if mismatched:
        raise ModelError(f"{source} does not fit the model: {_listing(mismatched)}; {hint}")
    for name, target in table.items():
        target.variable.assign(values[name].astype(target.variable.dtype))
    log.info("imported %d arrays from %s", len(values), source)
    return len(values)


def import_reference(cfg: Any, uri: str, out: str | None = None) -> Any:
    """Build the config's ViT-PCM model with exact GELU and load an authors' checkpoint.

    Args:
        cfg: The resolved run config of the checkpoint (``voc12_vit_s16``, ...). Its
            ``model.gelu`` is set to ``"exact"`` and ``model.pretrained`` cleared.
        uri: Path or URI of the ``.h5`` file.
        out: If given, the model folder to write (see :func:`write_model_folder`).

    Returns:
        The Keras model, weights loaded.
    """
    import hashlib

    from vitpcm import storage
    from vitpcm.model.vitpcm import build_vitpcm

    if out is not None:
        from vitpcm.outputs import claim_output

        claim_output(out, "weights", inputs={"FILE": uri})  # before the slow part
    data = storage.read_bytes(uri)
    arrays, attributes = read_reference_h5(data, uri)
    log.info("%s: %d arrays, keras %s", uri, len(arrays), attributes.get("keras_version", "?"))
    cfg.model.gelu = "exact"
    cfg.model.pretrained = None
    model = build_vitpcm(cfg.model, cfg.data.num_classes)
    count = load_reference_arrays(model, arrays, uri)
    if out is not None:
        provenance = {
            "source": str(uri),
            "sha256": hashlib.sha256(data).hexdigest(),
            "arrays": count,
            "format": "Keras 2 HDF5 weights (ViT-PCM authors' code)",
            **{f"file_{k}": v for k, v in attributes.items()},
        }
        write_model_folder(model, cfg, out, provenance)
    return model


def write_model_folder(model: Any, cfg: Any, out: str, provenance: dict[str, Any]) -> None:
    """Write ``model.keras``, the resolved ``config.yaml`` and ``reference.json`` to ``out``.

    The folder is what ``vitpcm train`` leaves (model + config), so ``eval``, ``test``,
    ``predict`` and registration take it as it is. ``out`` is claimed first (never replaces
    what this tool did not write) and written under a temporary name.
    """
    import json
    import os
    import tempfile

    from vitpcm import storage
    from vitpcm.config import save_config
    from vitpcm.outputs import claim_output

    claim_output(out, "weights", inputs={"FILE": provenance.get("source")})
    with storage.atomic_dir(out, kind="weights") as tmp, tempfile.TemporaryDirectory() as local:
        path = os.path.join(local, MODEL_FILE)
        model.save(path)
        with open(path, "rb") as handle:
            storage.write_bytes(storage.join(tmp, MODEL_FILE), handle.read())
        save_config(cfg, storage.join(tmp, CONFIG_FILE))
        text = json.dumps(provenance, indent=2, sort_keys=True) + "\n"
        storage.write_bytes(storage.join(tmp, "reference.json"), text.encode())
