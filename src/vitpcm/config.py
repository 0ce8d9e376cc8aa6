"""Typed run configuration: schema, YAML loading, ``--set`` overrides and validation.

The dataclasses below hold the paper's PASCAL VOC settings as defaults (see METHOD.md);
a YAML file only overrides them, and ``--set KEY=VALUE`` overrides the file. Every value is
coerced to its declared type and checked once, at load time, so a bad key or value fails
before any data is read, with a :class:`~vitpcm.errors.ConfigError` naming the dotted key
and where it came from. The resolved config (presets and derived sizes filled in) is what
:func:`save_config` writes next to a run's outputs, and it loads back unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vitpcm.errors import ConfigError, StorageError

DATASETS = ("voc12", "coco14", "synthetic")
POOLINGS = ("max", "avg")
GELU_FORMS = ("tanh", "exact")
CUSTOM_BACKBONE = "custom"
BACKBONE_DIMS = ("patch_size", "hidden_dim", "depth", "num_heads", "mlp_dim")

# The public Google ViT checkpoints (Dosovitskiy et al.; AugReg for Ti/16 and S/16), as
# (patch_size, hidden_dim, depth, num_heads, mlp_dim).
BACKBONE_PRESETS: dict[str, dict[str, int]] = {
    name: dict(zip(BACKBONE_DIMS, dims, strict=True))
    for name, dims in {
        "vit_ti16": (16, 192, 12, 3, 768),
        "vit_s16": (16, 384, 12, 6, 1536),
        "vit_b16": (16, 768, 12, 12, 3072),
        "vit_l16": (16, 1024, 24, 16, 4096),
        "vit_b8": (8, 768, 12, 12, 3072),
    }.items()
}
# The presets' checkpoints were fine-tuned at 384 px, so their position embedding is stored
# on a 384 / patch_size grid and interpolated from there for other input sizes.
PRESET_PRETRAIN_SIZE = 384
CONFIG_DIR_ENV = "VITPCM_CONFIG_DIR"


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
    """ViT backbone, HV-BiLSTM and patch classifier; dims left ``None`` come from the preset."""

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
    gelu: str = "tanh"


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


# --------------------------------------------------------------------------- loading


def config_search_dirs() -> list[Path]:
    """Folders searched for a bare config name: ``$VITPCM_CONFIG_DIR``, then repo ``configs/``."""
    dirs = [Path(p) for p in os.environ.get(CONFIG_DIR_ENV, "").split(os.pathsep) if p]
    repo_configs = Path(__file__).resolve().parents[2] / "configs"
    if repo_configs.is_dir():
        dirs.append(repo_configs)
    return dirs


def available_configs() -> list[str]:
    """Names (without ``.yaml``) of the configs found in :func:`config_search_dirs`."""
    names = {
        p.stem for d in config_search_dirs() if d.is_dir() for p in d.glob("*.y*ml") if p.is_file()
    }
    return sorted(names)


def resolve_config_path(path_or_name: str | os.PathLike[str]) -> str:
    """Turn a file path, URI or bare name like ``synthetic`` into the file to read."""
    text = str(path_or_name)
    if text.startswith(("s3://", "http://", "https://")):
        return text
    text = text.removeprefix("file://")
    path = Path(text)
    if path.is_file():
        return text
    if path.is_dir():
        raise ConfigError(f"config {text} is a folder; pass a YAML file or a config name")
    is_bare_name = os.sep not in text and "/" not in text
    if is_bare_name and text:
        suffixes = ("",) if path.suffix in (".yaml", ".yml") else (".yaml", ".yml")
        for folder in config_search_dirs():
            for suffix in suffixes:
                candidate = folder / f"{text}{suffix}"
                if candidate.is_file():
                    return str(candidate)
    searched = ", ".join(str(d) for d in config_search_dirs()) or f"none (set ${CONFIG_DIR_ENV})"
    raise ConfigError(
        f"config {text!r} not found: no such file, and no {Path(text).stem}.yaml in the config "
        f"folders ({searched}); available: {', '.join(available_configs()) or 'none'}"
    )


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which plain YAML silently resolves to the last."""


def _construct_strict_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # ``<<: *defaults`` merges are meant to be overridden by the keys after them
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first set on line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_strict_mapping
)


