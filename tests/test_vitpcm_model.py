"""The ViT-PCM network: HV-BiLSTM, patch classifier, pooling, freezing, saving, mixed precision."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest

from vitpcm.config import ModelConfig
from vitpcm.errors import ConfigError, ModelError
from vitpcm.model.hv_bilstm import HVBiLSTM
from vitpcm.model.patch_classifier import GlobalClassPooling, PatchClassifier
from vitpcm.model.vitpcm import (
    backbone_of,
    build_vitpcm,
    patch_classifier_of,
    set_backbone_trainable,
)

NUM_CLASSES = 5


def tiny_cfg(**overrides: object) -> ModelConfig:
    values = {
        "backbone": "custom",
        "patch_size": 8,
        "hidden_dim": 32,
        "depth": 3,
        "num_heads": 4,
        "mlp_dim": 64,
        "pos_embed_grid": 4,
        "pretrained": None,
        "backbone_dropout": 0.0,
        "dropout": 0.1,
        "lstm_units": 6,
        "pooling": "max",
        "l2": 0.01,
    }
    values.update(overrides)
    return ModelConfig(**values)


def images(height: int = 32, width: int = 40, batch: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (batch, height, width, 3)).astype("float32")


@pytest.fixture
def mixed_precision() -> Iterator[None]:
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_outputs_shapes_and_probabilities() -> None:
    model = build_vitpcm(tiny_cfg(), NUM_CLASSES)
    out = model(images())
    patch_probs, class_probs = out["patch_probs"].numpy(), out["class_probs"].numpy()
    assert patch_probs.shape == (2, 4, 5, NUM_CLASSES)
    assert class_probs.shape == (2, NUM_CLASSES)
    np.testing.assert_allclose(patch_probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(class_probs, patch_probs.max(axis=(1, 2)), atol=1e-7)
    assert model.get_layer("hv_bilstm").compute_output_shape((2, 4, 5, 32)) == (2, 4, 5, 24)


def test_input_is_rescaled_to_unit_range() -> None:
    model = build_vitpcm(tiny_cfg(), NUM_CLASSES)
    rescale = model.get_layer("rescale")
    scaled = rescale(np.array([[0.0, 127.5, 255.0]], "float32")).numpy()
    np.testing.assert_allclose(scaled, [[-1.0, 0.0, 1.0]], atol=1e-6)
    raw = images(batch=1)
    np.testing.assert_allclose(rescale(raw).numpy(), raw / 127.5 - 1.0, atol=1e-5)


def test_hv_bilstm_shares_weights_across_rows_and_columns() -> None:
    layer = HVBiLSTM(units=3, dropout=0.5)
    grid = np.random.default_rng(1).normal(size=(2, 4, 5, 7)).astype("float32")
    out = layer(grid).numpy()  # inference: no dropout
    assert out.shape == (2, 4, 5, 12)
    for row in range(4):
        expected = layer.horizontal(grid[:, row]).numpy()
        np.testing.assert_allclose(out[:, row, :, :6], expected, atol=1e-5)
    for column in range(5):
        expected = layer.vertical(grid[:, :, column]).numpy()
        np.testing.assert_allclose(out[:, :, column, 6:], expected, atol=1e-5)
    # One forward and one backward LSTM per direction pair, shared by all rows / columns.
    assert len(layer.trainable_weights) == 2 * 2 * 3


def test_hv_bilstm_rows_do_not_mix() -> None:
    layer = HVBiLSTM(units=2)
    grid = np.random.default_rng(2).normal(size=(1, 3, 4, 5)).astype("float32")
    changed = grid.copy()
    changed[0, 2, 1] += 1.0  # one token of the last row
    diff = np.abs(layer(changed).numpy() - layer(grid).numpy())
    rows, columns = diff[..., :4], diff[..., 4:]
    assert rows[0, :2].max() == 0 and rows[0, 2].max() > 0
    assert columns[0, :, [0, 2, 3]].max() == 0 and columns[0, :, 1].max() > 0


def test_pooling_max_and_avg_on_hand_made_tensor() -> None:
    probs = np.zeros((1, 2, 2, 3), "float32")
    probs[0, :, :, 0] = [[0.9, 0.1], [0.2, 0.3]]
    probs[0, :, :, 1] = [[0.05, 0.8], [0.7, 0.6]]
    probs[0, :, :, 2] = 1.0 - probs[0, :, :, 0] - probs[0, :, :, 1]
    max_pooled = GlobalClassPooling("max")(probs).numpy()
    avg_pooled = GlobalClassPooling("avg")(probs).numpy()
    np.testing.assert_allclose(max_pooled, [[0.9, 0.8, 0.1]], atol=1e-6)
    np.testing.assert_allclose(avg_pooled, [[0.375, 0.5375, 0.0875]], atol=1e-6)
    with pytest.raises(ModelError, match="median"):
        GlobalClassPooling("median")


def test_avg_pooling_model() -> None:
    model = build_vitpcm(tiny_cfg(pooling="avg"), NUM_CLASSES)
    out = model(images(batch=1))
    np.testing.assert_allclose(
        out["class_probs"].numpy(), out["patch_probs"].numpy().mean(axis=(1, 2)), atol=1e-6
    )


def test_patch_classifier_kernel_l2_and_init() -> None:
    layer = PatchClassifier(50, dropout=0.1, l2=0.02)
    features = np.random.default_rng(3).normal(size=(1, 2, 2, 400)).astype("float32")
    probs = layer(features).numpy()
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert tuple(layer.kernel.shape) == (400, 50)
    assert layer.l2 == 0.02
    assert [w.name for w in layer.weights] == ["kernel"]  # bias-free
    assert layer.losses == []  # the loss code adds the L2 term itself
    assert abs(float(np.std(layer.kernel.numpy())) - 0.05) < 0.003
    assert PatchClassifier.from_config(layer.get_config()).get_config() == layer.get_config()
    model = build_vitpcm(tiny_cfg(l2=0.03), NUM_CLASSES)
    assert patch_classifier_of(model).l2 == 0.03
    assert tuple(patch_classifier_of(model).kernel.shape) == (24, NUM_CLASSES)


def _trainable_names(layer: keras.layers.Layer) -> set[str]:
    return {v.path for v in layer.trainable_weights}


def test_set_backbone_trainable() -> None:
    model = build_vitpcm(tiny_cfg(), NUM_CLASSES)
    backbone = backbone_of(model)
    head_weights = len(model.get_layer("hv_bilstm").trainable_weights) + 1

    set_backbone_trainable(model, 0)
    assert backbone.trainable_weights == []
    assert len(model.trainable_weights) == head_weights

    set_backbone_trainable(model, 2)
    names = _trainable_names(backbone)
    assert any("encoderblock_1" in n for n in names) and any("encoderblock_2" in n for n in names)
    assert any("encoder_norm" in n for n in names)
    assert not any("encoderblock_0" in n or "patch_embedding" in n for n in names)
    assert not backbone.get_layer("encoderblock_0").trainable
    assert backbone.get_layer("encoderblock_2").trainable
    per_block = len(backbone.get_layer("encoderblock_2").weights)
    assert len(backbone.trainable_weights) == 2 * per_block + 2
    assert len(model.trainable_weights) == head_weights + 2 * per_block + 2

    # All blocks: the whole backbone trains, patch/position embeddings and class token too.
    set_backbone_trainable(model, 3)
    assert len(backbone.trainable_weights) == len(backbone.weights) == 3 * per_block + 2 + 4
    assert any("patch_embedding" in n for n in _trainable_names(backbone))
    with pytest.raises(ConfigError, match="unfreeze_blocks"):
        set_backbone_trainable(model, 4)


def test_frozen_backbone_is_deterministic_in_training_mode() -> None:
    model = build_vitpcm(tiny_cfg(backbone_dropout=0.3, dropout=0.0), NUM_CLASSES)
    x = images(batch=1)
    a, b = (model(x, training=True)["patch_probs"].numpy() for _ in range(2))
    assert np.abs(a - b).max() > 1e-4
    set_backbone_trainable(model, 0)
    a, b = (model(x, training=True)["patch_probs"].numpy() for _ in range(2))
    np.testing.assert_array_equal(a, b)


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = build_vitpcm(tiny_cfg(), NUM_CLASSES)
    x = images()
    expected = model(x)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    got = restored(x)
    for key in ("patch_probs", "class_probs"):
        np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy())
    assert backbone_of(restored).depth == 3
    assert patch_classifier_of(restored).l2 == 0.01


def test_mixed_precision_outputs_float32(mixed_precision: None) -> None:
    model = build_vitpcm(tiny_cfg(), NUM_CLASSES)
    assert backbone_of(model).get_layer("encoderblock_0").compute_dtype == "bfloat16"
    # cuDNN has no bfloat16 LSTM: the HV-BiLSTM (dropout and recurrent part) runs in float32.
    hv_bilstm = model.get_layer("hv_bilstm")
    assert hv_bilstm.horizontal.compute_dtype == "float32"
    assert hv_bilstm.compute_dtype == "float32"
    out = model(images(), training=True)
    assert out["patch_probs"].dtype == "float32" and out["class_probs"].dtype == "float32"
    assert model.output["patch_probs"].dtype == "float32"
    np.testing.assert_allclose(out["patch_probs"].numpy().sum(-1), 1.0, atol=1e-5)
    assert np.isfinite(out["class_probs"].numpy()).all()


def test_bad_config_values() -> None:
    with pytest.raises(ModelError, match="unknown pooling 'sum'"):
        build_vitpcm(tiny_cfg(pooling="sum"), NUM_CLASSES)
    with pytest.raises(ModelError, match="num_classes"):
        build_vitpcm(tiny_cfg(), 0)
    with pytest.raises(ModelError, match="not a ViT backbone"):
        backbone_of(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))


def test_validation_forward_is_traced_once_per_model_and_does_not_keep_it_alive() -> None:
    import gc
    import weakref

    import tensorflow as tf

    from vitpcm.eval import _FORWARDS, predict_batches

    model = build_vitpcm(tiny_cfg(), NUM_CLASSES)
    data = tf.data.Dataset.from_tensor_slices(
        {"image": images(batch=4), "height": np.full(4, 32)}
    ).batch(2)
    first = [probs for _, probs in predict_batches(model, data)]
    again = [probs for _, probs in predict_batches(model, data)]  # as after the next epoch
    assert _FORWARDS[model].experimental_get_tracing_count() == 1
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    expected = model(images(batch=4), training=False)["patch_probs"].numpy()
    np.testing.assert_allclose(np.concatenate(first), expected, rtol=1e-5, atol=1e-6)
    held = weakref.ref(model)
    del model
    gc.collect()
    assert held() is None  # the cache held it weakly
