"""Layers of the ViT backbone (Dosovitskiy et al., ICLR 2021), laid out like the JAX checkpoints.

Sub-layers carry the names of the public Google ``.npz`` files (``embedding``, ``LayerNorm_0``,
``MultiHeadDotProductAttention_1/{query,key,value,out}``, ``LayerNorm_2``, ``Dense_0``,
``Dense_1``) and keep their kernel layouts, so :mod:`vitpcm.model.vit_weights` copies tensors
without reshaping them.

Dropout follows the layer's ``trainable`` flag as well as the ``training`` argument: Keras runs
dropout whenever ``training=True``, even inside frozen layers, and the reference implementation
of ViT-PCM kept dropout active in its frozen backbone blocks (METHOD.md, "Known flaws"). A frozen
layer here behaves exactly as at inference. Keras reads ``trainable`` when a step is traced, so
after freezing or unfreezing, a compiled train step must be rebuilt (``model.compile`` again or a
fresh ``tf.function``).
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from vitpcm.config import DEFAULT_GELU, GELU_FORMS
from vitpcm.errors import ModelError

# flax.linen.LayerNorm's default, used by every public ViT checkpoint.
LAYER_NORM_EPSILON = 1e-6


def check_gelu(gelu: str) -> str:
    """``gelu`` if it is one of :data:`GELU_FORMS`; a :class:`ModelError` otherwise."""
    if gelu not in GELU_FORMS:
        raise ModelError(f"unknown GELU form {gelu!r}; choose one of {list(GELU_FORMS)}")
    return gelu


def dropout_active(layer: keras.layers.Layer, training: Any) -> bool:
    """Whether dropout inside ``layer`` should run: training mode *and* the layer is trainable.

    A layer whose ``frozen_dropout`` attribute is True (``model.frozen_dropout``, the authors'
    recipe) runs its dropout in training mode even while frozen.
    """
    return bool(training) and (layer.trainable or bool(getattr(layer, "frozen_dropout", False)))


def resize_position_grid(grid_embedding: Any, size: tuple[Any, Any]) -> tf.Tensor:
    """Bicubic 2-D resize of a position-embedding grid (class token excluded).

    Args:
        grid_embedding: (1, h, w, D) embedding laid out on its patch grid.
        size: Target (H, W) grid; Python ints or scalar tensors.

    Returns:
        float32 (1, H, W, D). The resize is the identity when the size is unchanged.
    """
    grid_embedding = tf.cast(grid_embedding, tf.float32)
    return tf.image.resize(grid_embedding, size, method="bicubic")


@keras.saving.register_keras_serializable(package="vitpcm")
class PatchEmbedding(keras.layers.Layer):
    """Patch projection, class token and learned position embedding of a ViT.

    The position embedding is stored for a ``pos_embed_grid`` x ``pos_embed_grid`` grid (plus the
    class token) as in the checkpoint, and resized bicubically to the input's patch grid at call
    time, so one model serves 384 px training and 960 px inference.

    Args:
        patch_size: Side of a square patch in pixels (conv kernel and stride).
        hidden_dim: Token width D.
        pos_embed_grid: Side of the grid the position embedding is stored for.
        dropout: Dropout rate on the embedded tokens (flax ViT applies it after adding positions).
        **kwargs: Standard layer arguments (name, dtype, ...).
    """

    def __init__(
        self,
        patch_size: int,
        hidden_dim: int,
        pos_embed_grid: int,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)
        self.hidden_dim = int(hidden_dim)
        self.pos_embed_grid = int(pos_embed_grid)
        self.dropout = float(dropout)
        self.embedding = keras.layers.Conv2D(
            self.hidden_dim,
            kernel_size=self.patch_size,
            strides=self.patch_size,
            padding="valid",
            name="embedding",
            dtype=self.dtype_policy,
        )
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.embedding.build(input_shape)
        self.cls = self.add_weight(shape=(1, 1, self.hidden_dim), initializer="zeros", name="cls")
        self.pos_embedding = self.add_weight(
            shape=(1, self.pos_embed_grid**2 + 1, self.hidden_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="pos_embedding",
        )
        self.built = True

    def position_embedding_for(self, grid_h: Any, grid_w: Any) -> tf.Tensor:
        """The (1, 1 + grid_h * grid_w, D) position embedding for a grid_h x grid_w input grid."""
        stored = tf.cast(self.pos_embedding, tf.float32)
        cls_position = stored[:, :1]
        grid = ops.reshape(
            stored[:, 1:], (1, self.pos_embed_grid, self.pos_embed_grid, self.hidden_dim)
        )
        same = isinstance(grid_h, int) and isinstance(grid_w, int)
        if not (same and grid_h == self.pos_embed_grid and grid_w == self.pos_embed_grid):
            grid = resize_position_grid(grid, (grid_h, grid_w))
        grid = ops.reshape(grid, (1, -1, self.hidden_dim))
        return ops.cast(ops.concatenate([cls_position, grid], axis=1), self.compute_dtype)

    def call(self, images: Any, training: bool | None = None) -> Any:
        height, width = images.shape[1], images.shape[2]
        for side in (height, width):
            # Valid-padding convolution would silently drop the remainder pixels.
            if side is not None and side % self.patch_size:
                raise ModelError(
                    f"input size {height}x{width} is not a multiple of the patch size "
                    f"{self.patch_size}; resize or pad images to a multiple of it"
                )
        patches = self.embedding(images)
        shape = ops.shape(patches)
        batch, grid_h, grid_w = shape[0], shape[1], shape[2]
        tokens = ops.reshape(patches, (batch, -1, self.hidden_dim))
        cls = ops.broadcast_to(ops.cast(self.cls, tokens.dtype), (batch, 1, self.hidden_dim))
        tokens = ops.concatenate([cls, tokens], axis=1)
        tokens = tokens + self.position_embedding_for(grid_h, grid_w)
        return self.dropout_layer(tokens, training=dropout_active(self, training))

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        height, width = input_shape[1], input_shape[2]
        if height is None or width is None:
            return (input_shape[0], None, self.hidden_dim)
        tokens = (height // self.patch_size) * (width // self.patch_size) + 1
        return (input_shape[0], tokens, self.hidden_dim)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            patch_size=self.patch_size,
            hidden_dim=self.hidden_dim,
            pos_embed_grid=self.pos_embed_grid,
            dropout=self.dropout,
        )
        return config


@keras.saving.register_keras_serializable(package="vitpcm")
class MultiHeadDotProductAttention(keras.layers.Layer):
    """Multi-head self-attention with per-head q/k/v kernels of shape (D, heads, head_dim).

    Args:
        hidden_dim: Token width D (must be divisible by ``num_heads``).
        num_heads: Number of attention heads.
        **kwargs: Standard layer arguments.
    """

    def __init__(self, hidden_dim: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.num_heads = int(num_heads)
        if self.hidden_dim % self.num_heads:
            raise ModelError(
                f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}; "
                "fix model.hidden_dim or model.num_heads"
            )
        self.head_dim = self.hidden_dim // self.num_heads
        projection = {
            "equation": "btd,dnh->btnh",
            "output_shape": (None, self.num_heads, self.head_dim),
            "bias_axes": "nh",
            "dtype": self.dtype_policy,
        }
        self.query = keras.layers.EinsumDense(name="query", **projection)
        self.key = keras.layers.EinsumDense(name="key", **projection)
        self.value = keras.layers.EinsumDense(name="value", **projection)
        self.out = keras.layers.EinsumDense(
            "btnh,nhd->btd",
            output_shape=(None, self.hidden_dim),
            bias_axes="d",
            name="out",
            dtype=self.dtype_policy,
        )

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        for projection in (self.query, self.key, self.value):
            projection.build(input_shape)
        self.out.build((*input_shape[:-1], self.num_heads, self.head_dim))
        self.built = True

    def call(self, tokens: Any) -> Any:
        query = self.query(tokens) * ops.cast(1.0 / math.sqrt(self.head_dim), tokens.dtype)
        key = self.key(tokens)
        value = self.value(tokens)
        scores = ops.einsum("bqnh,bknh->bnqk", query, key)
        # Softmax in float32: bfloat16 loses too much precision over thousands of tokens.
        weights = ops.cast(ops.softmax(ops.cast(scores, "float32"), axis=-1), value.dtype)
        context = ops.einsum("bnqk,bknh->bqnh", weights, value)
        return self.out(context)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(hidden_dim=self.hidden_dim, num_heads=self.num_heads)
        return config


@keras.saving.register_keras_serializable(package="vitpcm")
class ViTEncoderBlock(keras.layers.Layer):
    """Pre-norm transformer block: LayerNorm, attention, residual; LayerNorm, MLP, residual.

    Args:
        hidden_dim: Token width D.
        num_heads: Attention heads.
        mlp_dim: Hidden width of the MLP.
        dropout: Dropout rate after the attention and after each MLP dense layer.
        layer_norm_epsilon: LayerNorm epsilon (flax default 1e-6).
        gelu: ``"tanh"`` (approximation, the Google checkpoints) or ``"exact"`` (erf, the
            ViT-PCM authors' released weights).
        **kwargs: Standard layer arguments.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        layer_norm_epsilon: float = LAYER_NORM_EPSILON,
        gelu: str = DEFAULT_GELU,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.dropout = float(dropout)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.gelu = check_gelu(gelu)
        policy = self.dtype_policy
        self.layer_norm_0 = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, name="LayerNorm_0", dtype=policy
        )
        self.attention = MultiHeadDotProductAttention(
            self.hidden_dim, self.num_heads, name="MultiHeadDotProductAttention_1", dtype=policy
        )
        self.layer_norm_2 = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, name="LayerNorm_2", dtype=policy
        )
        self.dense_0 = keras.layers.Dense(self.mlp_dim, name="Dense_0", dtype=policy)
        self.dense_1 = keras.layers.Dense(self.hidden_dim, name="Dense_1", dtype=policy)
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=policy)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.layer_norm_0.build(input_shape)
        self.attention.build(input_shape)
        self.layer_norm_2.build(input_shape)
        self.dense_0.build(input_shape)
        self.dense_1.build((*input_shape[:-1], self.mlp_dim))
        self.built = True

    def call(self, tokens: Any, training: bool | None = None) -> Any:
        active = dropout_active(self, training)
        attended = self.attention(self.layer_norm_0(tokens))
        tokens = tokens + self.dropout_layer(attended, training=active)
        hidden = self.dense_0(self.layer_norm_2(tokens))
        # The JAX checkpoints were trained with flax's default, tanh-approximate GELU; the
        # authors' released ViT-PCM weights with the exact one.
        hidden = ops.gelu(hidden, approximate=self.gelu == "tanh")
        hidden = self.dropout_layer(hidden, training=active)
        hidden = self.dense_1(hidden)
        return tokens + self.dropout_layer(hidden, training=active)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout=self.dropout,
            layer_norm_epsilon=self.layer_norm_epsilon,
            gelu=self.gelu,
        )
        return config


@keras.saving.register_keras_serializable(package="vitpcm")
class PatchGrid(keras.layers.Layer):
    """Drop the class token and lay the patch tokens out on the image's patch grid.

    Called on ``[tokens, images]``: the images only supply the grid size, so non-square inputs
    keep their aspect ratio.

    Args:
        patch_size: Side of a patch in pixels.
        **kwargs: Standard layer arguments.
    """

    def __init__(self, patch_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)

    def call(self, inputs: list[Any]) -> Any:
        tokens, images = inputs
        image_shape = ops.shape(images)
        grid_h = image_shape[1] // self.patch_size
        grid_w = image_shape[2] // self.patch_size
        return ops.reshape(tokens[:, 1:], (image_shape[0], grid_h, grid_w, tokens.shape[-1]))

    def compute_output_shape(self, input_shape: list[tuple[int | None, ...]]) -> tuple:
        tokens_shape, images_shape = input_shape
        grid = [None if s is None else s // self.patch_size for s in images_shape[1:3]]
        return (tokens_shape[0], *grid, tokens_shape[-1])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(patch_size=self.patch_size)
        return config