def _yaml_error_line(source: str, exc: yaml.YAMLError) -> str:
    """One line ``config FILE:LINE:COL: what`` (1-based, like compilers) for a YAML error."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    what = " ".join(str(getattr(exc, "problem", None) or exc).split())
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None and context_mark is not mark:
        what += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    if "constructor for the tag" in what:
        tag = what.rpartition("for the tag ")[2].replace("tag:yaml.org,2002:", "!!")
        return (
            f"config {where}: the tag {tag} is not allowed: config files hold plain YAML "
            "values only"
        )
    return f"config {where}: not valid YAML: {what}"


def _read_yaml(source: str) -> dict[str, Any]:
    try:
        if source.startswith(("s3://", "http://", "https://")):
            from vitpcm import storage

            text = storage.read_bytes(source).decode("utf-8")
        else:
            text = Path(source).read_text(encoding="utf-8")
    except (OSError, StorageError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {source}: {exc}") from exc
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error_line(source, exc)) from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config {source}: the top level must be a mapping of sections, "
            f"got {type(raw).__name__}"
        )
    return raw


class _Sources:
    """Remembers where values came from, so errors can say which file or ``--set`` to fix."""

    def __init__(self, file: str | None) -> None:
        self.file = file
        self.overrides: dict[str, str] = {}

    def where(self, key: str) -> str:
        for set_key in sorted(self.overrides, key=len, reverse=True):
            if key == set_key or key.startswith(f"{set_key}."):
                return f" (from --set {self.overrides[set_key]})"
        return f" (in {self.file})" if self.file else ""

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{key}: {message}{self.where(key)}")


@dataclass(frozen=True)
class _RawOverride:
    """An override's value text, parsed only once the declared type of its key is known."""

    text: str


def _apply_override(raw: dict[str, Any], item: str, sources: _Sources) -> None:
    key, sep, value = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        raise ConfigError(f"bad override {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            section = ".".join(parts[: depth + 1])
            raise ConfigError(f"bad override {item!r}: {section} is a value, not a section")
        node = child
    node[parts[-1]] = _RawOverride(value.strip())
    sources.overrides[key] = item


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        keys.append(f"{prefix}{f.name}")
        if dataclasses.is_dataclass(hint):
            keys.extend(_all_keys(hint, f"{prefix}{f.name}."))
    return keys


def _unknown_key(key: str, sources: _Sources) -> ConfigError:
    valid = _all_keys(Config)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not close:  # a right name in the wrong section, e.g. ``lr`` for ``train.lr``
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
        leaf_close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
        close = [by_leaf[leaf_close[0]]] if leaf_close else []
    hint = f"; did you mean {close[0]}?" if close else ""
    return sources.error(key, f"unknown key{hint}")


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if args:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    return "a mapping" if dataclasses.is_dataclass(hint) else getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str, sources: _Sources) -> Any:
    """Convert ``value`` to the declared type ``hint`` or raise an error naming ``key``."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if isinstance(value, _RawOverride):
        value = _parse_override(value.text, base, key, sources)
    if value is None:
        if optional:
            return None
        if dataclasses.is_dataclass(base):  # an empty section in YAML means "all defaults"
            return _build(base, {}, f"{key}.", sources)
        raise sources.error(key, f"expected {_type_name(hint)}, got null")
    expected = f"expected {_type_name(hint)}, got {value!r}"
    if dataclasses.is_dataclass(base):
        if not isinstance(value, dict):
            raise sources.error(key, expected)
        return _build(base, value, f"{key}.", sources)
    if base is bool:
        if isinstance(value, bool):
            return value
        raise sources.error(key, f"{expected} (use true or false)")
    if isinstance(value, bool):  # bool is an int subclass; ``epochs: yes`` is a mistake
        raise sources.error(key, expected)
    if base is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):  # a quoted number, or ``1e3`` that YAML 1.1 leaves a string
            try:
                return int(value.strip())
            except ValueError:
                with contextlib.suppress(ValueError):
                    number = float(value)
                    if number.is_integer():
                        return int(number)
                raise sources.error(key, expected) from None
        if isinstance(value, int):
            return value
        raise sources.error(key, expected)
    if base is float:
        # PyYAML follows YAML 1.1, which reads ``1e-4`` (no dot) as a string.
        try:
            number = float(value) if isinstance(value, int | float | str) else None
        except ValueError:
            number = None
        if number is None or not math.isfinite(number):
            raise sources.error(key, f"expected a finite float, got {value!r}")
        return number
    if base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float):
            return str(value)
        raise sources.error(key, expected)
    raise TypeError(f"config field {key} has an unsupported type {hint!r}")


def _parse_override(text: str, base: Any, key: str, sources: _Sources) -> Any:
    try:
        parsed = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        if base is str:
            return text
        raise sources.error(key, f"cannot parse value {text!r} as YAML") from None
    if base is str and parsed is not None and not isinstance(parsed, str):
        # Strings keep the text as typed: ``name=2024`` or ``data.uri=a:b`` are names, not numbers.
        return text
    return parsed


def _build(cls: type, raw: Mapping[Any, Any], prefix: str, sources: _Sources) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in hints:
            raise _unknown_key(dotted, sources)
        kwargs[key] = _coerce(value, hints[key], dotted, sources)
    return cls(**kwargs)


def config_from_dict(
    raw: Mapping[str, Any], overrides: Sequence[str] | None = (), source: str | None = None
) -> Config:
    """Build, resolve and validate a config from nested dicts (e.g. ``Config.to_dict()``).

    Args:
        raw: Sections and values; missing ones keep their defaults.
        overrides: ``KEY=VALUE`` strings with dotted keys, applied after ``raw``.
        source: Where ``raw`` came from, quoted in error messages.
    """
    sources = _Sources(source)
    tree = _deep_copy_dicts(raw)
    for item in overrides or ():  # argparse leaves None when --set is never given
        _apply_override(tree, item, sources)
    cfg = _build(Config, tree, "", sources)
    return _resolve(cfg, sources)


def _deep_copy_dicts(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy_dicts(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def load_config(
    path_or_name: str | os.PathLike[str], overrides: Sequence[str] | None = ()
) -> Config:
    """Load a YAML config, apply ``--set`` overrides, fill presets and validate.

    Args:
        path_or_name: A YAML file path, an ``s3://``/``http(s)://`` URI, or a bare name like
            ``synthetic`` looked up in ``$VITPCM_CONFIG_DIR`` and then the repo's ``configs/``.
        overrides: ``KEY=VALUE`` strings with dotted keys (``train.lr=3e-4``,
            ``model.pretrained=null``); values are read as YAML scalars and coerced to the
            field's type.

    Returns:
        The resolved config.

    Raises:
        ConfigError: The file is missing or malformed, or a key or value is invalid.
    """
    source = resolve_config_path(path_or_name)
    return config_from_dict(_read_yaml(source), overrides, source=source)


def resolve_config(cfg: Config) -> Config:
    """Fill presets and derived sizes of a config built in code, then validate it (in place)."""
    return _resolve(cfg, _Sources(None))


def save_config(cfg: Config, uri: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML to a local path or ``s3://`` URI, atomically."""
    from vitpcm import storage

    header = "# Resolved vitpcm config: load it with vitpcm.config.load_config.\n"
    storage.write_bytes(uri, (header + cfg.to_yaml()).encode("utf-8"))


