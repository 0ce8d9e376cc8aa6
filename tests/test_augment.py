"""Colour jitter and resizing: stateless, reproducible, clipped to [0, 255]."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from vitpcm.data.augment import (
    ColorJitter,
    color_jitter,
    random_contrast,
    random_grayscale,
    random_hue,
    random_saturation,
    resize_image,
    setting,
)
from vitpcm.errors import ConfigError

STRONG = ColorJitter(contrast=0.5, saturation=0.5, hue=0.2, grayscale_prob=0.3)


def _image(seed: int = 0, size: int = 16) -> tf.Tensor:
    rng = np.random.default_rng(seed)
    return tf.constant(rng.uniform(0, 255, (size, size, 3)), tf.float32)


def _seed(a: int, b: int = 0) -> tf.Tensor:
    return tf.constant([a, b], tf.int64)


def test_same_seed_same_result_other_seed_differs() -> None:
    image = _image()
    first = color_jitter(image, _seed(3), STRONG).numpy()
    again = color_jitter(image, _seed(3), STRONG).numpy()
    other = color_jitter(image, _seed(4), STRONG).numpy()
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert first.dtype == np.float32 and first.shape == (16, 16, 3)


def test_output_stays_in_pixel_range() -> None:
    extreme = ColorJitter(contrast=3.0, saturation=3.0, hue=0.5, grayscale_prob=0.5)
    for i in range(8):
        out = color_jitter(_image(i), _seed(i), extreme).numpy()
        assert out.min() >= 0.0 and out.max() <= 255.0


def test_zero_strengths_are_identity() -> None:
    image = _image()
    assert ColorJitter().is_identity
    np.testing.assert_array_equal(color_jitter(image, _seed(1), ColorJitter()).numpy(), image)
    for op in (random_contrast, random_saturation, random_hue, random_grayscale):
        np.testing.assert_array_equal(op(image, 0.0, _seed(1)).numpy(), image)


def test_contrast_keeps_channel_means() -> None:
    # Moderate contrast change on a mid-grey-ish image: no clipping, so means are kept.
    image = tf.constant(np.random.default_rng(0).uniform(100, 150, (8, 8, 3)), tf.float32)
    out = random_contrast(image, 0.5, _seed(2)).numpy()
    np.testing.assert_allclose(out.mean(axis=(0, 1)), image.numpy().mean(axis=(0, 1)), atol=1e-3)
    assert not np.allclose(out, image)


def test_saturation_and_hue_change_colour_not_grey() -> None:
    grey = tf.fill([4, 4, 3], 90.0)
    np.testing.assert_allclose(random_saturation(grey, 0.9, _seed(5)).numpy(), 90.0, atol=1e-3)
    np.testing.assert_allclose(random_hue(grey, 0.4, _seed(5)).numpy(), 90.0, atol=1e-3)
    red = tf.constant(np.tile([200.0, 20.0, 20.0], (4, 4, 1)), tf.float32)
    shifted = random_hue(red, 0.4, _seed(6)).numpy()
    assert not np.allclose(shifted, red.numpy(), atol=1.0)


def test_grayscale_probability_one_and_zero() -> None:
    image = _image()
    grey = random_grayscale(image, 1.0, _seed(1)).numpy()
    np.testing.assert_allclose(grey[..., 0], grey[..., 1])
    np.testing.assert_allclose(grey[..., 1], grey[..., 2])
    assert grey.shape == (16, 16, 3)
    # Half the seeds turn grey at p = 0.5.
    turned = sum(
        bool(
            np.allclose(
                random_grayscale(image, 0.5, _seed(i)).numpy()[..., 0],
                random_grayscale(image, 0.5, _seed(i)).numpy()[..., 1],
            )
        )
        for i in range(40)
    )
    assert 8 <= turned <= 32


def test_resize_image_dtype_shape_range() -> None:
    image = tf.constant(np.random.default_rng(1).integers(0, 256, (30, 50, 3)), tf.uint8)
    out = resize_image(image, 32)
    assert out.dtype == tf.float32 and out.shape == (32, 32, 3)
    assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 255.0
    assert resize_image(image, (16, 24)).shape == (16, 24, 3)
    flat = resize_image(tf.fill([10, 10, 3], tf.constant(77, tf.uint8)), 20).numpy()
    np.testing.assert_allclose(flat, 77.0)


def test_settings_from_object_dict_or_none() -> None:
    section = SimpleNamespace(
        contrast=0.3, saturation=0.2, hue=0.1, grayscale_prob=0.05, flip=True, transpose=True
    )
    assert ColorJitter.from_settings(section) == ColorJitter(0.3, 0.2, 0.1, 0.05)
    assert ColorJitter.from_settings({"hue": 0.1}) == ColorJitter(hue=0.1)
    assert ColorJitter.from_settings(None).is_identity
    assert setting({"a": None}, "a", 5) == 5
    assert setting(section, "flip", False) is True


@pytest.mark.parametrize(
    "kwargs",
    [{"contrast": -0.1}, {"hue": 0.6}, {"grayscale_prob": 1.5}, {"saturation": -1.0}],
)
def test_bad_strengths_are_config_errors(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="data.augment"):
        ColorJitter(**kwargs)
