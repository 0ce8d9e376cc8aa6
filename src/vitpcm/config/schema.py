"""The config schema: every section as a dataclass, with the paper's PASCAL VOC defaults.

These dataclasses are the one place where a setting's type and default are written; library
functions take the section they need (``cfg.data.augment``, ``cfg.crf``, ...) once
:mod:`vitpcm.config.validation` has checked it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

POOLINGS = ("max", "avg")
# GELU forms: "tanh" is flax's default approximation, the one the public Google checkpoints
# were trained with; "exact" (erf) is what the ViT-PCM authors' Keras 2 model computes.
GELU_FORMS = ("tanh", "exact")
DEFAULT_GELU = "tanh"


@dataclass
class AugmentConfig:
    """Colour and geometric jitter of training images (METHOD.md, Schedule).

    ``contrast`` and ``saturation`` are maximum relative changes: the factor is drawn from
    ``[1 - x, 1 + x]``; ``hue`` is the maximum shift as a fraction of the colour wheel.
    """

    contrast: float = 0.5
    saturation: float = 0.5
    hue: float = 0.1
    grayscale_prob: float = 0.1
    flip: bool = True
    transpose: bool = True


@dataclass
class DataConfig:
    """Which dataset, where its TFRecords live, and the image sizes used on it."""

    dataset: str = "voc12"
    uri: str | None = None
    num_classes: int = 21
    train_split: str = "trainaug"
    val_split: str = "val"
    test_split: str = "train"
    image_size: int = 384
    test_size: int = 960
    shuffle_buffer: int = 1024
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    """ViT backbone, HV-BiLSTM and patch classifier.

    ``backbone`` names an entry of :data:`vitpcm.model.backbones.BACKBONES`, whose dims fill
    those left ``None``, or is ``custom`` (every dim given).
    """

    backbone: str = "vit_b16"
    patch_size: int | None = None
    hidden_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    pretrained: str | None = None
    backbone_dropout: float = 0.0
    # Backbone dropout in frozen blocks too (the authors' recipe; docs/METHOD-NOTES.md).
    frozen_dropout: bool = False
    dropout: float = 0.1
    # Input dropout inside the HV-BiLSTM's LSTMs (the authors' recipe: 0.2).
    lstm_dropout: float = 0.0
    lstm_units: int = 192
    pooling: str = "max"
    l2: float = 0.01
    pos_embed_grid: int | None = None
    # GELU in the ViT MLPs: "tanh" (approximation) is what the public Google checkpoints were
    # trained with; "exact" (erf) is what the authors' released ViT-PCM weights expect
    # (`vitpcm weights import-reference` sets it). Recorded in the saved model.
    gelu: str = DEFAULT_GELU


@dataclass
class LossWeights:
    """Weights of the summed training losses (all 1 in the paper)."""

    bce: float = 1.0
    et: float = 1.0
    l2: float = 1.0


@dataclass
class EtConfig:
    """Second views for the equivariance (ET) loss: crop, resize, tile into 2x2 mosaics."""

    enabled: bool = True
    view_size: int | None = None
    crop_size: int = 128
    crop_prob: float = 0.3


@dataclass
class TrainConfig:
    """Optimisation schedule: frozen-backbone warm-up, then partial fine-tuning."""

    batch_size: int = 16
    warmup_epochs: int = 1
    warmup_lr: float = 1e-3
    epochs: int = 80
    lr: float = 1e-4
    unfreeze_blocks: int = 5
    patience: int = 60
    mixed_precision: bool = False
    # Compile the per-replica train step with XLA: faster (bench/train_step.py), but it draws
    # other dropout masks than the default, so a run's numbers change.
    jit_compile: bool = False
    # One pass per step (main views and mosaics batched, the ET target from the main pass's
    # activations where exact, one HV-BiLSTM loop); false: the earlier three separate passes.
    fused_step: bool = True
    seed: int = 0
    steps_per_epoch: int | None = None
    loss_weights: LossWeights = field(default_factory=LossWeights)
    et: EtConfig = field(default_factory=EtConfig)


@dataclass
class EvalConfig:
    """Evaluation and test-time inference.

    ``train_miou_images``: the per-epoch training mIoU (``train_miou``, next to ``val_miou``)
    is the BPM mIoU of the first this-many images of ``data.train_split`` (0 turns it off;
    skipped when that split has no masks). A fixed subset keeps it cheap.
    """

    batch_size: int = 8
    train_miou_images: int = 64


@dataclass
class CrfConfig:
    """Dense CRF post-processing (pydensecrf), the paper's parameters."""

    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0
    workers: int = 0


@dataclass
class MlflowConfig:
    """Where runs are tracked and models registered; ``None`` leaves it to the environment."""

    tracking_uri: str | None = None
    experiment: str | None = None
    registered_model: str | None = None


@dataclass
class Config:
    """A whole run: data, model, training, evaluation, CRF and tracking settings."""

    name: str = "vitpcm"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    crf: CrfConfig = field(default_factory=CrfConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain dicts of str/int/float/bool/None."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config as YAML text that :func:`load_config` reads back to an equal config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
