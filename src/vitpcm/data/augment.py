"""Training augmentation: colour jitter, resizing and the two ET views (METHOD.md).

Every random op here is *stateless*: it takes an explicit ``seed`` tensor of shape ``[2]``
so that a seeded input pipeline yields the same batches each time it is built, whatever
the parallelism. Images are float32 RGB in ``[0, 255]`` (the network rescales to
``[-1, 1]`` itself); every op clips back to that range.

The paper's second view gets *its own* colour jitter: :class:`TrainingViews` draws one seed
per view and calls :func:`color_jitter` twice on the same canonical image. Strengths come
from the ``data.augment`` config section, validated when the config is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitpcm.config import AugmentConfig, EtConfig

# Salts that turn one per-image seed into independent per-op seeds.
_CONTRAST, _SATURATION, _HUE, _GRAYSCALE = 1, 2, 3, 4


# What ``augment=None`` means: the image as it is, only resized.
_NO_AUGMENT = AugmentConfig(
    contrast=0.0, saturation=0.0, hue=0.0, grayscale_prob=0.0, flip=False, transpose=False
)


def resize_image(image: Any, size: int | tuple[int, int]) -> Any:
    """Bilinear resize of an (H, W, 3) image of any dtype to float32 in ``[0, 255]``.

    Args:
        image: uint8 or float image tensor, (H, W, C) or batched (B, H, W, C).
        size: output side (square) or ``(height, width)``.
    """
    import tensorflow as tf

    hw = (size, size) if isinstance(size, int) else tuple(size)
    resized = tf.image.resize(tf.cast(image, tf.float32), hw, method="bilinear")
    return tf.clip_by_value(resized, 0.0, 255.0)


def _op_seed(seed: Any, salt: int) -> Any:
    import tensorflow as tf

    return tf.random.experimental.stateless_fold_in(seed, salt)


def random_contrast(image: Any, strength: float, seed: Any) -> Any:
    """Scale each channel's deviation from its mean by a factor in ``[1 - s, 1 + s]``."""
    import tensorflow as tf

    if strength <= 0:
        return image
    factor = _contrast_factor(strength, seed)
    return tf.clip_by_value(tf.image.adjust_contrast(image, factor), 0.0, 255.0)


def _contrast_factor(strength: float, seed: Any) -> Any:
    import tensorflow as tf

    return tf.random.stateless_uniform(
        [], seed, minval=max(0.0, 1.0 - strength), maxval=1.0 + strength
    )


# RGB -> YIQ. In YIQ, luma is Y and chroma the (I, Q) plane: scaling the plane changes the
# saturation and rotating it the hue, both leaving luma (and greys) untouched. As 3x3
# matrices they fuse into one per-pixel product, several times cheaper than a round trip
# through HSV, which dominated the cost of the whole input pipeline.
_RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.595716, -0.274453, -0.321263),
    (0.211456, -0.522591, 0.311135),
)


def _yiq_matrices() -> tuple[Any, Any]:
    import numpy as np
    import tensorflow as tf

    forward = np.asarray(_RGB_TO_YIQ, np.float64)
    return tf.constant(forward, tf.float32), tf.constant(np.linalg.inv(forward), tf.float32)


def chroma_matrix(saturation: Any = 1.0, hue: Any = 0.0) -> Any:
    """(3, 3) RGB matrix scaling saturation by ``saturation`` and turning hue by ``hue``.

    ``hue`` is a fraction of the colour wheel (0.5 = half a turn). Greys are fixed points.
    """
    import math

    import tensorflow as tf

    forward, inverse = _yiq_matrices()
    angle = 2.0 * math.pi * tf.cast(hue, tf.float32)
    cos, sin = tf.cos(angle), tf.sin(angle)
    scale = tf.cast(saturation, tf.float32)
    zero, one = tf.zeros([]), tf.ones([])
    chroma = tf.stack(
        [
            tf.stack([one, zero, zero]),
            tf.stack([zero, scale * cos, -scale * sin]),
            tf.stack([zero, scale * sin, scale * cos]),
        ]
    )
    return inverse @ chroma @ forward


def grayscale_matrix() -> Any:
    """(3, 3) RGB matrix putting the luma (0.299 R + 0.587 G + 0.114 B) on every channel."""
    return chroma_matrix(saturation=0.0)


def apply_color_matrix(image: Any, matrix: Any) -> Any:
    """Multiply every pixel's RGB by ``matrix`` and clip to ``[0, 255]``."""
    import tensorflow as tf

    return tf.clip_by_value(_times_matrix(image, matrix), 0.0, 255.0)


def _times_matrix(image: Any, matrix: Any) -> Any:
    import tensorflow as tf

    # tensordot lowers to one (pixels x 3) @ (3 x 3) GEMM, faster than an einsum here.
    return tf.tensordot(image, tf.transpose(matrix), axes=1)


def _saturation_factor(strength: float, seed: Any) -> Any:
    return _contrast_factor(strength, seed)  # the same [1 - s, 1 + s] law


def _hue_delta(max_delta: float, seed: Any) -> Any:
    import tensorflow as tf

    return tf.random.stateless_uniform([], seed, minval=-max_delta, maxval=max_delta)


def random_saturation(image: Any, strength: float, seed: Any) -> Any:
    """Scale the saturation (chroma) by a factor in ``[1 - s, 1 + s]``."""
    if strength <= 0:
        return image
    return apply_color_matrix(image, chroma_matrix(saturation=_saturation_factor(strength, seed)))


