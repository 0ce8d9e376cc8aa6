"""Training losses of ViT-PCM (METHOD.md, "Losses"): multi-label BCE, L2 and equivariance.

All functions take any float dtype (mixed-precision outputs included), compute in float32 and
return float32 scalars; they are plain TensorFlow and work under ``tf.function``.
"""

from __future__ import annotations

import tensorflow as tf

from vitpcm.config import LossWeights
from vitpcm.model.equivariance import map_target, split_mosaic
from vitpcm.model.label_merge import DEFAULT_EPS, label_merge

# Probabilities are clipped away from 0 and 1 before the log, as Keras' cross-entropies do.
PROB_EPS = 1e-7
LOSS_TERMS = ("bce", "et", "l2")


def bce_loss(image_labels: tf.Tensor, class_probs: tf.Tensor, eps: float = PROB_EPS) -> tf.Tensor:
    """Multi-label binary cross-entropy between image labels and pooled class probabilities.

    Args:
        image_labels: (B, K) multi-hot labels.
        class_probs: (B, K) image-level probabilities (global max pooling of the patch softmax).
        eps: Probabilities are clipped to [eps, 1 - eps] so the log stays finite.

    Returns:
        float32 scalar, the mean over images and classes.
    """
    labels = tf.cast(image_labels, tf.float32)
    probs = tf.clip_by_value(tf.cast(class_probs, tf.float32), eps, 1.0 - eps)
    per_class = labels * tf.math.log(probs) + (1.0 - labels) * tf.math.log(1.0 - probs)
    return -tf.reduce_mean(per_class)


def l2_loss(kernel: tf.Tensor, weight: float) -> tf.Tensor:
    """L2 penalty ``weight * sum(kernel ** 2)``, the convention of ``keras.regularizers.L2``.

    Do not add it when the layer already carries a Keras L2 kernel regulariser (it would count
    twice).
    """
    return tf.cast(weight, tf.float32) * tf.reduce_sum(tf.square(tf.cast(kernel, tf.float32)))


def equivariance_target(
    view1_patch_probs: tf.Tensor,
    image_labels: tf.Tensor,
    params1: tf.Tensor,
    params2: tf.Tensor,
    out_grid: int | tf.Tensor,
    merge_eps: float = DEFAULT_EPS,
) -> tf.Tensor:
    """The ET target: the main view's prediction, without gradient, in view 2's geometry, merged.

    Returns:
        float32 (B, g, g, K) distributions over classes.
    """
    frozen = tf.stop_gradient(tf.cast(view1_patch_probs, tf.float32))
    mapped = map_target(frozen, params1, params2, out_grid)
    return label_merge(mapped, image_labels, merge_eps)


def equivariance_loss(
    view1_patch_probs: tf.Tensor,
    mosaic_patch_probs: tf.Tensor,
    image_labels: tf.Tensor,
    params1: tf.Tensor,
    params2: tf.Tensor,
    eps: float = PROB_EPS,
    merge_eps: float = DEFAULT_EPS,
) -> tf.Tensor:
    """Categorical cross-entropy between the mapped main-view target and the second views.

    The mosaic output is split back into per-image grids (views 4i..4i+3 of mosaic i); the
    target is :func:`equivariance_target`. The caller must produce ``view1_patch_probs`` without
    dropout; no gradient flows into it here.

    Args:
        view1_patch_probs: (B, G, G, K) patch probabilities of the main views.
        mosaic_patch_probs: (B / 4, 2g, 2g, K) patch probabilities of the 2x2 mosaics.
        image_labels: (B, K) multi-hot labels.
        params1: (B, 7) ViewParams of the main views.
        params2: (B, 7) ViewParams of the second views.
        eps: Second-view probabilities are clipped to at least eps before the log.
        merge_eps: Passed to :func:`~vitpcm.model.label_merge.label_merge`.

    Returns:
        float32 scalar: cross-entropy summed over classes, averaged over patches and images.
    """
    view2 = tf.cast(split_mosaic(mosaic_patch_probs), tf.float32)
    out_grid = view2.shape[1] if view2.shape[1] is not None else tf.shape(view2)[1]
    target = equivariance_target(
        view1_patch_probs, image_labels, params1, params2, out_grid, merge_eps
    )
    log_probs = tf.math.log(tf.clip_by_value(view2, eps, 1.0))
    return -tf.reduce_mean(tf.reduce_sum(target * log_probs, axis=-1))


def total_loss(
    image_labels: tf.Tensor,
    class_probs: tf.Tensor,
    *,
    kernel: tf.Tensor | None = None,
    l2: float = 0.01,
    view1_patch_probs: tf.Tensor | None = None,
    mosaic_patch_probs: tf.Tensor | None = None,
    params1: tf.Tensor | None = None,
    params2: tf.Tensor | None = None,
    weights: LossWeights | None = None,
) -> dict[str, tf.Tensor]:
    """All loss terms and their weighted sum, for the training step and for logging.

    Args:
        image_labels: (B, K) multi-hot labels.
        class_probs: (B, K) pooled probabilities of the main views.
        kernel: Patch-classifier kernel for the L2 term; None gives an L2 term of 0 (e.g. when
            the layer carries its own Keras regulariser).
        l2: L2 coefficient (model.l2).
        view1_patch_probs: Main-view patch probabilities from a no-dropout pass; with
            ``mosaic_patch_probs``, ``params1`` and ``params2`` it enables the ET term (0 if None).
        mosaic_patch_probs: Mosaic patch probabilities, see :func:`equivariance_loss`.
        params1: Main-view ViewParams (B, 7).
        params2: Second-view ViewParams (B, 7).
        weights: The ``train.loss_weights`` section (``None``: all 1, as in the paper).

    Returns:
        ``{"bce", "et", "l2", "total"}`` float32 scalars; the first three unweighted, ``total``
        the weighted sum.
    """
    terms = {"bce": bce_loss(image_labels, class_probs)}
    if kernel is None:
        terms["l2"] = tf.constant(0.0, tf.float32)
    else:
        terms["l2"] = l2_loss(kernel, l2)
    et_inputs = (view1_patch_probs, mosaic_patch_probs, params1, params2)
    if any(value is None for value in et_inputs):
        if any(value is not None for value in et_inputs):
            raise ValueError(
                "the equivariance term needs view1_patch_probs, mosaic_patch_probs, params1 "
                "and params2 together"
            )
        terms["et"] = tf.constant(0.0, tf.float32)
    else:
        terms["et"] = equivariance_loss(
            view1_patch_probs, mosaic_patch_probs, image_labels, params1, params2
        )
    weights = weights or LossWeights()
    terms["total"] = tf.add_n([getattr(weights, name) * terms[name] for name in LOSS_TERMS])
    return {name: terms[name] for name in (*LOSS_TERMS, "total")}
