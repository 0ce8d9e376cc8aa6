"""HV-BiLSTM patch conditioning (METHOD.md, "Network" 2).

Each patch token is conditioned on its row and its column: one bidirectional LSTM runs along
every row of the grid and another along every column. Rows share one set of weights (they are
folded into the batch), and so do columns. The two outputs are concatenated, giving
``4 * units`` channels (768 with the paper's 192 units per direction).

The weights live in two Keras ``Bidirectional(LSTM)`` layers (``horizontal``, ``vertical``),
so saved models and imported checkpoints keep their layout. Two implementations compute the
same values on them (to float32 rounding, gradients too: ``tests/test_hv_bilstm.py``):

* ``"keras"`` (default): the Keras LSTMs, one loop per direction (cuDNN on a GPU). Without
  XLA on a CPU it is the faster one: TensorFlow runs the four loops concurrently and their
  autodiff backward well (a ViT-S/16 train step's HV-BiLSTM: half the CPU time of the fused
  scan, measured with ``bench/``).
* ``"fused"``, for XLA (``train.jit_compile`` selects it): the input products of all four
  LSTMs (row/column x forward/backward) in one matmul and the four recurrences in **one**
  loop (:func:`lstm_scan`) when the grid is square, two loops (rows, columns) otherwise, with
  its own backward pass (the gate gradients of every step first, then the weight gradients as
  single matmuls, as cuDNN does). A step then runs one forward and one backward loop of
  ``G`` iterations (48 for a 24 x 24 grid), which is what a GPU needs; Keras' LSTM inside XLA
  is a cuDNN op XLA cannot compile (GPU) or a loop whose backward XLA runs slowly (CPU).

Under a bfloat16 policy the layer (dropout and LSTMs) runs in float32: cuDNN's LSTM kernels
take float16/32/64 only, and the recurrence is small next to the ViT.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import ops

from vitpcm.errors import ModelError

IMPLEMENTATIONS = ("fused", "keras")


def _bidirectional_lstm(
    units: int, name: str, policy: Any, dropout: float
) -> keras.layers.Bidirectional:
    return keras.layers.Bidirectional(
        keras.layers.LSTM(units, return_sequences=True, dropout=dropout, dtype=policy),
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
        lstm_dropout: Input dropout inside each LSTM (Keras' ``LSTM(dropout=...)``: one mask
            per sequence, the same at every step, drawn for each of the four LSTMs).
        implementation: ``"fused"`` (one loop for all directions) or ``"keras"`` (the Keras
            LSTM layers, one loop per direction); same weights, same values.
        **kwargs: Standard layer arguments.
    """

    def __init__(
        self,
        units: int = 192,
        dropout: float = 0.0,
        implementation: str = "keras",
        lstm_dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        # Under a bfloat16 policy the whole layer runs in float32: its weights are then read in
        # their own dtype (no autocast scope), and the grid is cast to float32 on the way in.
        policy = keras.dtype_policies.get(kwargs.get("dtype") or keras.config.dtype_policy())
        if policy.compute_dtype == "bfloat16":
            kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.units = int(units)
        self.dropout = float(dropout)
        self.lstm_dropout = float(lstm_dropout)
        if not 0.0 <= self.lstm_dropout < 1.0:
            raise ModelError(f"HV-BiLSTM lstm_dropout must be in [0, 1), got {lstm_dropout}")
        self.implementation = implementation
        self.lstm_seed = keras.random.SeedGenerator()
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        policy, rate = self.dtype_policy, self.lstm_dropout
        self.horizontal = _bidirectional_lstm(self.units, "horizontal", policy, rate)
        self.vertical = _bidirectional_lstm(self.units, "vertical", policy, rate)

    @property
    def implementation(self) -> str:
        """``"fused"`` or ``"keras"``; settable (rebuild a compiled step afterwards)."""
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        if value not in IMPLEMENTATIONS:
            raise ModelError(
                f"unknown HV-BiLSTM implementation {value!r}; choose one of {list(IMPLEMENTATIONS)}"
            )
        self._implementation = value

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        _, grid_h, grid_w, channels = input_shape
        self.horizontal.build((None, grid_w, channels))
        self.vertical.build((None, grid_h, channels))
        self.built = True

    def call(self, grid: Any, training: bool | None = None) -> Any:
        grid = self.dropout_layer(grid, training=training)
        return self.condition(grid, lstm_dropout_images=ops.shape(grid)[0] if training else 0)

    def condition(self, grid: Any, lstm_dropout_images: Any = 0) -> Any:
        """The LSTMs without the grid dropout: (B, G_h, G_w, D) -> (B, G_h, G_w, 4 * units).

        Args:
            grid: The (already dropped-out) grid.
            lstm_dropout_images: The first this-many images get the LSTMs' input dropout
                (training mode); the rest run as at inference.
        """
        grid = ops.cast(grid, self.horizontal.compute_dtype)
        dropping = not (isinstance(lstm_dropout_images, int) and lstm_dropout_images == 0)
        if self.implementation == "keras":
            if not dropping or self.lstm_dropout == 0.0:
                return self._keras(grid, training=dropping)
            # Keras' LSTMs drop the inputs of a whole batch: call them twice.
            dropped = self._keras(grid[:lstm_dropout_images], training=True)
            return ops.concatenate(
                [dropped, self._keras(grid[lstm_dropout_images:], training=False)], axis=0
            )
        masks = None
        if self.lstm_dropout > 0.0 and dropping:
            masks = self._input_masks(grid, lstm_dropout_images)
        return ops.cast(_fused(grid, self._cells(), masks), self.compute_dtype)

    def _input_masks(self, grid: tf.Tensor, images: Any) -> tf.Tensor:
        """(4, B, G_h, G_w, D) input masks: one per LSTM and sequence; ones after ``images``."""
        shape = tf.shape(grid)
        batch, grid_h, grid_w, channels = shape[0], shape[1], shape[2], shape[3]
        ones = tf.ones((2, batch, grid_h, 1, channels), grid.dtype)
        rows = keras.random.dropout(ones, self.lstm_dropout, seed=self.lstm_seed)
        ones = tf.ones((2, batch, 1, grid_w, channels), grid.dtype)
        columns = keras.random.dropout(ones, self.lstm_dropout, seed=self.lstm_seed)
        masks = tf.concat(
            [
                tf.broadcast_to(rows, (2, batch, grid_h, grid_w, channels)),
                tf.broadcast_to(columns, (2, batch, grid_h, grid_w, channels)),
            ],
            axis=0,
        )
        keep = tf.range(batch) < images
        return tf.where(keep[None, :, None, None, None], masks, tf.ones_like(masks))

    def _keras(self, grid: Any, training: bool) -> Any:
        shape = ops.shape(grid)
        batch, grid_h, grid_w, channels = shape[0], shape[1], shape[2], shape[3]
        rows = ops.reshape(grid, (batch * grid_h, grid_w, channels))
        columns = ops.reshape(ops.transpose(grid, (0, 2, 1, 3)), (batch * grid_w, grid_h, channels))
        rows = self.horizontal(rows, training=training)
        columns = self.vertical(columns, training=training)
        rows = ops.reshape(rows, (batch, grid_h, grid_w, 2 * self.units))
        columns = ops.reshape(columns, (batch, grid_w, grid_h, 2 * self.units))
        columns = ops.transpose(columns, (0, 2, 1, 3))
        return ops.cast(ops.concatenate([rows, columns], axis=-1), self.compute_dtype)

    def _cells(self) -> list[Any]:
        # Row forward, row backward, column forward, column backward.
        return [
            layer.cell
            for bidirectional in (self.horizontal, self.vertical)
            for layer in (bidirectional.forward_layer, bidirectional.backward_layer)
        ]

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (*input_shape[:-1], 4 * self.units)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            units=self.units,
            dropout=self.dropout,
            implementation=self.implementation,
            lstm_dropout=self.lstm_dropout,
        )
        return config


