"""Resolution and validation of a built config: presets, derived sizes, every range.

Run once, when a config is loaded or built (:func:`vitpcm.config.load_config`,
:func:`~vitpcm.config.resolve_config`); code that takes a section relies on it.
"""

from __future__ import annotations

from vitpcm.config.schema import GELU_FORMS, POOLINGS, Config
from vitpcm.data.sources import dataset_names
from vitpcm.errors import ConfigError
from vitpcm.model.backbones import BACKBONES, CUSTOM, DIMS


class Sources:
    """Remembers where values came from, so errors can say which file or ``--set`` to fix.

    Attributes:
        file: The YAML file the values were read from, if any.
        overrides: Dotted key -> the ``--set KEY=VALUE`` item that set it.
    """

    def __init__(self, file: str | None) -> None:
        self.file = file
        self.overrides: dict[str, str] = {}

    def where(self, key: str) -> str:
        """`` (from --set ...)`` or `` (in FILE)`` for ``key``; empty when unknown."""
        for set_key in sorted(self.overrides, key=len, reverse=True):
            if key == set_key or key.startswith(f"{set_key}."):
                return f" (from --set {self.overrides[set_key]})"
        return f" (in {self.file})" if self.file else ""

    def error(self, key: str, message: str) -> ConfigError:
        """A :class:`ConfigError` ``KEY: MESSAGE (where)``."""
        return ConfigError(f"{key}: {message}{self.where(key)}")


def resolve(cfg: Config, sources: Sources) -> Config:
    """Fill presets and derived sizes of ``cfg`` and validate it (in place)."""
    model = cfg.model
    if model.backbone in BACKBONES:
        preset = BACKBONES[model.backbone]
        for dim, wanted in preset.dims.items():
            value = getattr(model, dim)
            if value is None:
                setattr(model, dim, wanted)
            elif value != wanted:
                raise sources.error(
                    f"model.{dim}",
                    f"{value} conflicts with backbone {model.backbone} ({wanted}); "
                    f"remove it, or use backbone: {CUSTOM} with all of {', '.join(DIMS)}",
                )
        if model.pos_embed_grid is None:
            model.pos_embed_grid = preset.pos_embed_grid
    elif model.backbone == CUSTOM:
        missing = [f"model.{d}" for d in DIMS if getattr(model, d) is None]
        if missing:
            raise sources.error(
                missing[0],
                f"must be set: backbone {CUSTOM} has no preset to fill {', '.join(missing)}",
            )
    else:
        choices = [*BACKBONES, CUSTOM]
        raise sources.error(
            "model.backbone", f"unknown backbone {model.backbone!r}; choose one of {choices}"
        )
    _validate(cfg, sources)
    # Derived defaults are filled only after their inputs were checked to be positive.
    if model.pos_embed_grid is None:
        model.pos_embed_grid = cfg.data.image_size // model.patch_size
    if cfg.train.et.view_size is None:
        cfg.train.et.view_size = cfg.data.image_size // 2
    _validate_et(cfg, sources)
    return cfg


