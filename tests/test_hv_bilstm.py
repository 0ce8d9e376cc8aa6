"""The fused HV-BiLSTM: the same values and gradients as Keras' LSTMs, on their weights."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from vitpcm.model.hv_bilstm import HVBiLSTM


def _grid(shape: tuple[int, ...], seed: int) -> tf.Tensor:
    return tf.constant(np.random.default_rng(seed).normal(size=shape).astype("float32"))


def _values_and_gradients(layer: HVBiLSTM, grid: tf.Tensor, jit: bool) -> list[np.ndarray]:
    weights = layer.trainable_variables

    def run(x: tf.Tensor) -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x)
            # A loss that weights every output differently, so no gradient cancels out.
            loss = tf.reduce_sum(tf.sin(out) * out)
        return [out, *tape.gradient(loss, [x, *weights])]

    return [t.numpy() for t in tf.function(run, jit_compile=jit)(grid)]


def _both(layer: HVBiLSTM, grid: tf.Tensor, jit: bool) -> tuple[list, list]:
    """(fused, Keras reference) values and gradients on the same weights."""
    layer.implementation = "keras"
    reference = _values_and_gradients(layer, grid, jit=False)
    layer.implementation = "fused"
    return _values_and_gradients(layer, grid, jit=jit), reference


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 4, 6), (3, 5, 5, 4)])
def test_fused_scan_matches_keras_lstms(shape: tuple[int, ...], jit: bool) -> None:
    """Square grids (one loop for all four LSTMs) and non-square ones (two loops)."""
    layer = HVBiLSTM(units=3)
    grid = _grid(shape, seed=sum(shape))
    layer(grid)
    fused, keras_path = _both(layer, grid, jit)
    assert fused[0].shape == (*shape[:3], 12)
    # Output, input gradient and the 12 LSTM weight gradients (kernel, recurrent, bias x 4).
    assert len(fused) == 2 + 12
    for got, expected in zip(fused, keras_path, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_fused_scan_keeps_float32_lstms_under_bfloat16() -> None:
    import keras

    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer = HVBiLSTM(units=3)
        grid = tf.cast(_grid((2, 3, 4, 5), seed=3), "bfloat16")
        layer(grid)
        fused, keras_path = _both(layer, grid, jit=True)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert fused[0].dtype == keras_path[0].dtype
    for got, expected in zip(fused, keras_path, strict=True):
        np.testing.assert_allclose(
            np.asarray(got, "float32"), np.asarray(expected, "float32"), rtol=1e-2, atol=1e-2
        )


def test_one_loop_for_all_four_lstms() -> None:
    """A square grid's forward and backward pass hold one while loop each (G iterations)."""
    layer = HVBiLSTM(units=3, implementation="fused")
    grid = _grid((2, 4, 4, 5), seed=1)
    layer(grid)

    def run(x: tf.Tensor) -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x) ** 2)
        return tape.gradient(loss, [x, *layer.trainable_variables])

    graph = tf.function(run).get_concrete_function(grid).graph
    loops = [op for op in graph.get_operations() if op.type in ("While", "StatelessWhile")]
    assert len(loops) == 2
    layer.implementation = "keras"
    graph = tf.function(run).get_concrete_function(grid).graph
    loops = [op for op in graph.get_operations() if op.type in ("While", "StatelessWhile")]
    assert len(loops) > 2


def test_unknown_implementation_is_refused() -> None:
    from vitpcm.errors import ModelError

    with pytest.raises(ModelError, match="implementation"):
        HVBiLSTM(units=3, implementation="cudnn")