# --------------------------------------------------------------------------- fused path


def _fused(grid: tf.Tensor, cells: list[Any], masks: tf.Tensor | None = None) -> tf.Tensor:
    """The four LSTMs over a (B, G_h, G_w, D) float grid: (B, G_h, G_w, 4H).

    ``masks`` (4, B, G_h, G_w, D), if given, multiply each LSTM's inputs (input dropout).
    """
    units = cells[0].units
    kernel = tf.concat([tf.convert_to_tensor(c.kernel.value) for c in cells], axis=1)
    recurrent = tf.stack([tf.convert_to_tensor(c.recurrent_kernel.value) for c in cells])
    bias = tf.stack([tf.convert_to_tensor(c.bias.value) for c in cells])[:, None, :]
    shape = tf.shape(grid)
    batch, grid_h, grid_w = shape[0], shape[1], shape[2]
    # One 2-D matmul gives every LSTM's input products at every patch (a batched matmul
    # against a shared kernel has a far costlier gradient).
    if masks is None:
        products = tf.matmul(tf.reshape(grid, (-1, shape[3])), kernel)
    else:  # each LSTM sees its own masked inputs: four products, one batched matmul
        kernels = tf.stack(tf.split(kernel, 4, axis=1))  # (4, D, 4H)
        inputs = tf.reshape(masks * grid[None], (4, -1, shape[3]))
        products = tf.transpose(tf.matmul(inputs, kernels), (1, 0, 2))
    products = tf.reshape(products, (batch, grid_h, grid_w, 4, 4 * units))
    # (time, direction, sequence, 4H) in reading order: a backward LSTM reads reversed.
    rows = tf.transpose(products[:, :, :, :2], (2, 3, 0, 1, 4))  # (w, d, b, h, 4H)
    rows = _reading_order(tf.reshape(rows, (grid_w, 2, batch * grid_h, 4 * units)))
    columns = tf.transpose(products[:, :, :, 2:], (1, 3, 0, 2, 4))  # (h, d, b, w, 4H)
    columns = _reading_order(tf.reshape(columns, (grid_h, 2, batch * grid_w, 4 * units)))
    if grid.shape[1] is not None and grid.shape[1] == grid.shape[2]:
        # Square grid: rows and columns have the same length and count, one loop for all four.
        states = lstm_scan(tf.concat([rows, columns], axis=1), recurrent, bias)
        rows, columns = states[:, :2], states[:, 2:]
    else:
        rows = lstm_scan(rows, recurrent[:2], bias[:2])
        columns = lstm_scan(columns, recurrent[2:], bias[2:])
    rows = tf.reshape(_reading_order(rows), (grid_w, 2, batch, grid_h, units))
    columns = tf.reshape(_reading_order(columns), (grid_h, 2, batch, grid_w, units))
    out = tf.concat(
        [tf.transpose(rows, (2, 3, 0, 1, 4)), tf.transpose(columns, (2, 0, 3, 1, 4))], axis=3
    )  # (b, h, w, 4, H)
    return tf.reshape(out, (batch, grid_h, grid_w, 4 * units))


def _reading_order(sequences: tf.Tensor) -> tf.Tensor:
    """(T, 2, N, C) [forward, backward] pairs with the backward ones reversed in time."""
    return tf.stack([sequences[:, 0], tf.reverse(sequences[:, 1], [0])], axis=1)


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