def dump_defaults() -> str:
    """The default (paper VOC, ViT-B/16) config, resolved, as YAML text."""
    return resolve_config(Config()).to_yaml()


# --------------------------------------------------------------------------- validation


def _resolve(cfg: Config, sources: _Sources) -> Config:
    model = cfg.model
    if model.backbone in BACKBONE_PRESETS:
        preset = BACKBONE_PRESETS[model.backbone]
        for dim in BACKBONE_DIMS:
            value = getattr(model, dim)
            if value is None:
                setattr(model, dim, preset[dim])
            elif value != preset[dim]:
                raise sources.error(
                    f"model.{dim}",
                    f"{value} conflicts with backbone {model.backbone} ({preset[dim]}); "
                    f"remove it, or use backbone: {CUSTOM_BACKBONE} with all of "
                    f"{', '.join(BACKBONE_DIMS)}",
                )
        if model.pos_embed_grid is None:
            model.pos_embed_grid = PRESET_PRETRAIN_SIZE // model.patch_size
    elif model.backbone == CUSTOM_BACKBONE:
        missing = [f"model.{d}" for d in BACKBONE_DIMS if getattr(model, d) is None]
        if missing:
            raise sources.error(
                missing[0],
                f"must be set: backbone {CUSTOM_BACKBONE} has no preset to fill "
                f"{', '.join(missing)}",
            )
    else:
        choices = [*BACKBONE_PRESETS, CUSTOM_BACKBONE]
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


def _validate(cfg: Config, sources: _Sources) -> None:
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
    check(data.dataset in DATASETS, "data.dataset", f"must be one of {list(DATASETS)}")
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

    for dim in (*BACKBONE_DIMS, "lstm_units", "pos_embed_grid"):
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


def _validate_et(cfg: Config, sources: _Sources) -> None:
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
