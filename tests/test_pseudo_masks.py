"""The worker-side pseudo masks equal the TensorFlow merge + upsampling, and stream in order."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from vitpcm.eval import merged_probabilities
from vitpcm.model.label_merge import DEFAULT_EPS
from vitpcm.pseudo_masks import MERGE_EPS, Task, finish, finish_map, label_merge, resize_bilinear


def _case(seed: int, grid: tuple[int, int], k: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(*grid, k)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = np.zeros(k, np.float32)
    labels[0] = labels[rng.choice(np.arange(1, k), 2, replace=False)] = 1.0
    return probs.astype(np.float32), labels


def test_the_epsilon_is_the_merge_one() -> None:
    assert MERGE_EPS == DEFAULT_EPS


@pytest.mark.parametrize(
    "grid, size", [((8, 8), (500, 375)), ((60, 60), (375, 500)), ((5, 7), (5, 7)), ((6, 6), (3, 4))]
)
def test_merge_and_upsampling_match_tensorflow(
    grid: tuple[int, int], size: tuple[int, int]
) -> None:
    for seed in range(3):
        probs, labels = _case(seed, grid)
        expected = merged_probabilities(probs, labels, *size)
        got = resize_bilinear(label_merge(probs, labels), *size)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
        np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))


def test_merge_without_any_present_mass_is_uniform_over_present_classes() -> None:
    probs = np.zeros((2, 2, 4), np.float32)
    probs[..., 3] = 1.0  # all the mass on an absent class
    labels = np.array([1, 0, 1, 0], np.float32)
    got = label_merge(probs, labels)
    expected = tf.constant(merged_probabilities(probs, labels, 2, 2))
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-7)
    np.testing.assert_allclose(got[0, 0], [0.5, 0, 0.5, 0])


def test_pool_results_equal_in_process_ones_in_input_order() -> None:
    tasks = []
    for seed in range(5):
        probs, labels = _case(seed, (6, 6))
        image = np.random.default_rng(seed).integers(0, 255, (40, 30, 3), dtype=np.uint8)
        tasks.append(Task(f"img{seed}", probs, labels, 40, 30, image=image, crf_params={}))
    pooled = list(finish_map(iter(tasks), workers=2, max_in_flight=2))
    assert [r.stem for r in pooled] == [f"img{i}" for i in range(5)]
    for result, task in zip(pooled, tasks, strict=True):
        alone = finish(task)
        assert result.png == alone.png and result.npz == alone.npz
        assert result.crf_png == alone.crf_png
        np.testing.assert_array_equal(result.crf_labels, alone.crf_labels)
        # Only present classes in the masks.
        assert set(np.unique(result.prediction)) <= set(np.flatnonzero(task.labels))
