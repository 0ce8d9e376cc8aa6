"""The one-pass train step: the same losses and gradients as the three separate passes."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers.tiny import tiny_config
from vitpcm.model.equivariance import sample_view_params, tile_mosaic
from vitpcm.model.losses import bce_loss, equivariance_loss
from vitpcm.model.vitpcm import build_vitpcm, set_backbone_trainable, train_forward


def _batch(cfg: object, size: int = 8) -> dict[str, tf.Tensor]:
    grid = cfg.data.image_size // cfg.model.patch_size
    cells = cfg.train.et.crop_size // cfg.model.patch_size
    params = [sample_view_params(tf.constant([3, i]), grid, cells, 0.5) for i in range(2 * size)]
    rng = np.random.default_rng(11)
    labels = np.zeros((size, cfg.data.num_classes), "float32")
    labels[:, 0] = labels[np.arange(size), 1 + np.arange(size) % 3] = 1.0
    return {
        "image": tf.constant(rng.uniform(0, 255, (size, 64, 64, 3)).astype("float32")),
        "labels": tf.constant(labels),
        "params1": tf.stack([p * [1, 1, 1, 0, 0, 0, 1] for p in params[:size]]),
        "view2": tf.constant(rng.uniform(0, 255, (size, 32, 32, 3)).astype("float32")),
        "params2": tf.stack(params[size:]),
    }


def _loss_and_gradients(model: keras.Model, batch: dict, fused: bool) -> list[np.ndarray]:
    model.get_layer("hv_bilstm").implementation = "fused" if fused else "keras"
    images, labels = batch["image"], batch["labels"]
    mosaics = tile_mosaic(batch["view2"])

    @tf.function
    def run() -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            if fused:
                out = train_forward(model, images, mosaics)
                target, mosaic = out["target_patch_probs"], out["mosaic_patch_probs"]
            else:  # the earlier step's three passes
                out = model(images, training=True)
                target = tf.stop_gradient(model(images, training=False)["patch_probs"])
                mosaic = model(mosaics, training=True)["patch_probs"]
            et = equivariance_loss(target, mosaic, labels, batch["params1"], batch["params2"])
            loss = bce_loss(labels, out["class_probs"]) + et
        return [loss, et, *tape.gradient(loss, model.trainable_variables)]

    return [t.numpy() for t in run()]


@pytest.mark.parametrize("unfreeze", [1, 2])
def test_one_pass_gives_the_separate_passes_loss_and_gradients(unfreeze: int) -> None:
    cfg = tiny_config("model.dropout=0.0", "model.backbone_dropout=0.0")
    keras.utils.set_random_seed(0)
    model = build_vitpcm(cfg.model, cfg.data.num_classes)
    set_backbone_trainable(model, unfreeze)
    batch = _batch(cfg)
    separate = _loss_and_gradients(model, batch, fused=False)
    fused = _loss_and_gradients(model, batch, fused=True)
    assert separate[1] > 0.0  # the ET loss is in play
    assert len(fused) == 2 + len(model.trainable_variables)
    for got, expected in zip(fused, separate, strict=True):
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize(
    "unfreeze, frozen_dropout", [(0, False), (1, False), (2, False), (1, True)]
)
def test_target_is_the_dropout_free_pass_with_dropout_on(
    unfreeze: int, frozen_dropout: bool
) -> None:
    """Backbone, head and LSTM-input dropout on: the target still equals an inference pass.

    With 1 of 2 blocks trained the frozen prefix is shared and the trained block runs again
    in inference mode; with 2 nothing but the input is shared; with 0 all of it; with dropout
    in frozen blocks too (the authors' recipe) nothing is.
    """
    cfg = tiny_config(
        "model.dropout=0.3",
        "model.backbone_dropout=0.3",
        "model.lstm_dropout=0.3",
        f"model.frozen_dropout={frozen_dropout}",
    )
    keras.utils.set_random_seed(1)
    model = build_vitpcm(cfg.model, cfg.data.num_classes)
    set_backbone_trainable(model, unfreeze)
    batch = _batch(cfg)
    with tf.GradientTape(persistent=True) as tape:
        out = train_forward(model, batch["image"], tile_mosaic(batch["view2"]))
        target_sum = tf.reduce_sum(out["target_patch_probs"])
    expected = model(batch["image"], training=False)["patch_probs"].numpy()
    np.testing.assert_allclose(out["target_patch_probs"].numpy(), expected, rtol=1e-5, atol=1e-6)
    # The training views did draw dropout masks, and no gradient reaches the target.
    assert np.abs(out["patch_probs"].numpy() - expected).max() > 1e-3
    assert all(g is None for g in tape.gradient(target_sum, model.trainable_variables))
    assert out["mosaic_patch_probs"].shape == (2, 8, 8, cfg.data.num_classes)


@pytest.mark.slow
def test_train_step_setting_switches_between_the_two_paths() -> None:
    """What ``vitpcm train`` runs: without dropout, ``train.fused_step`` changes no loss."""
    from vitpcm.distribute import make_strategy
    from vitpcm.training_loop import TrainingLoop, schedule

    losses = {}
    for fused in (False, True):
        cfg = tiny_config(
            "model.dropout=0.0", f"train.fused_step={fused}", "train.loss_weights.et=0.5"
        )
        keras.utils.set_random_seed(0)
        loop = TrainingLoop(cfg, make_strategy(), cfg.data.num_classes, cfg.train.batch_size)
        loop.enter_phase(schedule(cfg)[-1])
        batch = _batch(cfg, cfg.train.batch_size)
        expected = _loss_terms(loop.model, batch, cfg)
        first = {k: float(v) for k, v in loop._step_fn(batch).items()}
        assert first == pytest.approx(expected, rel=1e-4)
        losses[fused] = [first["loss"]] + [float(loop._step_fn(batch)["loss"]) for _ in range(2)]
    assert losses[True][0] > losses[True][2]  # it learns
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def _loss_terms(model: keras.Model, batch: dict, cfg: object) -> dict[str, float]:
    """The step's loss terms worked out from the model's outputs (no dropout: deterministic)."""
    labels = batch["labels"]
    target = model(batch["image"], training=False)["patch_probs"]
    mosaic = model(tile_mosaic(batch["view2"]), training=False)["patch_probs"]
    bce = float(bce_loss(labels, model(batch["image"], training=False)["class_probs"]))
    et = float(equivariance_loss(target, mosaic, labels, batch["params1"], batch["params2"]))
    kernel = model.get_layer("patch_classifier").kernel.numpy()
    l2 = cfg.model.l2 * float(np.sum(kernel.astype("float64") ** 2))
    w = cfg.train.loss_weights
    return {"loss": w.bce * bce + w.et * et + w.l2 * l2, "bce": bce, "et": et, "l2": l2}


def test_one_pass_under_mixed_bfloat16() -> None:
    """bf16 backbone and classifier, float32 HV-BiLSTM: the batches still join."""
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        cfg = tiny_config("model.dropout=0.2", "model.lstm_dropout=0.2")
        keras.utils.set_random_seed(2)
        model = build_vitpcm(cfg.model, cfg.data.num_classes)
        set_backbone_trainable(model, 1)
        batch = _batch(cfg)
        out = tf.function(train_forward)(model, batch["image"], tile_mosaic(batch["view2"]))
        expected = model(batch["image"], training=False)["patch_probs"].numpy()
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert out["target_patch_probs"].dtype == tf.float32
    np.testing.assert_allclose(out["target_patch_probs"].numpy(), expected, atol=2e-2)
