"""The ViT-PCM network (METHOD.md, "Network"): ViT -> HV-BiLSTM -> patch classifier -> pooling.

``build_vitpcm`` takes float32 images in [0, 255] of any size that is a multiple of the patch
size and returns ``{"patch_probs": (B, G_h, G_w, K), "class_probs": (B, K)}``. The helpers
below freeze and unfreeze the backbone for the paper's two-stage schedule (warm-up with the
backbone frozen, then the last blocks and the final LayerNorm unfrozen).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import keras

from vitpcm.errors import ConfigError, ModelError
from vitpcm.model.hv_bilstm import HVBiLSTM
from vitpcm.model.patch_classifier import GlobalClassPooling, PatchClassifier
from vitpcm.model.vit_backbone import ViTBackbone
from vitpcm.model.vit_layers import dropout_active
from vitpcm.model.vit_weights import find_backbone, load_vit_npz

if TYPE_CHECKING:
    from vitpcm.config import ModelConfig

BACKBONE_NAME = "backbone"
PATCH_CLASSIFIER_NAME = "patch_classifier"


def build_vitpcm(
    model_cfg: ModelConfig,
    num_classes: int,
    *,
    load_pretrained: bool = False,
    name: str = "vitpcm",
) -> keras.Model:
    """Build the ViT-PCM model.

    Args:
        model_cfg: The resolved ``model`` config section (backbone dims filled in).
        num_classes: K, background included.
        load_pretrained: Copy the ``model_cfg.pretrained`` checkpoint into the backbone (off by
            default: evaluation restores a trained model and needs no ImageNet weights).
        name: Model name.

    Returns:
        A functional model with input ``images`` (B, H, W, 3) in [0, 255] and outputs
        ``patch_probs`` (per-patch softmax) and ``class_probs`` (pooled), both float32.
    """
    dropout = model_cfg.dropout
    backbone = ViTBackbone.from_model_config(model_cfg, name=BACKBONE_NAME)
    if model_cfg.frozen_dropout:
        # The authors' recipe: backbone dropout also in frozen blocks (METHOD.md, "Known flaws").
        for layer in backbone.layers:
            layer.frozen_dropout = True
    images = keras.Input(shape=(None, None, 3), dtype="float32", name="images")
    # The checkpoints expect inputs in [-1, 1].
    scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(images)
    grid = backbone(scaled)
    conditioned = HVBiLSTM(
        units=model_cfg.lstm_units,
        dropout=dropout,
        lstm_dropout=model_cfg.lstm_dropout,
        name="hv_bilstm",
    )(grid)
    patch_probs = PatchClassifier(
        num_classes,
        dropout=dropout,
        l2=model_cfg.l2,
        name=PATCH_CLASSIFIER_NAME,
    )(conditioned)
    # float32 policy: pooling must not cast the probabilities back to bfloat16.
    pooling = GlobalClassPooling(model_cfg.pooling, name="class_pooling", dtype="float32")
    class_probs = pooling(patch_probs)
    model = keras.Model(
        inputs=images,
        outputs={"patch_probs": patch_probs, "class_probs": class_probs},
        name=name,
    )
    if load_pretrained and model_cfg.pretrained:
        load_vit_npz(backbone, model_cfg.pretrained)
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


# ----------------------------------------------------------------------------- train pass


def train_forward(model: keras.Model, images: Any, mosaics: Any) -> dict[str, Any]:
    """The train step's three outputs from as few and as large passes as exactness allows.

    The main views and the ET mosaics go through the network together, in training mode (one
    batch when their sizes agree). The ET target, a dropout-free pass over the main views with
    no gradient (METHOD.md), reuses the main pass's activations as far as they are the same:
    up to the first backbone layer whose dropout runs in training (a frozen block or a zero
    rate runs none), i.e. the frozen prefix always and the whole backbone when its dropout is
    0; the rest of the backbone runs again in inference mode for the main views only. The
    target then joins the same HV-BiLSTM and classifier batch, without their dropout (with the
    fused HV-BiLSTM, the XLA one, the step runs one recurrent loop forward and one backward).
    The values are those of
    ``model(images, training=True)``, ``model(mosaics, training=True)`` and
    ``stop_gradient(model(images, training=False))`` up to float rounding and dropout draws.

    Args:
        model: A model from :func:`build_vitpcm`.
        images: (B, H, W, 3) main views in [0, 255].
        mosaics: (M, H', W', 3) 2x2 mosaics of second views in [0, 255].

    Returns:
        ``patch_probs`` and ``class_probs`` of the main views, ``mosaic_patch_probs`` and the
        gradient-free ``target_patch_probs``.
    """
    import tensorflow as tf

    backbone = backbone_of(model)
    rescale = model.get_layer("rescale")
    count = tf.shape(images)[0]
    if images.shape[1:] == mosaics.shape[1:]:
        grid, target = _backbone_with_target(
            backbone, rescale(tf.concat([images, mosaics], 0)), count
        )
        trained = [grid]
    else:
        main, target = _backbone_with_target(backbone, rescale(images), count)
        trained = [main, backbone(rescale(mosaics), training=True)]
    hv = model.get_layer("hv_bilstm")
    classifier = patch_classifier_of(model)
    groups = [hv.dropout_layer(g, training=True) for g in trained]
    # In the dropout layers' dtype (float32 for the HV-BiLSTM under mixed precision).
    groups.append(tf.cast(tf.stop_gradient(target), groups[0].dtype))
    if len(trained) == 1:  # one batch: the LSTMs' input dropout for all but the target
        conditioned = _joint(partial(hv.condition, lstm_dropout_images=tf.shape(grid)[0]), groups)
    else:
        conditioned = [hv.condition(g, lstm_dropout_images=tf.shape(g)[0]) for g in groups[:-1]]
        conditioned.append(hv.condition(groups[-1]))
    groups = [classifier.dropout_layer(c, training=True) for c in conditioned[:-1]]
    probs = _joint(classifier.classify, [*groups, tf.cast(conditioned[-1], groups[0].dtype)])
    main_probs = probs[0][:count] if len(trained) == 1 else probs[0]
    mosaic_probs = probs[0][count:] if len(trained) == 1 else probs[1]
    return {
        "patch_probs": main_probs,
        "class_probs": model.get_layer("class_pooling")(main_probs),
        "mosaic_patch_probs": mosaic_probs,
        "target_patch_probs": tf.stop_gradient(probs[-1]),
    }


def _backbone_with_target(backbone: ViTBackbone, scaled: Any, count: Any) -> tuple[Any, Any]:
    """(training-mode grid of ``scaled``, inference-mode grid of its first ``count`` images)."""
    import tensorflow as tf

    tokens, target = scaled, None
    for layer in [backbone.patch_embedding, *backbone.encoder_blocks]:
        if target is None and not _dropout_free(layer):
            target = tokens[:count]
        tokens = layer(tokens, training=True)
        if target is not None:
            target = layer(target, training=False)
    patch_grid = backbone.get_layer("patch_grid")
    grid = patch_grid([backbone.encoder_norm(tokens), scaled])
    if target is None:  # dropout nowhere: the target is the main views' own grid
        return grid, tf.stop_gradient(grid[:count])
    return grid, tf.stop_gradient(patch_grid([backbone.encoder_norm(target), scaled[:count]]))


def _dropout_free(layer: keras.layers.Layer) -> bool:
    """Whether ``layer`` computes in training mode exactly what it computes at inference."""
    return float(getattr(layer, "dropout", 0.0)) == 0.0 or not dropout_active(layer, True)


def _joint(function: Any, groups: list[Any]) -> list[Any]:
    """``function`` over tensors batched together when their shapes allow, split back."""
    import tensorflow as tf

    if all(g.shape[1:] == groups[0].shape[1:] for g in groups):
        sizes = [tf.shape(g)[0] for g in groups]
        return tf.split(function(tf.concat(groups, 0)), sizes, axis=0)
    return [function(g) for g in groups]
