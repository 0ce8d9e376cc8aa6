"""Loss values worked out by hand, gradient paths, mixed precision and tf.function."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from vitpcm.config import LossWeights
from vitpcm.model.equivariance import map_target, tile_mosaic, view_params
from vitpcm.model.label_merge import label_merge
from vitpcm.model.losses import (
    bce_loss,
    equivariance_loss,
    equivariance_target,
    l2_loss,
    total_loss,
)

LABELS = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
PROBS = np.array([[0.9, 0.2, 0.6], [0.3, 0.7, 0.1]], np.float32)
BCE = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.7) * 2 + math.log(0.9)) / 6


def test_bce_loss_is_the_mean_over_images_and_classes():
    assert bce_loss(LABELS, PROBS).numpy() == pytest.approx(BCE, rel=1e-6)
    keras_value = keras.losses.binary_crossentropy(LABELS, PROBS).numpy().mean()
    assert bce_loss(LABELS, PROBS).numpy() == pytest.approx(keras_value, rel=1e-5)


def test_bce_loss_clips_certain_wrong_answers():
    value = bce_loss([[1.0, 0.0]], [[0.0, 1.0]]).numpy()
    assert np.isfinite(value)
    assert value == pytest.approx(-math.log(1e-7), rel=0.05)


def test_l2_loss_matches_the_keras_regulariser_convention():
    kernel = tf.constant([[1.0, 2.0], [3.0, -1.0]])
    assert l2_loss(kernel, 0.01).numpy() == pytest.approx(0.15)
    assert l2_loss(kernel, 0.01).numpy() == pytest.approx(keras.regularizers.L2(0.01)(kernel))


def _one_cell_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four images with a 1x1 grid and two classes, identity views."""
    view1 = np.array([[0.8, 0.2], [0.8, 0.2], [0.3, 0.7], [0.5, 0.5]], np.float32)
    view2 = np.array([[0.6, 0.4], [0.9, 0.1], [0.25, 0.75], [0.2, 0.8]], np.float32)
    labels = np.array([[1, 1], [1, 0], [1, 1], [0, 1]], np.float32)
    return view1.reshape(4, 1, 1, 2), view2.reshape(4, 1, 1, 2), labels


def test_equivariance_loss_by_hand_on_one_cell_grids():
    view1, view2, labels = _one_cell_case()
    identity = tf.stack([view_params(grid=1)] * 4)
    mosaic = tile_mosaic(tf.constant(view2))
    # One cell: each present class is its own peak, so after dividing by the peak every present
    # class is 1 and the target is uniform over the present classes:
    # [.5 .5], [1 0], [.5 .5], [0 1].
    expected = (
        -(0.5 * math.log(0.6) + 0.5 * math.log(0.4))
        - math.log(0.9)
        - (0.5 * math.log(0.25) + 0.5 * math.log(0.75))
        - math.log(0.8)
    ) / 4
    value = equivariance_loss(view1, mosaic, labels, identity, identity).numpy()
    assert value == pytest.approx(expected, rel=1e-5)


def _random_case(seed: int = 0) -> dict[str, tf.Tensor]:
    rng = np.random.default_rng(seed)
    grid, out_grid, classes = 4, 2, 3
    view1 = rng.dirichlet(np.ones(classes), size=(8, grid, grid)).astype(np.float32)
    view2 = rng.dirichlet(np.ones(classes), size=(8, out_grid, out_grid)).astype(np.float32)
    labels = np.ones((8, classes), np.float32)
    labels[::2, 2] = 0
    flags = [(bool(i & 1), bool(i & 2), bool(i & 4)) for i in range(8)]
    params1 = tf.stack([view_params(*f, grid=grid) for f in flags])
    params2 = tf.stack(
        [
            view_params(*f[::-1], crop=(i % 3, 1, 2) if i % 2 else None, grid=grid)
            for i, f in enumerate(flags)
        ]
    )
    return {
        "view1_patch_probs": tf.constant(view1),
        "mosaic_patch_probs": tile_mosaic(tf.constant(view2)),
        "image_labels": tf.constant(labels),
        "params1": params1,
        "params2": params2,
        "view2": view2,
    }


def test_equivariance_loss_is_cross_entropy_against_the_mapped_merged_target():
    case = _random_case()
    target = label_merge(
        map_target(case["view1_patch_probs"], case["params1"], case["params2"], 2),
        case["image_labels"],
    ).numpy()
    expected = -(target * np.log(case["view2"])).sum(axis=-1).mean()
    inputs = {k: v for k, v in case.items() if k != "view2"}
    assert equivariance_loss(**inputs).numpy() == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(
        equivariance_target(
            case["view1_patch_probs"], case["image_labels"], case["params1"], case["params2"], 2
        ).numpy(),
        target,
        rtol=1e-6,
    )


