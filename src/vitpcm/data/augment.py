"""Photometric augmentation and resizing for training views (METHOD.md, "Augmentation").

Every random op here is *stateless*: it takes an explicit ``seed`` tensor of shape ``[2]``
so that a seeded input pipeline yields the same batches each time it is built, whatever
the parallelism. Images are float32 RGB in ``[0, 255]`` (the network rescales to
``[-1, 1]`` itself); every op clips back to that range.

The paper's second view gets *its own* colour jitter, so callers draw two seeds and call
:func:`color_jitter` twice on the same canonical image.
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
    factor = tf.random.stateless_uniform(
        [], seed, minval=max(0.0, 1.0 - strength), maxval=1.0 + strength
    )
    return tf.clip_by_value(tf.image.adjust_contrast(image, factor), 0.0, 255.0)


def random_saturation(image: Any, strength: float, seed: Any) -> Any:
    """Scale the HSV saturation by a factor in ``[1 - s, 1 + s]``."""
    import tensorflow as tf

    if strength <= 0:
        return image
    factor = tf.random.stateless_uniform(
        [], seed, minval=max(0.0, 1.0 - strength), maxval=1.0 + strength
    )
    # The HSV ops expect [0, 1] floats.
    out = tf.image.adjust_saturation(image / 255.0, factor) * 255.0
    return tf.clip_by_value(out, 0.0, 255.0)


def random_hue(image: Any, max_delta: float, seed: Any) -> Any:
    """Rotate the hue by a shift in ``[-max_delta, max_delta]`` (fraction of the wheel)."""
    import tensorflow as tf

    if max_delta <= 0:
        return image
    delta = tf.random.stateless_uniform([], seed, minval=-max_delta, maxval=max_delta)
    out = tf.image.adjust_hue(image / 255.0, delta) * 255.0
    return tf.clip_by_value(out, 0.0, 255.0)


def random_grayscale(image: Any, prob: float, seed: Any) -> Any:
    """With probability ``prob`` replace the image by its luma, repeated on 3 channels."""
    import tensorflow as tf

    if prob <= 0:
        return image
    gray = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
    take = tf.random.stateless_uniform([], seed) < prob
    return tf.where(take, gray, image)


def color_jitter(image: Any, seed: Any, jitter: ColorJitter) -> Any:
    """Apply contrast, saturation, hue and occasional grayscale, each with its own seed.

    Args:
        image: float32 (H, W, 3) image in ``[0, 255]``.
        seed: int32/int64 tensor of shape ``[2]``; the same seed gives the same result.
        jitter: strengths; zero strengths skip their op entirely.

    Returns:
        The jittered float32 image, clipped to ``[0, 255]``.
    """
    if jitter.is_identity:
        return image
    image = random_contrast(image, jitter.contrast, _op_seed(seed, _CONTRAST))
    image = random_saturation(image, jitter.saturation, _op_seed(seed, _SATURATION))
    image = random_hue(image, jitter.hue, _op_seed(seed, _HUE))
    return random_grayscale(image, jitter.grayscale_prob, _op_seed(seed, _GRAYSCALE))
