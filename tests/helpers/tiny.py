"""A tiny converted synthetic dataset and config overrides for fast end-to-end tests.

The model is the synthetic config scaled down (2 blocks, 32 dims, 64 px images) so a train
step costs milliseconds; the dataset is the real `vitpcm data synth` + `data convert` output.
"""

from __future__ import annotations

from pathlib import Path

from vitpcm.config import Config, load_config

# 64 px images, 8 px patches -> 8x8 grid; ET mosaics of four 32 px views.
TINY_OVERRIDES: tuple[str, ...] = (
    "data.image_size=64",
    "data.test_size=64",
    "model.hidden_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.mlp_dim=64",
    "model.pos_embed_grid=8",
    "model.lstm_units=16",
    "train.warmup_epochs=0",
    "train.unfreeze_blocks=2",
    "train.batch_size=8",
    "train.et.view_size=32",
    "train.et.crop_size=32",
    "eval.batch_size=8",
    "train.epochs=2",
    "train.steps_per_epoch=2",
)


def make_tiny_dataset(root: Path, train: int = 16, val: int = 8, test: int = 4) -> Path:
    """Synthesise and convert a small dataset under ``root``; returns the TFRecord folder."""
    from vitpcm.data.convert import convert_dataset
    from vitpcm.data.synth import make_synthetic

    raw = root / "raw"
    out = root / "tfrecords"
    make_synthetic(raw, train=train, val=val, test=test, size=64, seed=1, progress=False)
    convert_dataset("voc12", raw, out, workers=1, progress=False)
    return out


def tiny_config(*extra: str) -> Config:
    """The synthetic config with :data:`TINY_OVERRIDES` and ``extra`` applied."""

    return load_config("synthetic", [*TINY_OVERRIDES, *extra])
