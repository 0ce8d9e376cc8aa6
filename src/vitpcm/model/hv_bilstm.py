"""HV-BiLSTM patch conditioning (METHOD.md, "Network" 2).

Each patch token is conditioned on its row and its column: one bidirectional LSTM runs along
every row of the grid and another along every column. Rows share one set of weights (they are
folded into the batch), and so do columns. The two outputs are concatenated, giving
``4 * units`` channels (768 with the paper's 192 units per direction).

Under a bfloat16 policy the LSTMs run in float32: cuDNN's LSTM kernels take float16/32/64
only, and Keras' TensorFlow backend raises on a bfloat16 input on GPU instead of falling back.
The LSTMs are small next to the ViT, so this costs little.
"""

from __future__ import annotations

from typing import Any

import keras
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
        rows = ops.reshape(self.horizontal(rows), (batch, grid_h, grid_w, 2 * self.units))
        columns = ops.reshape(ops.transpose(grid, (0, 2, 1, 3)), (batch * grid_w, grid_h, channels))
        columns = ops.reshape(self.vertical(columns), (batch, grid_w, grid_h, 2 * self.units))
        columns = ops.transpose(columns, (0, 2, 1, 3))
        return ops.cast(ops.concatenate([rows, columns], axis=-1), self.compute_dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (*input_shape[:-1], 4 * self.units)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(units=self.units, dropout=self.dropout)
        return config