def _tiny_batch(cfg: object, size: int = 8) -> dict[str, tf.Tensor]:
    from vitpcm.model.equivariance import sample_view_params

    grid = cfg.data.image_size // cfg.model.patch_size
    cells = cfg.train.et.crop_size // cfg.model.patch_size
    params = [sample_view_params(tf.constant([7, i]), grid, cells, 0.5) for i in range(2 * size)]
    images = np.random.default_rng(5).uniform(0, 255, (size, 64, 64, 3)).astype("float32")
    views = np.random.default_rng(6).uniform(0, 255, (size, 32, 32, 3)).astype("float32")
    labels = np.zeros((size, cfg.data.num_classes), "float32")
    labels[:, 0] = labels[np.arange(size), 1 + np.arange(size) % 3] = 1.0
    return {
        "image": tf.constant(images),
        "labels": tf.constant(labels),
        "params1": tf.stack([p * [1, 1, 1, 0, 0, 0, 1] for p in params[:size]]),
        "view2": tf.constant(views),
        "params2": tf.stack(params[size:]),
    }


@pytest.mark.slow
def test_xla_train_step_follows_the_graph_one() -> None:
    """``train.jit_compile`` trains the same model: without dropout, the same losses."""
    import keras

    from helpers.tiny import tiny_config
    from vitpcm.distribute import make_strategy
    from vitpcm.training_loop import TrainingLoop, schedule

    losses = {}
    for jit in (False, True):
        cfg = tiny_config("model.dropout=0.0", f"train.jit_compile={jit}")
        keras.utils.set_random_seed(0)
        loop = TrainingLoop(cfg, make_strategy(), cfg.data.num_classes, cfg.train.batch_size)
        loop.enter_phase(schedule(cfg)[-1])
        batch = _tiny_batch(cfg, cfg.train.batch_size)
        losses[jit] = [float(loop._step_fn(batch)["loss"]) for _ in range(3)]
    assert losses[False][0] > losses[False][2]  # it learns
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def test_lstm_input_dropout_is_one_mask_per_lstm_and_sequence() -> None:
    """The fused masks equal Keras LSTMs run on inputs masked per sequence (constant in time)."""
    from vitpcm.model.hv_bilstm import _fused

    layer = HVBiLSTM(units=3, lstm_dropout=0.5)
    grid = _grid((2, 4, 4, 5), seed=9)
    layer(grid)
    masks = layer._input_masks(grid, 2)
    assert set(np.unique(masks.numpy())) <= {0.0, 2.0}
    # Row masks are constant along each row, column masks along each column.
    np.testing.assert_array_equal(masks[:2].numpy(), np.repeat(masks[:2, :, :, :1], 4, axis=3))
    np.testing.assert_array_equal(masks[2:].numpy(), np.repeat(masks[2:, :, :1], 4, axis=2))
    got = _fused(grid, layer._cells(), masks).numpy()

    def direction(
        bidirectional: object, backward: bool, masked: tf.Tensor, rows: bool
    ) -> tf.Tensor:
        x = masked if rows else tf.transpose(masked, (0, 2, 1, 3))
        seq = tf.reshape(x, (-1, 4, 5))
        sub = bidirectional.backward_layer if backward else bidirectional.forward_layer
        out = sub(seq, training=False)
        out = tf.reverse(out, [1]) if backward else out
        out = tf.reshape(out, (2, 4, 4, 3))
        return out if rows else tf.transpose(out, (0, 2, 1, 3))

    expected = tf.concat(
        [
            direction(layer.horizontal, False, grid * masks[0], True),
            direction(layer.horizontal, True, grid * masks[1], True),
            direction(layer.vertical, False, grid * masks[2], False),
            direction(layer.vertical, True, grid * masks[3], False),
        ],
        axis=-1,
    ).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["fused", "keras"])
def test_lstm_input_dropout_spares_the_images_after_the_count(implementation: str) -> None:
    layer = HVBiLSTM(units=3, lstm_dropout=0.5, implementation=implementation)
    grid = _grid((3, 4, 4, 5), seed=2)
    inference = layer(grid).numpy()
    partial = layer.condition(grid, lstm_dropout_images=1).numpy()
    np.testing.assert_allclose(partial[1:], inference[1:], rtol=1e-6, atol=1e-7)
    assert np.abs(partial[0] - inference[0]).max() > 1e-3