def test_equivariance_loss_is_smallest_when_the_second_view_matches_the_target():
    case = _random_case(1)
    inputs = {k: v for k, v in case.items() if k != "view2"}
    target = equivariance_target(
        inputs["view1_patch_probs"], inputs["image_labels"], inputs["params1"], inputs["params2"], 2
    )
    matched = dict(inputs, mosaic_patch_probs=tile_mosaic(target))
    entropy = -(target * np.log(np.clip(target, 1e-7, 1))).numpy().sum(axis=-1).mean()
    assert equivariance_loss(**matched).numpy() == pytest.approx(entropy, rel=1e-5)
    assert equivariance_loss(**inputs).numpy() > entropy


def test_no_gradient_flows_into_the_equivariance_target():
    case = _random_case()
    view1 = tf.Variable(case["view1_patch_probs"])
    mosaic = tf.Variable(case["mosaic_patch_probs"])
    with tf.GradientTape() as tape:
        loss = equivariance_loss(
            view1, mosaic, case["image_labels"], case["params1"], case["params2"]
        )
    grad_view1, grad_mosaic = tape.gradient(loss, [view1, mosaic])
    assert grad_view1 is None
    assert grad_mosaic is not None
    assert np.abs(grad_mosaic.numpy()).sum() > 0


def test_losses_accept_half_precision_inputs():
    case = _random_case()
    inputs = {k: v for k, v in case.items() if k != "view2"}
    half = dict(
        inputs,
        view1_patch_probs=tf.cast(inputs["view1_patch_probs"], tf.float16),
        mosaic_patch_probs=tf.cast(inputs["mosaic_patch_probs"], tf.float16),
    )
    value = equivariance_loss(**half)
    assert value.dtype == tf.float32
    assert value.numpy() == pytest.approx(equivariance_loss(**inputs).numpy(), rel=1e-2)
    bce = bce_loss(tf.constant(LABELS, tf.float16), tf.constant(PROBS, tf.float16))
    assert bce.dtype == tf.float32
    assert bce.numpy() == pytest.approx(BCE, rel=1e-2)
    assert l2_loss(tf.ones((2, 2), tf.float16), 0.5).dtype == tf.float32


def test_equivariance_loss_traces_with_an_unknown_batch():
    case = _random_case()
    inputs = {k: v for k, v in case.items() if k != "view2"}
    spec = {
        "view1_patch_probs": tf.TensorSpec([None, 4, 4, 3]),
        "mosaic_patch_probs": tf.TensorSpec([None, 4, 4, 3]),
        "image_labels": tf.TensorSpec([None, 3]),
        "params1": tf.TensorSpec([None, 7]),
        "params2": tf.TensorSpec([None, 7]),
    }
    traced = tf.function(
        lambda a, b, c, d, e: equivariance_loss(a, b, c, d, e),
        input_signature=list(spec.values()),
    )
    value = traced(*(inputs[name] for name in spec)).numpy()
    assert value == pytest.approx(equivariance_loss(**inputs).numpy(), rel=1e-6)


def test_total_loss_weights_each_term_and_reports_them_all():
    case = _random_case()
    inputs = {k: v for k, v in case.items() if k not in ("view2", "image_labels")}
    labels = case["image_labels"]
    class_probs = tf.reduce_max(case["view1_patch_probs"], axis=[1, 2])
    kernel = tf.constant([[1.0, 2.0], [3.0, -1.0]])
    weights = LossWeights(bce=2.0, et=0.5, l2=3.0)
    terms = total_loss(labels, class_probs, kernel=kernel, l2=0.01, weights=weights, **inputs)
    assert set(terms) == {"bce", "et", "l2", "total"}
    assert terms["bce"].numpy() == pytest.approx(bce_loss(labels, class_probs).numpy())
    assert terms["l2"].numpy() == pytest.approx(0.15)
    assert terms["et"].numpy() == pytest.approx(equivariance_loss(image_labels=labels, **inputs))
    expected = 2.0 * terms["bce"] + 0.5 * terms["et"] + 3.0 * terms["l2"]
    assert terms["total"].numpy() == pytest.approx(expected.numpy(), rel=1e-6)
    # No weights: the paper's, all 1.
    plain = total_loss(labels, class_probs, kernel=kernel, l2=0.01, **inputs)["total"]
    assert plain.numpy() == pytest.approx((terms["bce"] + terms["et"] + terms["l2"]).numpy())


def test_total_loss_without_equivariance_or_kernel_has_zero_terms():
    terms = total_loss(LABELS, PROBS)
    assert terms["et"].numpy() == 0.0
    assert terms["l2"].numpy() == 0.0
    assert terms["total"].numpy() == pytest.approx(BCE, rel=1e-6)
    with pytest.raises(ValueError, match="together"):
        total_loss(LABELS, PROBS, view1_patch_probs=tf.zeros((4, 2, 2, 3)))
