"""The ViT-PCM network (METHOD.md, "Network"): ViT -> HV-BiLSTM -> patch classifier -> pooling.

``build_vitpcm`` takes float32 images in [0, 255] of any size that is a multiple of the patch
size and returns ``{"patch_probs": (B, G_h, G_w, K), "class_probs": (B, K)}``. The helpers
below freeze and unfreeze the backbone for the paper's two-stage schedule (warm-up with the
backbone frozen, then the last blocks and the final LayerNorm unfrozen).
"""

from __future__ import annotations

from typing import Any

import keras

from vitpcm.errors import ConfigError, ModelError
from vitpcm.model.hv_bilstm import HVBiLSTM
from vitpcm.model.patch_classifier import GlobalClassPooling, PatchClassifier
from vitpcm.model.vit_backbone import ViTBackbone
from vitpcm.model.vit_weights import find_backbone, load_vit_npz

BACKBONE_NAME = "backbone"
PATCH_CLASSIFIER_NAME = "patch_classifier"


def build_vitpcm(
    model_cfg: Any,
    num_classes: int,
    *,
    load_pretrained: bool = False,
    name: str = "vitpcm",
) -> keras.Model:
    """Build the ViT-PCM model.

    Args:
        model_cfg: A ``cfg.model``-like object (backbone dims, ``pos_embed_grid``,
            ``backbone_dropout``, ``dropout``, ``lstm_units``, ``pooling``, ``l2``,
            ``pretrained``).
        num_classes: K, background included.
        load_pretrained: Copy the ``model_cfg.pretrained`` checkpoint into the backbone (off by
            default: evaluation restores a trained model and needs no ImageNet weights).
        name: Model name.

    Returns:
        A functional model with input ``images`` (B, H, W, 3) in [0, 255] and outputs
        ``patch_probs`` (per-patch softmax) and ``class_probs`` (pooled), both float32.
    """
    pooling = getattr(model_cfg, "pooling", "max")
    if pooling not in ("max", "avg"):
        raise ConfigError(f"model.pooling: unknown pooling {pooling!r}; choose max or avg")
    dropout = float(getattr(model_cfg, "dropout", 0.0))

    backbone = ViTBackbone.from_model_config(model_cfg, name=BACKBONE_NAME)
    images = keras.Input(shape=(None, None, 3), dtype="float32", name="images")
    # The checkpoints expect inputs in [-1, 1].
    scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(images)
    grid = backbone(scaled)
    conditioned = HVBiLSTM(
        units=int(getattr(model_cfg, "lstm_units", 192)), dropout=dropout, name="hv_bilstm"
    )(grid)
    patch_probs = PatchClassifier(
        num_classes,
        dropout=dropout,
        l2=float(getattr(model_cfg, "l2", 0.01)),
        name=PATCH_CLASSIFIER_NAME,
    )(conditioned)
    # float32 policy: pooling must not cast the probabilities back to bfloat16.
    class_probs = GlobalClassPooling(pooling, name="class_pooling", dtype="float32")(patch_probs)
    model = keras.Model(
        inputs=images,
        outputs={"patch_probs": patch_probs, "class_probs": class_probs},
        name=name,
    )
    pretrained = getattr(model_cfg, "pretrained", None)
    if load_pretrained and pretrained:
        load_vit_npz(backbone, pretrained)
    return model


def backbone_of(model: keras.Model) -> ViTBackbone:
    """The ViT backbone nested in a ViT-PCM model (or the backbone itself)."""
    return find_backbone(model)


def patch_classifier_of(model: keras.Model) -> PatchClassifier:
    """The patch classifier of a ViT-PCM model; its ``kernel`` and ``l2`` feed the L2 loss."""
    for layer in model.layers:
        if isinstance(layer, PatchClassifier):
            return layer
    raise ModelError(f"model {model.name!r} has no patch classifier; build it with build_vitpcm")


def set_backbone_trainable(model: keras.Model, unfreeze_blocks: int) -> None:
    """Freeze the backbone except its last ``unfreeze_blocks`` blocks and the final LayerNorm.

    ``0`` freezes the whole backbone (warm-up); ``N`` trains ``encoderblock_{depth-N}`` ...
    ``encoderblock_{depth-1}`` and ``encoder_norm``; the patch embedding and the earlier blocks
    stay frozen. ``depth`` trains the whole backbone, patch and position embeddings included
    (what a backbone trained from scratch needs). Frozen blocks also run without dropout.
    Rebuild any compiled train step afterwards: Keras reads these flags when it traces.

    Args:
        model: A model from :func:`build_vitpcm`, or a bare backbone.
        unfreeze_blocks: Number of trailing encoder blocks to train, 0 to depth.
    """
    backbone = backbone_of(model)
    if isinstance(unfreeze_blocks, bool) or not 0 <= int(unfreeze_blocks) <= backbone.depth:
        raise ConfigError(
            f"train.unfreeze_blocks: {unfreeze_blocks} is outside 0..{backbone.depth}, "
            f"the backbone's depth"
        )
    unfreeze_blocks = int(unfreeze_blocks)
    if unfreeze_blocks == 0:
        backbone.trainable = False
        return
    # The backbone itself must be trainable for any of its layers' weights to be trained.
    backbone.trainable = True
    if unfreeze_blocks == backbone.depth:
        for layer in backbone.layers:
            layer.trainable = True
        return
    trainable = {
        f"encoderblock_{i}" for i in range(backbone.depth - unfreeze_blocks, backbone.depth)
    }
    trainable.add("encoder_norm")
    for layer in backbone.layers:
        layer.trainable = layer.name in trainable