def _validate(cfg: Config, sources: Sources) -> None:
    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise sources.error(key, message)

    def positive(key: str, value: float | None) -> None:
        check(value is None or value > 0, key, f"must be positive, got {value}")

    def in_unit(key: str, value: float, *, closed: bool = True, top: float = 1.0) -> None:
        ok = 0 <= value <= top if closed else 0 <= value < top
        interval = f"[0, {top:g}]" if closed else f"[0, {top:g})"
        check(ok, key, f"must be in {interval}, got {value}")

    data, model, train = cfg.data, cfg.model, cfg.train
    check(bool(cfg.name.strip()), "name", "must not be empty")
    datasets = dataset_names()
    check(data.dataset in datasets, "data.dataset", f"must be one of {list(datasets)}")
    check(data.num_classes >= 2, "data.num_classes", "needs background and at least one class")
    for split in ("train_split", "val_split", "test_split"):
        check(bool(getattr(data, split).strip()), f"data.{split}", "must not be empty")
    for key in ("image_size", "test_size", "shuffle_buffer"):
        positive(f"data.{key}", getattr(data, key))
    aug = data.augment
    in_unit("data.augment.contrast", aug.contrast)
    in_unit("data.augment.saturation", aug.saturation)
    in_unit("data.augment.hue", aug.hue, top=0.5)  # a shift of 0.5 already spans the wheel
    in_unit("data.augment.grayscale_prob", aug.grayscale_prob)

    for dim in (*DIMS, "lstm_units", "pos_embed_grid"):
        positive(f"model.{dim}", getattr(model, dim))
    check(
        model.hidden_dim % model.num_heads == 0,
        "model.num_heads",
        f"{model.num_heads} does not divide model.hidden_dim ({model.hidden_dim})",
    )
    check(model.pooling in POOLINGS, "model.pooling", f"must be one of {list(POOLINGS)}")
    check(model.gelu in GELU_FORMS, "model.gelu", f"must be one of {list(GELU_FORMS)}")
    in_unit("model.dropout", model.dropout, closed=False)
    in_unit("model.backbone_dropout", model.backbone_dropout, closed=False)
    in_unit("model.lstm_dropout", model.lstm_dropout, closed=False)
    check(model.l2 >= 0, "model.l2", f"must be >= 0, got {model.l2}")
    check(model.pretrained != "", "model.pretrained", "must be a path/URI or null")
    for key in ("image_size", "test_size"):
        size = getattr(data, key)
        check(
            size % model.patch_size == 0,
            f"data.{key}",
            f"{size} is not a multiple of model.patch_size ({model.patch_size})",
        )

    for key in ("batch_size", "epochs", "patience", "steps_per_epoch", "lr", "warmup_lr"):
        positive(f"train.{key}", getattr(train, key))
    check(train.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0")
    check(train.seed >= 0, "train.seed", "must be >= 0")
    check(
        0 <= train.unfreeze_blocks <= model.depth,
        "train.unfreeze_blocks",
        f"must be in [0, model.depth={model.depth}], got {train.unfreeze_blocks}",
    )
    for key in ("bce", "et", "l2"):
        weight = getattr(train.loss_weights, key)
        check(weight >= 0, f"train.loss_weights.{key}", f"must be >= 0, got {weight}")
    in_unit("train.et.crop_prob", train.et.crop_prob)

    positive("eval.batch_size", cfg.eval.batch_size)
    check(cfg.eval.train_miou_images >= 0, "eval.train_miou_images", "must be >= 0 (0: off)")
    crf = cfg.crf
    for key in ("iterations", "gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
        positive(f"crf.{key}", getattr(crf, key))
    for key in ("gaussian_compat", "bilateral_compat"):
        check(getattr(crf, key) >= 0, f"crf.{key}", "must be >= 0")
    check(crf.workers >= 0, "crf.workers", "must be >= 0 (0 uses all cores)")
    for key in ("tracking_uri", "experiment", "registered_model"):
        check(getattr(cfg.mlflow, key) != "", f"mlflow.{key}", "must be a name or null")


def _validate_et(cfg: Config, sources: Sources) -> None:
    et, patch, size = cfg.train.et, cfg.model.patch_size, cfg.data.image_size
    if not et.enabled:
        return
    if cfg.train.batch_size % 4:
        raise ConfigError(
            "train.batch_size must be a multiple of 4 when train.et.enabled is true (the ET "
            f"loss tiles four views into one 2x2 mosaic); got {cfg.train.batch_size}"
            f"{sources.where('train.batch_size')}"
        )
    problems = [
        (
            et.view_size * 2 == size,
            "train.et.view_size",
            f"{et.view_size} * 2 must equal data.image_size ({size}): four views tile one "
            "image-sized mosaic; set it to null to derive it",
        ),
        (
            et.view_size % patch == 0,
            "train.et.view_size",
            f"{et.view_size} is not a multiple of model.patch_size ({patch})",
        ),
        (et.crop_size > 0, "train.et.crop_size", f"must be positive, got {et.crop_size}"),
        (
            et.crop_size % patch == 0,
            "train.et.crop_size",
            f"{et.crop_size} is not a multiple of model.patch_size ({patch}): crops are "
            "aligned to the patch grid",
        ),
        (
            et.crop_size <= size,
            "train.et.crop_size",
            f"{et.crop_size} is larger than data.image_size ({size})",
        ),
    ]
    for ok, key, message in problems:
        if not ok:
            raise sources.error(key, message)