def random_hue(image: Any, max_delta: float, seed: Any) -> Any:
    """Turn the hue by a shift in ``[-max_delta, max_delta]`` (fraction of the wheel)."""
    if max_delta <= 0:
        return image
    return apply_color_matrix(image, chroma_matrix(hue=_hue_delta(max_delta, seed)))


def _take_grayscale(prob: float, seed: Any) -> Any:
    import tensorflow as tf

    return tf.random.stateless_uniform([], seed) < prob


def random_grayscale(image: Any, prob: float, seed: Any) -> Any:
    """With probability ``prob`` replace the image by its luma, repeated on 3 channels."""
    import tensorflow as tf

    if prob <= 0:
        return image
    gray = apply_color_matrix(image, grayscale_matrix())
    return tf.where(_take_grayscale(prob, seed), gray, image)


def color_jitter(image: Any, seed: Any, jitter: AugmentConfig) -> Any:
    """Apply contrast, then saturation, hue and occasional grayscale, each with its own seed.

    All four are fused into one affine colour map (one pass over the pixels); the result
    equals applying :func:`random_contrast`, :func:`random_saturation`, :func:`random_hue`
    and :func:`random_grayscale` in turn, except that only the end result is clipped.

    Args:
        image: float32 (H, W, 3) image in ``[0, 255]``.
        seed: int32/int64 tensor of shape ``[2]``; the same seed gives the same result.
        jitter: the ``data.augment`` section; zero strengths skip their op entirely
            (``flip`` and ``transpose`` are not colour ops and are ignored here).

    Returns:
        The jittered float32 image, clipped to ``[0, 255]``.
    """
    import tensorflow as tf

    if not (jitter.contrast or jitter.saturation or jitter.hue or jitter.grayscale_prob):
        return image
    matrix = tf.eye(3)
    if jitter.saturation or jitter.hue:
        saturation = (
            _saturation_factor(jitter.saturation, _op_seed(seed, _SATURATION))
            if jitter.saturation
            else 1.0
        )
        hue = _hue_delta(jitter.hue, _op_seed(seed, _HUE)) if jitter.hue else 0.0
        matrix = chroma_matrix(saturation, hue)
    if jitter.grayscale_prob:
        # Saturation and hue keep the luma, so grey after them is just the luma.
        take = _take_grayscale(jitter.grayscale_prob, _op_seed(seed, _GRAYSCALE))
        matrix = tf.where(take, grayscale_matrix(), matrix)
    if not jitter.contrast:
        return apply_color_matrix(image, matrix)
    # Contrast c about the channel means m, then the matrix M, in one pass:
    # M (c x + (1 - c) m) = c M x + (1 - c) M m.
    factor = _contrast_factor(jitter.contrast, _op_seed(seed, _CONTRAST))
    means = tf.reduce_mean(image, axis=[-3, -2])
    out = factor * _times_matrix(image, matrix)
    out += (1.0 - factor) * tf.linalg.matvec(matrix, means)[..., None, None, :]
    return tf.clip_by_value(out, 0.0, 255.0)


@dataclass(frozen=True)
class TrainingViews:
    """Turns one decoded training image into the paper's views (METHOD.md, ET loss).

    The image is resized to the canonical ``image_size`` square. View 1 is that image with
    its own colour jitter and flips/transpose (never cropped); with ET on, view 2 gets a
    different jitter, its own flips/transpose and, with probability ``et.crop_prob``, a
    patch-aligned crop, and is resized to ``et.view_size`` (see
    :func:`vitpcm.model.equivariance.make_second_view`). Each view's geometry is returned as
    its ViewParams so the loss can map view 1's prediction onto view 2.

    Attributes:
        image_size: side of the canonical image, a multiple of ``patch_size``.
        patch_size: ViT patch side; crops and flips keep to its grid.
        augment: the ``data.augment`` section; ``None`` for no jitter, flip or transpose.
        et: the resolved ``train.et`` section; ``None`` (or ``enabled: false``) for no
            second view.
    """

    image_size: int
    patch_size: int
    augment: AugmentConfig | None = None
    et: EtConfig | None = None

    @property
    def et_enabled(self) -> bool:
        """Whether a second view is made."""
        return self.et is not None and self.et.enabled

    def __call__(self, image: Any, seed: Any) -> dict[str, Any]:
        """Views of one (H, W, 3) image of any dtype, reproducible per ``seed`` (shape [2]).

        Returns:
            ``{"image": (S, S, 3), "params1": (7,)}`` plus, with ET on,
            ``{"view2": (v, v, 3), "params2": (7,)}``; images float32 in ``[0, 255]``.
        """
        import tensorflow as tf

        from vitpcm.model import equivariance

        aug = self.augment or _NO_AUGMENT
        grid = self.image_size // self.patch_size
        keys = tf.random.experimental.stateless_split(seed, num=4)
        canonical = resize_image(image, self.image_size)
        crop_cells = max(1, self.et.crop_size // self.patch_size) if self.et_enabled else 1
        params1 = equivariance.sample_view_params(
            keys[0], grid, crop_cells, 0.0, aug.flip, aug.transpose
        )
        view1 = equivariance.apply_flips(color_jitter(canonical, keys[1], aug), params1)
        view1.set_shape([self.image_size, self.image_size, 3])
        out = {"image": view1, "params1": params1}
        if self.et_enabled:
            et = self.et
            params2 = equivariance.sample_view_params(
                keys[2], grid, crop_cells, et.crop_prob, aug.flip, aug.transpose
            )
            view2 = equivariance.make_second_view(
                color_jitter(canonical, keys[3], aug), params2, self.patch_size, et.view_size
            )
            view2.set_shape([et.view_size, et.view_size, 3])
            out["view2"] = view2
            out["params2"] = params2
        return out
