"""Label merge: per-patch class maps and image labels into per-patch class distributions.

METHOD.md, "Label merge": multiply each class map by the image label (absent classes -> 0),
divide each class map by its spatial maximum, renormalise over classes. Upsampled bilinearly
to the label's size and arg-maxed (:func:`vitpcm.eval.merged_probabilities`) it gives the
baseline pseudo mask (BPM); the same merge turns the main view's prediction into the
equivariance target (:func:`vitpcm.model.losses.equivariance_target`).
"""

from __future__ import annotations

import tensorflow as tf

DEFAULT_EPS = 1e-5


def label_merge(
    class_maps: tf.Tensor, image_labels: tf.Tensor, eps: float = DEFAULT_EPS
) -> tf.Tensor:
    """Masks absent classes, max-normalises each class map and renormalises over classes.

    Each present class map is divided by ``max + eps``: with a small ``eps`` its peak becomes
    (almost) 1, while a present class the network sees nowhere (max ~ 0) stays ~0 instead of
    having its noise blown up to 1. Maps of absent classes are all zero and stay zero.

    A pixel where every present class is exactly zero (all the mass was on absent classes, or
    float underflow) has nothing to renormalise; it gets a uniform distribution over the
    image's present classes (over all K when the image has no labels at all), so the result is
    always a distribution, never NaN. Its argmax is then the lowest present class index,
    which is background in VOC/COCO labels.

    Args:
        class_maps: (B, H, W, K) non-negative class scores (per-patch probabilities), any
            float dtype.
        image_labels: (B, K) multi-hot image labels.
        eps: Added to each class map's maximum before dividing (0 is allowed).

    Returns:
        float32 (B, H, W, K), summing to 1 over K at every pixel.
    """
    maps = tf.cast(class_maps, tf.float32)
    labels = tf.cast(image_labels, tf.float32)[:, None, None, :]
    masked = maps * labels
    peak = tf.reduce_max(masked, axis=[1, 2], keepdims=True)
    # divide_no_nan keeps absent classes (peak 0) at 0 even when eps is 0.
    normalised = tf.math.divide_no_nan(masked, peak + eps)
    total = tf.reduce_sum(normalised, axis=-1, keepdims=True)

    present = tf.cast(labels > 0, tf.float32)
    num_present = tf.reduce_sum(present, axis=-1, keepdims=True)
    uniform = tf.where(num_present > 0, present, tf.ones_like(present))
    uniform = uniform / tf.reduce_sum(uniform, axis=-1, keepdims=True)
    uniform = tf.broadcast_to(uniform, tf.shape(normalised))
    return tf.where(total > 0, tf.math.divide_no_nan(normalised, total), uniform)
