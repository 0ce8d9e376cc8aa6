"""ViT backbone: preset sizes, dynamic input grids, position interpolation, frozen dropout."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from vitpcm.config import Config, DataConfig, ModelConfig, TrainConfig, resolve_config
from vitpcm.errors import ConfigError, ModelError
from vitpcm.model.vit_backbone import ViTBackbone
from vitpcm.model.vit_layers import (
    MultiHeadDotProductAttention,
    PatchEmbedding,
    PatchGrid,
    ViTEncoderBlock,
    resize_position_grid,
)

TINY = {
    "patch_size": 8,
    "hidden_dim": 32,
    "depth": 2,
    "num_heads": 4,
    "mlp_dim": 64,
    "pos_embed_grid": 4,
}

PRESETS = {
    # name: (patch, dim, depth, mlp)
    "vit_ti16": (16, 192, 12, 768),
    "vit_s16": (16, 384, 12, 1536),
    "vit_b16": (16, 768, 12, 3072),
    "vit_l16": (16, 1024, 24, 4096),
    "vit_b8": (8, 768, 12, 3072),
}


def expected_params(patch: int, dim: int, depth: int, mlp: int, grid: int) -> int:
    """Parameters of a head-less ViT with a (grid^2 + 1)-position embedding."""
    embedding = patch * patch * 3 * dim + dim + dim + (grid * grid + 1) * dim
    block = 2 * 2 * dim + 4 * (dim * dim + dim) + (dim * mlp + mlp) + (mlp * dim + dim)
    return embedding + depth * block + 2 * dim


def tiny_backbone(**overrides: object) -> ViTBackbone:
    return ViTBackbone(**{**TINY, **overrides})


def test_expected_params_formula_matches_published_counts() -> None:
    assert expected_params(16, 384, 12, 1536, 24) == 21_811_584
    assert expected_params(16, 768, 12, 3072, 24) == 86_090_496


@pytest.mark.parametrize(
    "preset",
    [
        "vit_ti16",
        "vit_s16",
        "vit_b16",
        pytest.param("vit_l16", marks=pytest.mark.slow),
        "vit_b8",
    ],
)
def test_preset_parameter_count_and_960_grid(preset: str) -> None:
    patch, dim, depth, mlp = PRESETS[preset]
    backbone = ViTBackbone.from_preset(preset)
    assert backbone.pos_embed_grid == 384 // patch
    assert backbone.count_params() == expected_params(patch, dim, depth, mlp, 384 // patch)
    if preset == "vit_s16":
        assert backbone.count_params() == 21_811_584
    if preset == "vit_b16":
        assert backbone.count_params() == 86_090_496
    # Symbolic call only: no 960 px forward pass on CPU.
    spec = backbone.compute_output_spec(keras.KerasTensor((1, 960, 960, 3)))
    assert tuple(spec.shape) == (1, 960 // patch, 960 // patch, dim)
    assert [b.name for b in backbone.encoder_blocks] == [f"encoderblock_{i}" for i in range(depth)]
    assert backbone.encoder_norm.name == "encoder_norm"


def test_tiny_backbone_forward_any_multiple_of_patch() -> None:
    backbone = tiny_backbone()
    for height, width in [(32, 32), (48, 24), (64, 40)]:
        images = np.random.default_rng(0).uniform(-1, 1, (2, height, width, 3)).astype("float32")
        grid = backbone(images)
        assert tuple(grid.shape) == (2, height // 8, width // 8, 32)
        assert np.isfinite(grid.numpy()).all()


def test_input_not_multiple_of_patch_is_rejected() -> None:
    backbone = tiny_backbone()
    with pytest.raises(ModelError, match="multiple of the patch size 8"):
        backbone(np.zeros((1, 36, 32, 3), "float32"))


def test_dynamic_shape_tf_function_matches_eager() -> None:
    backbone = tiny_backbone()
    run = tf.function(
        lambda x: backbone(x), input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32)]
    )
    rng = np.random.default_rng(1)
    for size in (32, 48):  # stored grid (identity) and a resized one
        images = rng.uniform(-1, 1, (1, size, size, 3)).astype("float32")
        np.testing.assert_allclose(run(images).numpy(), backbone(images).numpy(), atol=1e-5)


def test_position_embedding_identity_when_grids_match() -> None:
    embedding = tiny_backbone().patch_embedding
    stored = embedding.pos_embedding.numpy()
    np.testing.assert_array_equal(embedding.position_embedding_for(4, 4).numpy(), stored)
    # The dynamic path (grid as tensors) resizes, and a same-size bicubic resize is exact.
    dynamic = embedding.position_embedding_for(tf.constant(4), tf.constant(4)).numpy()
    np.testing.assert_array_equal(dynamic, stored)


def test_position_embedding_resize_keeps_class_token_apart() -> None:
    embedding = tiny_backbone().patch_embedding
    stored = embedding.pos_embedding.numpy()
    constant = np.full_like(stored, 0.5)
    constant[:, 0] = 7.0  # the class token must not leak into the grid
    embedding.pos_embedding.assign(constant)
    resized = embedding.position_embedding_for(6, 3).numpy()
    assert resized.shape == (1, 1 + 6 * 3, 32)
    np.testing.assert_array_equal(resized[:, 0], constant[:, 0])
    # Bicubic weights sum to one, so a constant field stays constant.
    np.testing.assert_allclose(resized[:, 1:], 0.5, atol=1e-6)


def test_resize_position_grid_is_bicubic_not_nearest() -> None:
    grid = np.zeros((1, 4, 4, 1), "float32")
    grid[0, 1, 1, 0] = 1.0
    up = resize_position_grid(grid, (8, 8)).numpy()
    assert up.shape == (1, 8, 8, 1)
    # A cubic kernel overshoots: some values go below zero next to the peak.
    assert up.min() < 0.0
    assert 0.5 < up.max() <= 1.2


def _two_training_calls(backbone: ViTBackbone) -> tuple[np.ndarray, np.ndarray]:
    images = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    return backbone(images, training=True).numpy(), backbone(images, training=True).numpy()


def test_dropout_inactive_in_frozen_backbone() -> None:
    backbone = tiny_backbone(dropout=0.3)
    first, second = _two_training_calls(backbone)
    assert np.abs(first - second).max() > 1e-3  # dropout does run while trainable

    backbone.trainable = False
    first, second = _two_training_calls(backbone)
    np.testing.assert_array_equal(first, second)
    inference = backbone(
        np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype("float32"), training=False
    ).numpy()
    np.testing.assert_allclose(first, inference, atol=1e-6)


def test_dropout_inactive_in_single_frozen_block() -> None:
    block = ViTEncoderBlock(16, 2, 32, dropout=0.5)
    tokens = np.random.default_rng(3).normal(size=(2, 5, 16)).astype("float32")
    first = np.asarray(block(tokens, training=True))
    assert np.abs(first - np.asarray(block(tokens, training=True))).max() > 0
    block.trainable = False
    np.testing.assert_array_equal(block(tokens, training=True), block(tokens, training=False))


def test_backbone_config_round_trip() -> None:
    backbone = tiny_backbone(dropout=0.1, name="bb")
    config = backbone.get_config()
    assert {k: config[k] for k in TINY} == TINY
    assert config["dropout"] == 0.1 and config["name"] == "bb"
    clone = ViTBackbone.from_config(config)
    assert clone.get_config() == config
    assert clone.count_params() == backbone.count_params()


@pytest.mark.parametrize(
    "layer",
    [
        PatchEmbedding(8, 32, 4, dropout=0.2, name="pe"),
        MultiHeadDotProductAttention(32, 4, name="mha"),
        ViTEncoderBlock(32, 4, 64, dropout=0.1, layer_norm_epsilon=1e-5, name="blk"),
        PatchGrid(8, name="grid"),
    ],
)
def test_layers_store_every_constructor_argument(layer: keras.layers.Layer) -> None:
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config


def test_attention_kernels_have_checkpoint_layout() -> None:
    attention = MultiHeadDotProductAttention(32, 4)
    attention.build((None, None, 32))
    assert tuple(attention.query.kernel.shape) == (32, 4, 8)
    assert tuple(attention.query.bias.shape) == (4, 8)
    assert tuple(attention.out.kernel.shape) == (4, 8, 32)
    assert tuple(attention.out.bias.shape) == (32,)


def test_heads_must_divide_dim() -> None:
    with pytest.raises(ModelError, match="not divisible"):
        tiny_backbone(num_heads=5)


def test_from_model_config_takes_the_resolved_preset_dims_and_dropout() -> None:
    cfg = resolve_config(Config(model=ModelConfig(backbone="vit_ti16", backbone_dropout=0.2)))
    backbone = ViTBackbone.from_model_config(cfg.model)
    assert (backbone.hidden_dim, backbone.depth, backbone.num_heads) == (192, 12, 3)
    assert backbone.pos_embed_grid == 24 and backbone.dropout == 0.2
    assert backbone.name == "backbone"


def test_from_model_config_custom_backbone() -> None:
    data, train = DataConfig(image_size=256, test_size=256), TrainConfig(unfreeze_blocks=2)
    model = ModelConfig(backbone="custom", **{**TINY, "pos_embed_grid": None})
    cfg = resolve_config(Config(data=data, model=model, train=train))
    backbone = ViTBackbone.from_model_config(cfg.model)
    assert backbone.pos_embed_grid == 256 // TINY["patch_size"]  # derived from data.image_size
    assert (backbone.hidden_dim, backbone.mlp_dim) == (TINY["hidden_dim"], TINY["mlp_dim"])
    model = ModelConfig(backbone="custom", **{**TINY, "mlp_dim": None})
    with pytest.raises(ConfigError, match="model.mlp_dim"):
        resolve_config(Config(data=data, model=model, train=train))


def test_unknown_preset() -> None:
    with pytest.raises(ModelError, match="vit_x99"):
        ViTBackbone.from_preset("vit_x99")
