"""Patch classifier and global pooling (METHOD.md, "Network" 3 and 4).

Every patch gets its own softmax over the K classes (background is an ordinary class); the
image-level class probabilities are the maximum of each class map over the grid. Max pooling
is what lets one patch decide an image label without forcing every patch to agree with it;
``pooling="avg"`` gives the CAM-style ablation.

The classifier's L2 penalty is not attached as a Keras regulariser: the training loss adds
``losses.l2_loss(layer.kernel, layer.l2)`` explicitly, and a regulariser would count it twice.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from vitpcm.config import POOLINGS
from vitpcm.errors import ModelError

# Paper: classifier kernel initialised from N(0, 0.05).
KERNEL_STDDEV = 0.05


@keras.saving.register_keras_serializable(package="vitpcm")
class PatchClassifier(keras.layers.Layer):
    """Dropout, a bias-free dense layer to K logits, and a per-patch softmax in float32.

    Args:
        num_classes: K, background included.
        dropout: Dropout rate on the conditioned patch features.
        l2: Weight of the L2 penalty on :attr:`kernel` (applied by the training loss).
        kernel_stddev: Standard deviation of the normal kernel initialiser.
        **kwargs: Standard layer arguments.
    """

    def __init__(
        self,
        num_classes: int,
        dropout: float = 0.0,
        l2: float = 0.01,
        kernel_stddev: float = KERNEL_STDDEV,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if int(num_classes) < 1:
            raise ModelError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.dropout = float(dropout)
        self.l2 = float(l2)
        self.kernel_stddev = float(kernel_stddev)
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.dense = keras.layers.Dense(
            self.num_classes,
            use_bias=False,
            kernel_initializer=keras.initializers.RandomNormal(stddev=self.kernel_stddev),
            name="classifier",
            dtype=self.dtype_policy,
        )

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.dense.build(input_shape)
        self.built = True

    @property
    def kernel(self) -> Any:
        """The (C, K) classifier kernel the L2 penalty applies to."""
        return self.dense.kernel

    def call(self, features: Any, training: bool | None = None) -> Any:
        return self.classify(self.dropout_layer(features, training=training))

    def classify(self, features: Any) -> Any:
        """Per-patch class probabilities (float32) without the dropout."""
        logits = self.dense(features)
        # Softmax in float32 even under mixed precision: the losses take logs of these.
        return ops.softmax(ops.cast(logits, "float32"), axis=-1)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (*input_shape[:-1], self.num_classes)

    def compute_output_spec(self, features: Any, training: bool | None = None) -> Any:
        # Keras would otherwise announce the compute dtype (bfloat16 under mixed precision).
        shape = self.compute_output_shape(tuple(features.shape))
        return keras.KerasTensor(shape, dtype="float32")

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            dropout=self.dropout,
            l2=self.l2,
            kernel_stddev=self.kernel_stddev,
        )
        return config


@keras.saving.register_keras_serializable(package="vitpcm")
class GlobalClassPooling(keras.layers.Layer):
    """Image-level class probabilities from (B, G_h, G_w, K) patch probabilities.

    Args:
        pooling: ``"max"`` (ViT-PCM) or ``"avg"`` (CAM-style ablation).
        **kwargs: Standard layer arguments; keep ``dtype="float32"`` under mixed precision.
    """

    def __init__(self, pooling: str = "max", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if pooling not in POOLINGS:
            raise ModelError(f"unknown pooling {pooling!r}; choose one of {list(POOLINGS)}")
        self.pooling = pooling

    def call(self, patch_probs: Any) -> Any:
        if self.pooling == "max":
            return ops.max(patch_probs, axis=(1, 2))
        return ops.mean(patch_probs, axis=(1, 2))

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(pooling=self.pooling)
        return config
