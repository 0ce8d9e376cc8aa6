"""ViT backbone of ViT-PCM (METHOD.md, "Network" 1): image -> grid of patch tokens.

Images (already scaled to [-1, 1]) of any size that is a multiple of the patch size go in;
the tokens after the final LayerNorm come out, class token dropped, as a (B, G_h, G_w, D) grid.
There is no classification head. Blocks are named ``encoderblock_{i}`` and the final norm
``encoder_norm`` so training can freeze and unfreeze them by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras

from vitpcm.config import DEFAULT_GELU
from vitpcm.errors import ModelError
from vitpcm.model.backbones import BACKBONES, DIMS
from vitpcm.model.vit_layers import (
    LAYER_NORM_EPSILON,
    PatchEmbedding,
    PatchGrid,
    ViTEncoderBlock,
    check_gelu,
)

if TYPE_CHECKING:
    from vitpcm.config import ModelConfig


@keras.saving.register_keras_serializable(package="vitpcm")
class ViTBackbone(keras.Model):
    """A ViT encoder as a functional Keras model with a dynamic input size.

    Args:
        patch_size: Side of a square patch in pixels.
        hidden_dim: Token width D.
        depth: Number of encoder blocks.
        num_heads: Attention heads per block.
        mlp_dim: Hidden width of each block's MLP.
        pos_embed_grid: Side of the grid the position embedding is stored for (24 for the
            384 px checkpoints at patch 16); other input grids are interpolated bicubically.
        dropout: Dropout rate inside the encoder (inactive in frozen blocks).
        layer_norm_epsilon: LayerNorm epsilon.
        gelu: GELU form in the MLPs: ``"tanh"`` (the Google checkpoints) or ``"exact"``.
        image_shape: Input shape without the batch; (None, None, 3) accepts any size.
        **kwargs: ``name`` (default ``"backbone"``) and ``trainable``.
    """

    def __init__(
        self,
        *,
        patch_size: int,
        hidden_dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        pos_embed_grid: int,
        dropout: float = 0.0,
        layer_norm_epsilon: float = LAYER_NORM_EPSILON,
        gelu: str = DEFAULT_GELU,
        image_shape: tuple[int | None, int | None, int] = (None, None, 3),
        **kwargs: Any,
    ) -> None:
        dims = {
            "patch_size": patch_size,
            "hidden_dim": hidden_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_dim": mlp_dim,
            "pos_embed_grid": pos_embed_grid,
        }
        for key, value in dims.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelError(f"backbone {key} must be a positive integer, got {value!r}")
        check_gelu(gelu)
        if not 0.0 <= dropout < 1.0:
            raise ModelError(f"backbone dropout must be in [0, 1), got {dropout}")
        kwargs.setdefault("name", "backbone")

        images = keras.Input(shape=tuple(image_shape), name="images")
        tokens = PatchEmbedding(
            patch_size, hidden_dim, pos_embed_grid, dropout=dropout, name="patch_embedding"
        )(images)
        for index in range(depth):
            tokens = ViTEncoderBlock(
                hidden_dim,
                num_heads,
                mlp_dim,
                dropout=dropout,
                layer_norm_epsilon=layer_norm_epsilon,
                gelu=gelu,
                name=f"encoderblock_{index}",
            )(tokens)
        tokens = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name="encoder_norm")(
            tokens
        )
        grid = PatchGrid(patch_size, name="patch_grid")([tokens, images])
        super().__init__(inputs=images, outputs=grid, **kwargs)

        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.pos_embed_grid = pos_embed_grid
        self.dropout = float(dropout)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.gelu = gelu
        self.image_shape = tuple(image_shape)

    @property
    def patch_embedding(self) -> PatchEmbedding:
        """The patch projection + class token + position embedding layer."""
        return self.get_layer("patch_embedding")

    @property
    def encoder_blocks(self) -> list[ViTEncoderBlock]:
        """The encoder blocks, first to last."""
        return [self.get_layer(f"encoderblock_{i}") for i in range(self.depth)]

    @property
    def encoder_norm(self) -> keras.layers.LayerNormalization:
        """The final LayerNorm."""
        return self.get_layer("encoder_norm")

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "patch_size": self.patch_size,
            "hidden_dim": self.hidden_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "pos_embed_grid": self.pos_embed_grid,
            "dropout": self.dropout,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "gelu": self.gelu,
            "image_shape": list(self.image_shape),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ViTBackbone:
        config = dict(config)
        config["image_shape"] = tuple(config.get("image_shape", (None, None, 3)))
        return cls(**config)

    @classmethod
    def from_preset(
        cls, preset: str, pos_embed_grid: int | None = None, **kwargs: Any
    ) -> ViTBackbone:
        """A backbone with the dimensions of a public checkpoint (``vit_s16``, ``vit_b16``, ...).

        Args:
            preset: A key of :data:`vitpcm.model.backbones.BACKBONES`.
            pos_embed_grid: Stored position grid; defaults to the checkpoint's.
            **kwargs: Further constructor arguments (dropout, name, ...).
        """
        if preset not in BACKBONES:
            raise ModelError(
                f"unknown backbone preset {preset!r}; choose one of {sorted(BACKBONES)}"
            )
        entry = BACKBONES[preset]
        grid = entry.pos_embed_grid if pos_embed_grid is None else pos_embed_grid
        return cls(**entry.dims, pos_embed_grid=grid, **kwargs)

    @classmethod
    def from_model_config(cls, model_cfg: ModelConfig, name: str = "backbone") -> ViTBackbone:
        """A backbone from the resolved ``model`` config section.

        Reads ``patch_size``, ``hidden_dim``, ``depth``, ``num_heads``, ``mlp_dim``,
        ``pos_embed_grid``, ``backbone_dropout`` and ``gelu``, all filled in (from the preset
        named by ``model.backbone`` where it has one) by :func:`vitpcm.config.load_config`.
        """
        return cls(
            **{dim: getattr(model_cfg, dim) for dim in DIMS},
            pos_embed_grid=model_cfg.pos_embed_grid,
            dropout=model_cfg.backbone_dropout,
            gelu=model_cfg.gelu,
            name=name,
        )
