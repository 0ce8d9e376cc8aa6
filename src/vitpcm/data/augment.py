"""Training augmentation: colour jitter, resizing and the two ET views (METHOD.md).

Every random op here is *stateless*: it takes an explicit ``seed`` tensor of shape ``[2]``
so that a seeded input pipeline yields the same batches each time it is built, whatever
the parallelism. Images are float32 RGB in ``[0, 255]`` (the network rescales to
``[-1, 1]`` itself); every op clips back to that range.

The paper's second view gets *its own* colour jitter: :class:`TrainingViews` draws one seed
per view and calls :func:`color_jitter` twice on the same canonical image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitpcm.errors import ConfigError

# Salts that turn one per-image seed into independent per-op seeds.
_CONTRAST, _SATURATION, _HUE, _GRAYSCALE = 1, 2, 3, 4


@dataclass(frozen=True)
class ColorJitter:
    """Strengths of the colour jitter.

    Attributes:
        contrast: contrast factor drawn from ``[max(0, 1 - contrast), 1 + contrast]``.
        saturation: saturation factor drawn from ``[max(0, 1 - s), 1 + s]``.
        hue: hue shift drawn from ``[-hue, hue]`` (fraction of the colour wheel, <= 0.5).
        grayscale_prob: probability of turning the image grey (kept 3-channel).
    """

    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_prob: float = 0.0

    def __post_init__(self) -> None:
        for name in ("contrast", "saturation", "hue", "grayscale_prob"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.augment.{name} must be >= 0, got {getattr(self, name)}")
        if self.hue > 0.5:
            raise ConfigError(
                f"data.augment.hue must be <= 0.5 (half the colour wheel), got {self.hue}"
            )
        if self.grayscale_prob > 1:
            raise ConfigError(
                f"data.augment.grayscale_prob must be in [0, 1], got {self.grayscale_prob}"
            )

    @property
    def is_identity(self) -> bool:
        """Whether the jitter leaves every image unchanged."""
        return not (self.contrast or self.saturation or self.hue or self.grayscale_prob)

    @classmethod
    def from_settings(cls, settings: Any) -> ColorJitter:
        """Build from ``cfg.data.augment`` (attributes), a dict, or ``None`` (no jitter)."""
        if settings is None:
            return cls()
        return cls(
            contrast=float(setting(settings, "contrast", 0.0)),
            saturation=float(setting(settings, "saturation", 0.0)),
            hue=float(setting(settings, "hue", 0.0)),
            grayscale_prob=float(setting(settings, "grayscale_prob", 0.0)),
        )


def setting(settings: Any, name: str, default: Any = None) -> Any:
    """Read ``name`` from a config section given as a dataclass/object or a mapping."""
    if settings is None:
        return default
    if isinstance(settings, dict):
        value = settings.get(name, default)
    else:
        value = getattr(settings, name, default)
    return default if value is None else value


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


def color_jitter(image: Any, seed: Any, jitter: ColorJitter) -> Any:
    """Apply contrast, then saturation, hue and occasional grayscale, each with its own seed.

    All four are fused into one affine colour map (one pass over the pixels); the result
    equals applying :func:`random_contrast`, :func:`random_saturation`, :func:`random_hue`
    and :func:`random_grayscale` in turn, except that only the end result is clipped.

    Args:
        image: float32 (H, W, 3) image in ``[0, 255]``.
        seed: int32/int64 tensor of shape ``[2]``; the same seed gives the same result.
        jitter: strengths; zero strengths skip their op entirely.

    Returns:
        The jittered float32 image, clipped to ``[0, 255]``.
    """
    import tensorflow as tf

    if jitter.is_identity:
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
    different jitter, its own flips/transpose and, with probability ``crop_prob``, a
    patch-aligned crop, and is resized to ``view_size`` (see
    :func:`vitpcm.model.equivariance.make_second_view`). Each view's geometry is returned as
    its ViewParams so the loss can map view 1's prediction onto view 2.
    """

    image_size: int
    patch_size: int
    jitter: ColorJitter
    allow_flip: bool
    allow_transpose: bool
    et_enabled: bool
    view_size: int
    crop_cells: int
    crop_prob: float

    @classmethod
    def from_settings(
        cls, image_size: int, patch_size: int, augment: Any = None, et: Any = None
    ) -> TrainingViews:
        """Build from ``cfg.data.augment`` and ``cfg.train.et`` (objects, dicts or ``None``).

        Raises:
            ConfigError: a view or crop size that does not fit the patch grid.
        """
        et_enabled = bool(setting(et, "enabled", False))
        view_size = int(setting(et, "view_size", image_size // 2))
        crop_size = int(setting(et, "crop_size", min(128, image_size)))
        crop_prob = float(setting(et, "crop_prob", 0.0))
        if et_enabled:
            if view_size <= 0 or view_size % patch_size:
                raise ConfigError(
                    f"train.et.view_size={view_size} must be a positive multiple of the patch "
                    f"size {patch_size}"
                )
            if crop_size % patch_size or not patch_size <= crop_size <= image_size:
                raise ConfigError(
                    f"train.et.crop_size={crop_size} must be a multiple of the patch size "
                    f"{patch_size} between {patch_size} and data.image_size={image_size}"
                )
            if not 0.0 <= crop_prob <= 1.0:
                raise ConfigError(f"train.et.crop_prob must be in [0, 1], got {crop_prob}")
        return cls(
            image_size=image_size,
            patch_size=patch_size,
            jitter=ColorJitter.from_settings(augment),
            allow_flip=bool(setting(augment, "flip", False)),
            allow_transpose=bool(setting(augment, "transpose", False)),
            et_enabled=et_enabled,
            view_size=view_size,
            crop_cells=max(1, crop_size // patch_size),
            crop_prob=crop_prob,
        )

    def __call__(self, image: Any, seed: Any) -> dict[str, Any]:
        """Views of one (H, W, 3) image of any dtype, reproducible per ``seed`` (shape [2]).

        Returns:
            ``{"image": (S, S, 3), "params1": (7,)}`` plus, with ET on,
            ``{"view2": (v, v, 3), "params2": (7,)}``; images float32 in ``[0, 255]``.
        """
        import tensorflow as tf

        from vitpcm.model import equivariance

        grid = self.image_size // self.patch_size
        keys = tf.random.experimental.stateless_split(seed, num=4)
        canonical = resize_image(image, self.image_size)
        params1 = equivariance.sample_view_params(
            keys[0], grid, self.crop_cells, 0.0, self.allow_flip, self.allow_transpose
        )
        view1 = equivariance.apply_flips(color_jitter(canonical, keys[1], self.jitter), params1)
        view1.set_shape([self.image_size, self.image_size, 3])
        out = {"image": view1, "params1": params1}
        if self.et_enabled:
            params2 = equivariance.sample_view_params(
                keys[2],
                grid,
                self.crop_cells,
                self.crop_prob,
                self.allow_flip,
                self.allow_transpose,
            )
            view2 = equivariance.make_second_view(
                color_jitter(canonical, keys[3], self.jitter),
                params2,
                self.patch_size,
                self.view_size,
            )
            view2.set_shape([self.view_size, self.view_size, 3])
            out["view2"] = view2
            out["params2"] = params2
        return out
