"""Label merge and baseline pseudo masks (as ``vitpcm eval`` makes them) on hand-made maps."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from vitpcm.eval import merged_probabilities
from vitpcm.model.label_merge import label_merge

# One image, a 1x3 grid, 3 classes; class 2 is absent from the image labels.
MAPS = np.array([[[[0.6, 0.1, 0.3], [0.2, 0.2, 0.6], [0.1, 0.4, 0.5]]]], dtype=np.float32)
LABELS = np.array([[1.0, 1.0, 0.0]], dtype=np.float32)


def test_label_merge_masks_max_normalises_and_renormalises():
    merged = label_merge(MAPS, LABELS, eps=0.0).numpy()
    # Masked: [.6 .1 0], [.2 .2 0], [.1 .4 0]; class peaks .6 and .4;
    # divided: [1 .25 0], [1/3 .5 0], [1/6 1 0]; renormalised:
    expected = [[[[0.8, 0.2, 0.0], [0.4, 0.6, 0.0], [1 / 7, 6 / 7, 0.0]]]]
    np.testing.assert_allclose(merged, expected, rtol=1e-6)
    # The max normalisation decides the middle pixel (a 0.2 / 0.2 tie before it), and the
    # absent class 2 (the largest raw score there) never wins.
    np.testing.assert_array_equal(np.argmax(merged, axis=-1), [[[0, 1, 1]]])


def test_label_merge_eps_is_added_to_each_class_peak():
    merged = label_merge(MAPS, LABELS, eps=0.1).numpy()
    divided = MAPS[..., :2] / np.array([0.6 + 0.1, 0.4 + 0.1])
    expected = divided / divided.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(merged[..., :2], expected, rtol=1e-6)
    assert not merged[..., 2].any()


def test_label_merge_falls_back_to_uniform_over_present_classes_on_all_zero_pixels():
    maps = np.zeros((2, 1, 2, 3), np.float32)
    maps[:, 0, 0] = [0.0, 0.0, 1.0]  # all mass on an absent class
    maps[:, 0, 1] = [0.3, 0.7, 0.0]
    labels = np.array([[1, 1, 0], [0, 0, 0]], np.float32)  # second image: no labels at all
    merged = label_merge(maps, labels, eps=0.0).numpy()
    assert np.isfinite(merged).all()
    np.testing.assert_allclose(merged[0, 0, 0], [0.5, 0.5, 0.0])
    # The other pixel holds both present classes' peaks: each becomes 1, then 1/2 each.
    np.testing.assert_allclose(merged[0, 0, 1], [0.5, 0.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(merged[1, 0], np.full((2, 3), 1 / 3), rtol=1e-6)
    np.testing.assert_allclose(merged.sum(axis=-1), 1.0, rtol=1e-6)


def test_label_merge_accepts_half_precision_and_integer_labels():
    merged = label_merge(tf.constant(MAPS, tf.float16), tf.constant(LABELS, tf.int32), eps=0.0)
    assert merged.dtype == tf.float32
    np.testing.assert_allclose(merged.numpy()[0, 0, 0], [0.8, 0.2, 0.0], atol=1e-3)


def _two_cell_maps() -> tuple[np.ndarray, np.ndarray]:
    """1x2 grid: left cell class 0, right cell class 1, absent class 2 strong everywhere."""
    maps = np.array([[[[0.5, 0.0, 0.5], [0.0, 0.4, 0.6]]]], np.float32)
    return maps, np.array([[1, 1, 0]], np.float32)


def _bpm(maps: np.ndarray, labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """The baseline pseudo mask of one image, as :func:`vitpcm.eval.evaluate_model` scores it."""
    return merged_probabilities(maps, labels, height, width).argmax(axis=-1)


def test_baseline_pseudo_mask_upsamples_probabilities_then_takes_the_argmax():
    maps, labels = _two_cell_maps()
    # Merged: left [1 0 0], right [0 1 0]. Bilinear to width 6 with half-pixel centres samples
    # x = (i + .5) / 3 - .5 = -1/3, 0, 1/3, 2/3, 1, 4/3 -> class-1 weight 0, 0, 1/3, 2/3, 1, 1.
    probs = merged_probabilities(maps[0], labels[0], 2, 6)
    np.testing.assert_allclose(probs[..., 1], [[0, 0, 1 / 3, 2 / 3, 1, 1]] * 2, atol=1e-6)
    np.testing.assert_array_equal(_bpm(maps[0], labels[0], 2, 6), [[0, 0, 0, 1, 1, 1]] * 2)
    np.testing.assert_array_equal(_bpm(maps[0], labels[0], 1, 2), [[0, 1]])


def test_baseline_pseudo_mask_has_each_labels_own_size():
    maps, labels = _two_cell_maps()
    for height, width, expected_row in [(3, 4, [0, 0, 1, 1]), (1, 6, [0, 0, 0, 1, 1, 1])]:
        mask = _bpm(maps[0], labels[0], height, width)
        assert mask.shape == (height, width)
        np.testing.assert_array_equal(mask, np.tile(expected_row, (height, 1)))


@pytest.mark.parametrize("label_dtype", [np.float32, np.int64])
def test_baseline_pseudo_mask_never_predicts_an_absent_class(label_dtype):
    maps = np.random.default_rng(0).dirichlet(np.ones(5), size=(2, 4, 4)).astype(np.float32)
    labels = np.array([[1, 0, 1, 0, 0], [1, 1, 0, 0, 1]], label_dtype)
    assert set(np.unique(_bpm(maps[0], labels[0], 9, 7))) <= {0, 2}
    assert set(np.unique(_bpm(maps[1], labels[1], 9, 7))) <= {0, 1, 4}
