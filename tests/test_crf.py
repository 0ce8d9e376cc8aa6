"""Dense CRF: present-classes shortcut, cleaning a noisy mask, streaming over a pool."""

from __future__ import annotations

import numpy as np
import pytest

from vitpcm.config import CrfConfig
from vitpcm.crf import crf_map, crf_present_classes, crf_refine

K = 21


def two_region_sample(
    seed: int, height: int = 48, width: int = 64, classes: tuple[int, int] = (0, 15)
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A red left half and a blue right half with noisy, mostly-right probabilities.

    Returns the image, the (H, W, K) probabilities (absent classes ~0), the image labels
    and the true label map (classes[0] left, classes[1] right).
    """
    rng = np.random.default_rng(seed)
    left = np.arange(width)[None, :] < width // 2
    truth = np.where(left, classes[0], classes[1]) * np.ones((height, 1), dtype=np.int64)
    image = np.where(left[..., None], [200, 40, 40], [40, 40, 200]) * np.ones((height, 1, 1))
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    right_prob = np.where(truth == classes[1], 0.7, 0.3) + rng.normal(0, 0.25, truth.shape)
    right_prob = np.clip(right_prob, 0.02, 0.98)
    probs = np.full((height, width, K), 1e-9, dtype=np.float32)
    probs[..., classes[1]] = right_prob
    probs[..., classes[0]] = 1.0 - right_prob
    probs /= probs.sum(axis=-1, keepdims=True)
    labels = np.zeros(K, dtype=np.float32)
    labels[list(classes)] = 1.0
    return image, probs, labels, truth


def test_crf_cleans_a_noisy_mask_along_colour_edges() -> None:
    image, probs, _labels, truth = two_region_sample(0)
    noisy = probs.argmax(axis=-1)
    refined = crf_refine(image, probs)
    assert refined.shape == truth.shape and refined.dtype == np.int32
    noisy_accuracy = (noisy == truth).mean()
    refined_accuracy = (refined == truth).mean()
    assert noisy_accuracy < 0.85
    assert refined_accuracy > 0.97
    assert refined_accuracy > noisy_accuracy + 0.1


def test_present_classes_match_all_classes() -> None:
    image, probs, labels, _truth = two_region_sample(1, classes=(0, 15))
    everything = crf_refine(image, probs)
    present = crf_present_classes(image, probs, labels)
    np.testing.assert_array_equal(present, everything)
    assert set(np.unique(present)) <= {0, 15}


def test_present_classes_without_background_label() -> None:
    # Background is in the CRF only when its image label is 1 (label-merge convention).
    image, probs, labels, _truth = two_region_sample(2, classes=(3, 15))
    out = crf_present_classes(image, probs, labels)
    assert set(np.unique(out)) == {3, 15}
    np.testing.assert_array_equal(out, crf_refine(image, probs))


def test_single_present_class_fills_the_map() -> None:
    image, probs, _labels, _truth = two_region_sample(3)
    labels = np.zeros(K)
    labels[7] = 1
    out = crf_present_classes(image, probs, labels)
    assert (out == 7).all()


def test_no_present_class_falls_back_to_all_channels() -> None:
    image, probs, _labels, _truth = two_region_sample(4)
    out = crf_present_classes(image, probs, np.zeros(K))
    np.testing.assert_array_equal(out, crf_refine(image, probs))


def test_mismatched_shapes_are_rejected() -> None:
    image, probs, labels, _truth = two_region_sample(5)
    with pytest.raises(ValueError, match="does not match image shape"):
        crf_refine(image[:-1], probs)
    with pytest.raises(ValueError, match="20 image labels for 21"):
        crf_present_classes(image, probs, labels[:20])


def test_crf_takes_its_parameters_from_the_config_section() -> None:
    image, probs, _labels, _truth = two_region_sample(3)
    np.testing.assert_array_equal(crf_refine(image, probs), crf_refine(image, probs, CrfConfig()))
    # Without pairwise terms the CRF keeps the unaries' own argmax.
    unary_only = CrfConfig(gaussian_compat=0.0, bilateral_compat=0.0)
    np.testing.assert_array_equal(crf_refine(image, probs, unary_only), probs.argmax(axis=-1))
    assert not np.array_equal(crf_refine(image, probs), probs.argmax(axis=-1))


def counting_items(n: int, pulled: list[int]):
    """Yield ``n`` samples, recording in ``pulled[0]`` how many have been taken."""
    for i in range(n):
        pulled[0] += 1
        image, probs, labels, _truth = two_region_sample(100 + i, height=24, width=32)
        yield f"img{i:02d}", image, probs, labels


def test_crf_map_inline_matches_single_calls() -> None:
    items = list(counting_items(3, [0]))
    out = list(crf_map(items, CrfConfig(iterations=5), workers=1, progress=False))
    assert [key for key, _ in out] == ["img00", "img01", "img02"]
    for (_key, image, probs, labels), (_k, result) in zip(items, out, strict=True):
        expected = crf_present_classes(image, probs, labels, CrfConfig(iterations=5))
        np.testing.assert_array_equal(result, expected)


def test_crf_map_two_workers_streams_in_order() -> None:
    n, workers = 12, 2
    pulled = [0]
    gaps = []
    results = []
    stream = crf_map(
        counting_items(n, pulled), CrfConfig(iterations=5), workers=workers, progress=False
    )
    for consumed, (key, labels) in enumerate(stream, start=1):
        gaps.append(pulled[0] - consumed)
        results.append((key, labels))
    assert [key for key, _ in results] == [f"img{i:02d}" for i in range(n)]
    # At most 2 * workers items are submitted ahead of the consumer, whatever n is.
    assert max(gaps) <= 2 * workers
    assert gaps[0] < n - 1
    for i, (_key, labels) in enumerate(results):
        image, probs, image_labels, _truth = two_region_sample(100 + i, height=24, width=32)
        expected = crf_present_classes(image, probs, image_labels, CrfConfig(iterations=5))
        np.testing.assert_array_equal(labels, expected)


def test_crf_map_stops_early_without_draining_the_input() -> None:
    pulled = [0]
    stream = crf_map(
        counting_items(50, pulled),
        CrfConfig(iterations=2),
        workers=2,
        progress=False,
        max_in_flight=3,
    )
    first = next(stream)
    stream.close()  # the pool is torn down; nothing hangs
    assert first[0] == "img00"
    assert pulled[0] <= 4


def test_crf_map_takes_workers_and_params_from_the_config_section() -> None:
    items = list(counting_items(2, [0]))
    cfg = CrfConfig(iterations=3, workers=1)
    out = dict(crf_map(items, cfg, progress=False))
    for key, image, probs, labels in items:
        expected = crf_present_classes(image, probs, labels, CrfConfig(iterations=3))
        np.testing.assert_array_equal(out[key], expected)
