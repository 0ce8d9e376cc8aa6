"""Colour jitter and resizing: stateless, reproducible, clipped to [0, 255]."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf

from vitpcm.config import AugmentConfig, EtConfig, config_from_dict
from vitpcm.data.augment import (
    TrainingViews,
    apply_color_matrix,
    chroma_matrix,
    color_jitter,
    grayscale_matrix,
    random_contrast,
    random_grayscale,
    random_hue,
    random_saturation,
    resize_image,
)
from vitpcm.errors import ConfigError

STRONG = AugmentConfig(contrast=0.5, saturation=0.5, hue=0.2, grayscale_prob=0.3)
NONE = AugmentConfig(contrast=0.0, saturation=0.0, hue=0.0, grayscale_prob=0.0)


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
    extreme = AugmentConfig(contrast=3.0, saturation=3.0, hue=0.5, grayscale_prob=0.5)
    for i in range(8):
        out = color_jitter(_image(i), _seed(i), extreme).numpy()
        assert out.min() >= 0.0 and out.max() <= 255.0


def test_zero_strengths_are_identity() -> None:
    image = _image()
    np.testing.assert_array_equal(color_jitter(image, _seed(1), NONE).numpy(), image)
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


def test_colour_matrices() -> None:
    np.testing.assert_allclose(chroma_matrix().numpy(), np.eye(3), atol=1e-5)
    np.testing.assert_allclose(chroma_matrix(hue=1.0).numpy(), np.eye(3), atol=1e-5)  # full turn
    np.testing.assert_allclose(grayscale_matrix().numpy(), [[0.299, 0.587, 0.114]] * 3, atol=1e-4)
    # Hue and saturation keep the luma; a half turn then another half turn is the identity.
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    turned = chroma_matrix(saturation=1.3, hue=0.2).numpy()
    np.testing.assert_allclose(luma @ turned, luma, atol=1e-4)
    half = chroma_matrix(hue=0.5)
    np.testing.assert_allclose((half @ half).numpy(), np.eye(3), atol=1e-4)
    image = tf.constant([[[200.0, 20.0, 20.0]]])
    assert apply_color_matrix(image, chroma_matrix(hue=1 / 3)).numpy()[0, 0].argmax() != 0


def test_fused_jitter_equals_the_ops_in_turn() -> None:
    # Mid-range pixels and mild strengths: nothing clips, so fusing changes nothing.
    image = tf.constant(np.random.default_rng(3).uniform(90, 160, (8, 8, 3)), tf.float32)
    jitter = AugmentConfig(contrast=0.2, saturation=0.2, hue=0.05, grayscale_prob=0.5)
    fold = tf.random.experimental.stateless_fold_in
    for i in range(6):
        seed = _seed(i)
        step = random_contrast(image, jitter.contrast, fold(seed, 1))
        step = random_saturation(step, jitter.saturation, fold(seed, 2))
        step = random_hue(step, jitter.hue, fold(seed, 3))
        step = random_grayscale(step, jitter.grayscale_prob, fold(seed, 4))
        fused = color_jitter(image, seed, jitter)
        np.testing.assert_allclose(fused.numpy(), step.numpy(), atol=1e-3)


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


@pytest.mark.parametrize(
    ("key", "value", "interval"),
    [("contrast", -0.1, "[0, 1]"), ("saturation", -1.0, "[0, 1]"), ("hue", 0.6, "[0, 0.5]")],
)
def test_bad_strengths_are_refused_when_the_config_loads(
    key: str, value: float, interval: str
) -> None:
    with pytest.raises(ConfigError, match=rf"data\.augment\.{key}: must be in \{interval}"):
        config_from_dict({"data": {"augment": {key: value}}})


def test_training_views_are_reproducible_per_seed() -> None:
    et = EtConfig(enabled=True, view_size=16, crop_size=16, crop_prob=0.5)
    views = TrainingViews(32, 16, replace(NONE, hue=0.1), et)
    image = tf.constant(np.random.default_rng(2).integers(0, 256, (20, 30, 3)), tf.uint8)
    first, again = views(image, _seed(1)), views(image, _seed(1))
    assert set(first) == {"image", "params1", "view2", "params2"}
    assert first["image"].shape == (32, 32, 3) and first["view2"].shape == (16, 16, 3)
    for key in first:
        np.testing.assert_array_equal(first[key].numpy(), again[key].numpy())
    assert not np.array_equal(views(image, _seed(2))["view2"].numpy(), first["view2"].numpy())
    no_et = TrainingViews(32, 16)(image, _seed(1))
    assert set(no_et) == {"image", "params1"}
    np.testing.assert_array_equal(no_et["params1"].numpy()[:4], [0, 0, 0, 0])
    disabled = TrainingViews(32, 16, None, replace(et, enabled=False))(image, _seed(1))
    assert set(disabled) == {"image", "params1"}


@pytest.mark.parametrize(
    ("et", "match"),
    [
        ({"view_size": 20}, "view_size"),
        ({"crop_size": 48}, "crop_size"),
        ({"crop_size": 24}, "crop_size"),
        ({"crop_prob": 1.5}, "crop_prob"),
    ],
)
def test_second_view_sizes_off_the_patch_grid_are_refused_when_the_config_loads(
    et: dict, match: str
) -> None:
    settings = {"enabled": True, "view_size": 16, "crop_size": 16, "crop_prob": 0.5, **et}
    raw = {
        "data": {"image_size": 32, "test_size": 32},
        "model": {"backbone": "vit_ti16"},
        "train": {"batch_size": 4, "et": settings},
    }
    with pytest.raises(ConfigError, match=rf"train\.et\.{match}"):
        config_from_dict(raw)
