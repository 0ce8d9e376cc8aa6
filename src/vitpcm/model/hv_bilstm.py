"""HV-BiLSTM patch conditioning (METHOD.md, "Network" 2).

Each patch token is conditioned on its row and its column: one bidirectional LSTM runs along
every row of the grid and another along every column. Rows share one set of weights (they are
folded into the batch), and so do columns. The two outputs are concatenated, giving
``4 * units`` channels (768 with the paper's 192 units per direction).

Under a bfloat16 policy the LSTMs run in float32: cuDNN's LSTM kernels take float16/32/64
only, and Keras' TensorFlow backend raises on a bfloat16 input on GPU instead of falling back.
The LSTMs are small next to the ViT, so this costs little.

Inside an XLA-compiled function (``train.jit_compile``) the same LSTMs run through
:func:`lstm_scan`, on the very same weights: Keras' LSTM there is either a cuDNN op, which
XLA cannot compile (GPU), or a loop whose autodiff backward XLA runs on oneDNN's slow
reference matmul (CPU: a ViT-S/16 train step 10x slower). :func:`lstm_scan` computes the
input products of all time steps in one matmul, runs the recurrence in a ``while_loop``,
and brings its own backward pass (the gate gradients of every step first, then the weight
gradients as single matmuls), which is what cuDNN does too. Its forward values are the
Keras ones bit for bit; its gradients agree to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import ops


def _bidirectional_lstm(units: int, name: str, policy: Any) -> keras.layers.Bidirectional:
    return keras.layers.Bidirectional(
        keras.layers.LSTM(units, return_sequences=True, dtype=policy),
        merge_mode="concat",
        name=name,
        dtype=policy,
    )


@keras.saving.register_keras_serializable(package="vitpcm")
class HVBiLSTM(keras.layers.Layer):
    """Dropout, then row-wise and column-wise bidirectional LSTMs over a patch grid.

    Input (B, G_h, G_w, D); output (B, G_h, G_w, 4 * units) with channels ordered
    [row forward, row backward, column forward, column backward].

    Args:
        units: LSTM units per direction (192 in the paper).
        dropout: Dropout rate on the input grid.
        **kwargs: Standard layer arguments.
    """

    def __init__(self, units: int = 192, dropout: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = int(units)
        self.dropout = float(dropout)
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        lstm_policy = "float32" if self.compute_dtype == "bfloat16" else self.dtype_policy
        self.horizontal = _bidirectional_lstm(self.units, "horizontal", lstm_policy)
        self.vertical = _bidirectional_lstm(self.units, "vertical", lstm_policy)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        _, grid_h, grid_w, channels = input_shape
        self.horizontal.build((None, grid_w, channels))
        self.vertical.build((None, grid_h, channels))
        self.built = True

    def call(self, grid: Any, training: bool | None = None) -> Any:
        grid = self.dropout_layer(grid, training=training)
        grid = ops.cast(grid, self.horizontal.compute_dtype)
        shape = ops.shape(grid)
        batch, grid_h, grid_w, channels = shape[0], shape[1], shape[2], shape[3]
        rows = ops.reshape(grid, (batch * grid_h, grid_w, channels))
        columns = ops.reshape(ops.transpose(grid, (0, 2, 1, 3)), (batch * grid_w, grid_h, channels))
        if in_xla_context():
            rows, columns = (
                _bidirectional(rows, self.horizontal),
                _bidirectional(columns, self.vertical),
            )
        else:
            rows, columns = self.horizontal(rows), self.vertical(columns)
        rows = ops.reshape(rows, (batch, grid_h, grid_w, 2 * self.units))
        columns = ops.reshape(columns, (batch, grid_w, grid_h, 2 * self.units))
        columns = ops.transpose(columns, (0, 2, 1, 3))
        return ops.cast(ops.concatenate([rows, columns], axis=-1), self.compute_dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (*input_shape[:-1], 4 * self.units)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(units=self.units, dropout=self.dropout)
        return config


# --------------------------------------------------------------------------- XLA path


def in_xla_context() -> bool:
    """Whether the code being traced is compiled by XLA (``tf.function(jit_compile=True)``)."""
    try:  # TensorFlow's own test; private, hence guarded
        from tensorflow.python.ops import control_flow_util
    except ImportError:
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def _bidirectional(sequences: tf.Tensor, layer: keras.layers.Bidirectional) -> tf.Tensor:
    """``layer(sequences)`` for (N, T, D) sequences: [forward, backward] outputs (N, T, 2H)."""
    from keras.src.backend import AutocastScope

    cells = (layer.forward_layer.cell, layer.backward_layer.cell)
    units = cells[0].units
    # Under a bfloat16 policy this runs in the HV-BiLSTM's bfloat16 autocast scope; the LSTM
    # weights are read as the LSTM layers themselves read them, in their own dtype (float32).
    with AutocastScope(None):
        kernel = tf.concat([c.kernel.value for c in cells], axis=1)
        recurrent = tf.stack([c.recurrent_kernel.value for c in cells])
        bias = tf.stack([c.bias.value for c in cells])[:, None, :]
    shape = tf.shape(sequences)
    # One matmul gives both directions' input products for every time step; 2-D, because a
    # batched matmul against a shared kernel has a far costlier gradient.
    products = tf.matmul(tf.reshape(sequences, (-1, shape[2])), kernel)
    products = tf.transpose(tf.reshape(products, (shape[0], shape[1], 8 * units)), (1, 0, 2))
    forward, backward = tf.split(products, 2, axis=-1)
    states = lstm_scan(tf.stack([forward, tf.reverse(backward, [0])], axis=1), recurrent, bias)
    forward, backward = tf.unstack(states, axis=1)
    return tf.transpose(tf.concat([forward, tf.reverse(backward, [0])], axis=-1), (1, 0, 2))


@tf.custom_gradient
def lstm_scan(products: tf.Tensor, recurrent: tf.Tensor, bias: tf.Tensor) -> Any:
    """L independent LSTMs (Keras gate order i, f, c, o; sigmoid gates, tanh), zero start.

    Args:
        products: (T, L, N, 4H) input products ``x_t @ kernel`` of each LSTM, in the order
            it reads them (reverse a backward LSTM's sequence first).
        recurrent: (L, H, 4H) recurrent kernels.
        bias: (L, 1, 4H) biases.

    Returns:
        (T, L, N, H) hidden states, in reading order; and the backward function.
    """
    steps = tf.shape(products)[0]
    zeros = tf.zeros(tf.concat([tf.shape(products)[1:3], tf.shape(recurrent)[1:2]], 0))
    zeros = tf.cast(zeros, products.dtype)

    def step(t: Any, h: Any, c: Any, gates: Any, cells: Any, hidden: Any) -> tuple:
        # Keras' order of operations, so the forward values are bit-identical to its LSTM.
        z = products[t] + tf.matmul(h, recurrent)
        z = z + bias
        z_i, z_f, z_c, z_o = tf.split(z, 4, axis=-1)
        i, f, g, o = tf.sigmoid(z_i), tf.sigmoid(z_f), tf.tanh(z_c), tf.sigmoid(z_o)
        c = f * c + i * g
        h = o * tf.tanh(c)
        gates = gates.write(t, tf.concat([i, f, g, o], axis=-1))
        return t + 1, h, c, gates, cells.write(t, c), hidden.write(t, h)

    arrays = [tf.TensorArray(products.dtype, size=steps) for _ in range(3)]
    loop = tf.while_loop(lambda t, *_: t < steps, step, (0, zeros, zeros, *arrays))
    gates, cells, hidden = (array.stack() for array in loop[3:])

    def backward(d_hidden: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        previous_cells = tf.concat([zeros[None], cells[:-1]], axis=0)

        def back_step(t: Any, dh_next: Any, dc_next: Any, d_gates: Any) -> tuple:
            i, f, g, o = tf.split(gates[t], 4, axis=-1)
            tanh_c = tf.tanh(cells[t])
            dh = d_hidden[t] + dh_next
            dc = dc_next + dh * o * (1.0 - tanh_c * tanh_c)
            dz = tf.concat(
                [
                    dc * g * i * (1.0 - i),
                    dc * previous_cells[t] * f * (1.0 - f),
                    dc * i * (1.0 - g * g),
                    dh * tanh_c * o * (1.0 - o),
                ],
                axis=-1,
            )
            dh_prev = tf.matmul(dz, recurrent, transpose_b=True)
            return t - 1, dh_prev, dc * f, d_gates.write(t, dz)

        d_array = tf.TensorArray(products.dtype, size=steps)
        d_products = tf.while_loop(
            lambda t, *_: t >= 0, back_step, (steps - 1, zeros, zeros, d_array)
        )[3].stack()
        # Weight gradients over all steps at once: (L, T * N, .) operands.
        count, units4 = tf.shape(d_products)[1], tf.shape(d_products)[3]
        dz = tf.reshape(tf.transpose(d_products, (1, 0, 2, 3)), (count, -1, units4))
        h_prev = tf.concat([zeros[None], hidden[:-1]], axis=0)
        h_prev = tf.reshape(tf.transpose(h_prev, (1, 0, 2, 3)), (count, -1, tf.shape(zeros)[2]))
        d_recurrent = tf.matmul(h_prev, dz, transpose_a=True)
        d_bias = tf.reduce_sum(dz, axis=1, keepdims=True)
        return d_products, d_recurrent, d_bias

    return hidden, backward
