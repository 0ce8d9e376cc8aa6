"""Backbone pre-training stage (``train.pretrain_epochs``) and the ``.npz`` writer it uses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers.tiny import make_tiny_dataset, tiny_config
from vitpcm.config import load_config
from vitpcm.errors import ConfigError
from vitpcm.model.vit_backbone import ViTBackbone
from vitpcm.model.vit_weights import load_vit_npz, save_vit_npz


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("pretrain-data"))


def _backbone(seed: int) -> ViTBackbone:
    import keras

    keras.utils.set_random_seed(seed)
    backbone = ViTBackbone.from_model_config(tiny_config().model)
    backbone(np.zeros((1, 64, 64, 3), np.float32))
    return backbone


def test_saved_npz_loads_back_exactly(tmp_path: Path) -> None:
    source, target = _backbone(1), _backbone(2)
    kernel = source.patch_embedding.embedding.kernel.numpy()
    assert not np.array_equal(kernel, target.patch_embedding.embedding.kernel.numpy())
    path = tmp_path / "backbone.npz"
    keys = save_vit_npz(source, str(path))
    assert "Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel" in keys
    assert load_vit_npz(target, str(path)) == keys
    for a, b in zip(source.weights, target.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_pretrained_backbone_is_loaded_and_reused(tiny_data: Path, tmp_path: Path) -> None:
    from vitpcm.model.vitpcm import backbone_of
    from vitpcm.train import _TrainingLoop, train

    cfg = tiny_config("train.pretrain_epochs=2", "train.epochs=1")
    out = tmp_path / "run"
    result = train(cfg, data_uri=str(tiny_data), out_uri=str(out), progress=False)
    assert result["epochs_run"] == 1
    record = json.loads((out / "pretrain" / "pretrain.json").read_text())
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in record["history"])
    npz = out / "pretrain" / "backbone.npz"
    stamp = npz.stat().st_mtime_ns

    # The training model starts from the pre-trained backbone, not from a fresh init.
    import tensorflow as tf

    loop = _TrainingLoop(cfg, tf.distribute.get_strategy(), 6, 8, str(npz))
    saved = np.load(npz)
    kernel = backbone_of(loop.model).patch_embedding.embedding.kernel.numpy()
    np.testing.assert_array_equal(kernel, saved["embedding/kernel"])

    # Training again into the same folder reuses the finished stage instead of redoing it.
    cfg2 = tiny_config("train.pretrain_epochs=2", "train.epochs=2")
    train(cfg2, data_uri=str(tiny_data), out_uri=str(out), progress=False)
    assert npz.stat().st_mtime_ns == stamp

    # A stage pre-trained under other settings is refused, not silently reused.
    from vitpcm.pretrain import pretrain_backbone

    other = tiny_config("train.pretrain_epochs=2", "train.pretrain_lr=0.01")
    with pytest.raises(ConfigError, match="pre-trained with another config"):
        pretrain_backbone(
            other,
            data_uri=str(tiny_data),
            out_uri=str(out),
            strategy=tf.distribute.get_strategy(),
            num_classes=6,
            steps=2,
        )


def test_pretraining_and_a_checkpoint_together_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"train\.pretrain_epochs.*model\.pretrained"):
        load_config("synthetic", ["train.pretrain_epochs=2", "model.pretrained=/x/vit.npz"])
    with pytest.raises(ConfigError, match=r"train\.pretrain_epochs"):
        load_config("synthetic", ["train.pretrain_epochs=-1"])
