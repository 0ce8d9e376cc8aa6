"""Loading Google ViT .npz checkpoints: exact forward pass against NumPy, and bad files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from helpers.http_server import http_server  # noqa: F401  (pytest fixture)
from helpers.vit_numpy import random_vit_weights, vit_forward, write_npz
from vitpcm.config import ModelConfig
from vitpcm.errors import ModelError, StorageError
from vitpcm.model.vit_backbone import ViTBackbone
from vitpcm.model.vit_layers import resize_position_grid
from vitpcm.model.vit_weights import load_vit_npz, save_vit_npz
from vitpcm.model.vitpcm import build_vitpcm

DIMS = {"patch_size": 8, "hidden_dim": 32, "depth": 2, "num_heads": 4, "mlp_dim": 64}
GRID = 4  # 32 px at patch 8


def tiny_weights(**overrides: object) -> dict[str, np.ndarray]:
    return random_vit_weights(**{**DIMS, "grid": GRID, **overrides})


def tiny_backbone(grid: int = GRID) -> ViTBackbone:
    return ViTBackbone(**DIMS, pos_embed_grid=grid)


def images(size: tuple[int, int] = (32, 32), batch: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (batch, *size, 3)).astype("float32")


@pytest.fixture
def npz_file(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    weights = tiny_weights()
    return write_npz(tmp_path / "ViT-tiny.npz", weights), weights


@pytest.mark.parametrize("naming", ["old", "new"])
def test_loaded_backbone_matches_numpy_forward(tmp_path: Path, naming: str) -> None:
    weights = tiny_weights(naming=naming, seed=3)
    path = write_npz(tmp_path / "w.npz", weights)
    backbone = tiny_backbone()
    loaded = load_vit_npz(backbone, str(path))
    assert "cls" in loaded and not any(k.startswith(("head/", "pre_logits/")) for k in loaded)
    x = images()
    diff = np.abs(backbone(x).numpy() - vit_forward(weights, x)).max()
    assert diff < 1e-4


def test_load_from_file_uri_and_other_grid(npz_file: tuple[Path, dict]) -> None:
    path, weights = npz_file
    backbone = tiny_backbone()
    load_vit_npz(backbone, path.resolve().as_uri())
    np.testing.assert_array_equal(backbone.patch_embedding.cls.numpy(), weights["cls"])
    # A grid other than the stored one interpolates the positions and still runs.
    grid = backbone(images((48, 64), batch=1)).numpy()
    assert grid.shape == (1, 6, 8, 32) and np.isfinite(grid).all()


def test_load_over_http(http_server, npz_file: tuple[Path, dict]) -> None:  # noqa: F811
    path, weights = npz_file
    (http_server.root / "vit.npz").write_bytes(path.read_bytes())
    backbone = tiny_backbone()
    load_vit_npz(backbone, http_server.url("vit.npz"))
    x = images(batch=1)
    assert np.abs(backbone(x).numpy() - vit_forward(weights, x)).max() < 1e-4


def test_load_into_full_model(npz_file: tuple[Path, dict]) -> None:
    path, weights = npz_file
    cfg = ModelConfig(
        backbone="custom",
        **DIMS,
        pos_embed_grid=GRID,
        backbone_dropout=0.0,
        dropout=0.1,
        lstm_units=4,
        pooling="max",
        l2=0.01,
        pretrained=str(path),
    )
    model = build_vitpcm(cfg, num_classes=3, load_pretrained=True)
    kernel = model.get_layer("backbone").patch_embedding.embedding.kernel.numpy()
    np.testing.assert_array_equal(kernel, weights["embedding/kernel"])


def test_stored_grid_differs_is_resized(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    weights = tiny_weights(grid=3)
    path = write_npz(tmp_path / "w.npz", weights)
    backbone = tiny_backbone(grid=GRID)
    with caplog.at_level(logging.INFO, logger="vitpcm.model.vit_weights"):
        load_vit_npz(backbone, str(path))
    assert "3x3" in caplog.text and "4x4" in caplog.text
    stored = weights["Transformer/posembed_input/pos_embedding"]
    expected = resize_position_grid(stored[:, 1:].reshape(1, 3, 3, 32), (4, 4)).numpy()
    loaded = backbone.patch_embedding.pos_embedding.numpy()
    np.testing.assert_array_equal(loaded[:, 0], stored[:, 0])
    np.testing.assert_allclose(loaded[:, 1:], expected.reshape(1, 16, 32), atol=1e-6)


def test_missing_key_names_key_and_file(tmp_path: Path) -> None:
    weights = tiny_weights()
    del weights["Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"]
    del weights["cls"]
    path = write_npz(tmp_path / "broken.npz", weights)
    backbone = tiny_backbone()
    before = backbone.patch_embedding.embedding.kernel.numpy()
    with pytest.raises(ModelError) as info:
        load_vit_npz(backbone, str(path))
    message = str(info.value)
    assert "Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias" in message
    assert "cls" in message and "broken.npz" in message
    # Nothing was half-loaded.
    np.testing.assert_array_equal(backbone.patch_embedding.embedding.kernel.numpy(), before)


def test_wrong_shape_names_key_and_shapes(tmp_path: Path) -> None:
    weights = tiny_weights()
    key = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    weights[key] = np.zeros((32, 2, 16), "float32")
    path = write_npz(tmp_path / "w.npz", weights)
    with pytest.raises(ModelError) as info:
        load_vit_npz(tiny_backbone(), str(path))
    message = str(info.value)
    assert key in message and "(32, 4, 8)" in message and "(32, 2, 16)" in message


def test_checkpoint_of_other_width_is_rejected(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "w.npz", random_vit_weights(**{**DIMS, "hidden_dim": 16}, grid=4))
    with pytest.raises(ModelError, match=r"embedding/kernel expected \(8, 8, 3, 32\)"):
        load_vit_npz(tiny_backbone(), str(path))


def test_deeper_checkpoint_is_rejected(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "w.npz", tiny_weights(depth=3))
    with pytest.raises(ModelError, match="3 encoder blocks"):
        load_vit_npz(tiny_backbone(), str(path))


@pytest.mark.parametrize("content", [b"not a zip at all", b"PK\x03\x04truncated"])
def test_garbage_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.npz"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="garbage.npz"):
        load_vit_npz(tiny_backbone(), str(path))


def test_truncated_npz(tmp_path: Path, npz_file: tuple[Path, dict]) -> None:
    path, _ = npz_file
    cut = tmp_path / "cut.npz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelError, match="cut.npz"):
        load_vit_npz(tiny_backbone(), str(cut))


def test_single_array_file(tmp_path: Path) -> None:
    path = tmp_path / "array.npz"
    with path.open("wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(ModelError, match="single array"):
        load_vit_npz(tiny_backbone(), str(path))


def test_missing_file_is_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="nope.npz"):
        load_vit_npz(tiny_backbone(), str(tmp_path / "nope.npz"))


def test_saved_npz_loads_back_exactly(tmp_path: Path, npz_file: tuple[Path, dict]) -> None:
    path, _ = npz_file
    source, target = tiny_backbone(), tiny_backbone()
    load_vit_npz(source, str(path))
    assert not np.array_equal(
        source.patch_embedding.embedding.kernel.numpy(),
        target.patch_embedding.embedding.kernel.numpy(),
    )
    out = tmp_path / "saved.npz"
    keys = save_vit_npz(source, str(out))
    assert "Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel" in keys
    assert load_vit_npz(target, str(out)) == keys
    for a, b in zip(source.weights, target.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
