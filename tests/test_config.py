"""Config schema, YAML loading, ``--set`` overrides, validation and save/load round trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vitpcm.config import (
    Config,
    ModelConfig,
    available_configs,
    config_from_dict,
    dump_defaults,
    load_config,
    resolve_config,
    save_config,
)
from vitpcm.errors import ConfigError
from vitpcm.model.backbones import BACKBONES

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ALL_CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.fixture(autouse=True)
def _no_config_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own $VITPCM_CONFIG_DIR must not change what these tests resolve.
    monkeypatch.delenv("VITPCM_CONFIG_DIR", raising=False)


def _plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, str | int | float | bool)


# --------------------------------------------------------------------------- shipped configs


def test_the_four_documented_configs_exist() -> None:
    names = {p.stem for p in ALL_CONFIGS}
    assert {"voc12_vit_s16", "voc12_vit_b16", "coco14_vit_b16", "synthetic"} <= names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem
    for dim in ("patch_size", "hidden_dim", "depth", "num_heads", "mlp_dim", "pos_embed_grid"):
        assert isinstance(getattr(cfg.model, dim), int)
    assert cfg.train.et.view_size is not None
    assert _plain(cfg.to_dict())

    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.yaml"]  # no temp left over


def test_paper_settings_are_the_defaults() -> None:
    cfg = resolve_config(Config())
    assert (cfg.data.dataset, cfg.data.num_classes) == ("voc12", 21)
    assert (cfg.data.train_split, cfg.data.image_size, cfg.data.test_size) == ("trainaug", 384, 960)
    assert (cfg.model.backbone, cfg.model.hidden_dim, cfg.model.pos_embed_grid) == (
        "vit_b16",
        768,
        24,
    )
    assert (cfg.model.lstm_units, cfg.model.dropout, cfg.model.l2) == (192, 0.1, 0.01)
    assert cfg.model.pooling == "max"
    t = cfg.train
    assert (t.batch_size, t.warmup_epochs, t.warmup_lr, t.epochs, t.lr) == (16, 1, 1e-3, 80, 1e-4)
    assert (t.unfreeze_blocks, t.patience) == (5, 60)
    assert (t.et.enabled, t.et.view_size, t.et.crop_size) == (True, 192, 128)
    crf = cfg.crf
    assert (crf.iterations, crf.gaussian_sxy, crf.gaussian_compat) == (10, 1, 3)
    assert (crf.bilateral_sxy, crf.bilateral_srgb, crf.bilateral_compat) == (67, 3, 4)
    assert "hidden_dim: 768" in dump_defaults()


def test_synthetic_config_is_the_small_cpu_setting() -> None:
    cfg = load_config("synthetic")
    assert (cfg.data.dataset, cfg.data.num_classes, cfg.data.image_size) == ("synthetic", 6, 128)
    assert cfg.model.backbone == "custom"
    assert (cfg.model.patch_size, cfg.model.hidden_dim, cfg.model.depth) == (8, 128, 2)
    assert (cfg.train.lr, cfg.train.warmup_epochs, cfg.train.et.crop_size) == (3e-4, 1, 64)
    # After the warm-up the whole randomly initialised backbone trains (see the YAML).
    assert cfg.train.unfreeze_blocks == cfg.model.depth
    assert isinstance(cfg.train.lr, float)


# --------------------------------------------------------------------------- name resolution


def test_bare_name_resolves_in_repo_configs() -> None:
    assert load_config("voc12_vit_s16") == load_config(CONFIG_DIR / "voc12_vit_s16.yaml")
    assert load_config("synthetic.yaml").name == "synthetic"
    assert "synthetic" in available_configs()


def test_config_dir_env_takes_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "synthetic.yaml").write_text("name: mine\n")
    (tmp_path / "extra.yml").write_text("name: extra\n")
    monkeypatch.setenv("VITPCM_CONFIG_DIR", str(tmp_path))
    assert load_config("synthetic").name == "mine"
    assert load_config("extra").name == "extra"
    assert load_config("voc12_vit_b16").name == "voc12_vit_b16"  # falls back to the repo


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ConfigError, match=r"'nope' not found.*available: .*synthetic"):
        load_config("nope")


def test_missing_file_and_folder_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_file_uri_prefix(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: via-uri\n")
    assert load_config(f"file://{path}").name == "via-uri"


# --------------------------------------------------------------------------- YAML files


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_only_overrides_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "train:\n  lr: 1e-4\n  epochs: 3\nmlflow:\n"))
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads a string
    assert cfg.train.epochs == 3
    assert cfg.train.batch_size == 16 and cfg.mlflow.experiment is None
    assert load_config(_write(tmp_path, "")) == resolve_config(Config())


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "train:\n  <<: {epochs: 3, lr: 2e-4}\n  lr: 1e-3\n"))
    assert (cfg.train.epochs, cfg.train.lr) == (3, 1e-3)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("train: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("train:\n  lr: 1.0\n  lr: 2.0\n", "duplicate key 'lr'"),
        ("train:\n  epochs: abc\n", r"train\.epochs: expected int, got 'abc' \(in .*cfg\.yaml\)"),
        ("train: 5\n", r"train: expected a mapping, got 5"),
        (
            "model:\n  hidden_dm: 64\n",
            r"model\.hidden_dm: unknown key; did you mean model\.hidden_dim",
        ),
        ("lr: 0.1\n", r"lr: unknown key; did you mean train\.lr"),
    ],
)
def test_bad_yaml_names_file_and_key(tmp_path: Path, text: str, pattern: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- overrides


def test_overrides_are_coerced_to_the_declared_type() -> None:
    cfg = load_config(
        "voc12_vit_b16",
        [
            "train.lr=3e-4",
            "train.warmup_lr=1",
            "model.pretrained=null",
            "train.et.enabled=false",
            "train.batch_size=18",  # allowed once ET is off
            "data.uri=s3://bucket/voc12/tfrecord",
            "name=2024",
            "train.steps_per_epoch=1e3",
            "mlflow.tracking_uri=http://mlflow:5000",
        ],
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.warmup_lr == 1.0 and isinstance(cfg.train.warmup_lr, float)
    assert cfg.model.pretrained is None
    assert cfg.train.et.enabled is False and cfg.train.batch_size == 18
    assert cfg.data.uri == "s3://bucket/voc12/tfrecord"
    assert cfg.name == "2024"
    assert cfg.train.steps_per_epoch == 1000
    assert cfg.mlflow.tracking_uri == "http://mlflow:5000"


def test_override_of_a_whole_section_and_of_optional_none() -> None:
    cfg = load_config(
        "synthetic", ["train.loss_weights={bce: 2, et: 0.5}", "model.pretrained=/w/s16.npz"]
    )
    assert (cfg.train.loss_weights.bce, cfg.train.loss_weights.et) == (2.0, 0.5)
    assert cfg.train.loss_weights.l2 == 1.0
    assert cfg.model.pretrained == "/w/s16.npz"


def test_derived_sizes_follow_overrides() -> None:
    cfg = load_config(
        "synthetic",
        ["data.image_size=256", "train.et.view_size=null", "model.pos_embed_grid=null"],
    )
    assert cfg.train.et.view_size == 128
    assert cfg.model.pos_embed_grid == 32  # custom backbone: its own training grid


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("train.lr", "bad override 'train.lr': expected KEY=VALUE"),
        ("train..lr=1", "expected KEY=VALUE"),
        ("train.lr.x=1", r"train\.lr is a value, not a section"),
        ("train.epochs=abc", r"train\.epochs: expected int, got 'abc' \(from --set train"),
        ("train.epochs=2.5", r"train\.epochs: expected int, got 2\.5"),
        ("train.lrr=1", r"train\.lrr: unknown key; did you mean train\.lr\?"),
        ("train.et.enabled=maybe", r"train\.et\.enabled: expected bool"),
        ("train.epochs=true", r"train\.epochs: expected int, got True"),
        ("train.epochs=null", r"train\.epochs: expected int, got null"),
        ("train.lr=.nan", r"train\.lr: expected a finite float"),
        ("train.lr=[1", r"train\.lr: cannot parse value"),
    ],
)
def test_bad_override_names_the_key(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config("synthetic", [override])


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "key", "detail"),
    [
        (["train.lr=0"], "train.lr", "must be positive"),
        (["train.warmup_lr=-1e-3"], "train.warmup_lr", "must be positive"),
        (["data.augment.grayscale_prob=1.5"], "data.augment.grayscale_prob", "[0, 1]"),
        (["data.augment.hue=0.7"], "data.augment.hue", "[0, 0.5]"),
        (["train.et.crop_prob=-0.1"], "train.et.crop_prob", "[0, 1]"),
        (["model.dropout=1.0"], "model.dropout", "[0, 1)"),
        (["model.backbone_dropout=1"], "model.backbone_dropout", "[0, 1)"),
        (["data.image_size=0"], "data.image_size", "must be positive"),
        (["eval.batch_size=0"], "eval.batch_size", "must be positive"),
        (["data.num_classes=1"], "data.num_classes", "background"),
        (["data.image_size=100"], "data.image_size", "not a multiple of model.patch_size (8)"),
        (["data.test_size=132"], "data.test_size", "not a multiple of model.patch_size"),
        (["train.et.crop_size=60"], "train.et.crop_size", "not a multiple of model.patch_size"),
        (["train.et.crop_size=256"], "train.et.crop_size", "larger than data.image_size"),
        (["train.et.view_size=32"], "train.et.view_size", "must equal data.image_size"),
        (["train.unfreeze_blocks=3"], "train.unfreeze_blocks", "model.depth=2"),
        (["model.num_heads=3"], "model.num_heads", "does not divide model.hidden_dim"),
        (["model.pooling=mean"], "model.pooling", "['max', 'avg']"),
        (["model.backbone=vit_x16"], "model.backbone", "unknown backbone"),
        (["data.dataset=imagenet"], "data.dataset", "voc12"),
        (["crf.workers=-1"], "crf.workers", ">= 0"),
        (["crf.iterations=0"], "crf.iterations", "must be positive"),
        (["train.steps_per_epoch=0"], "train.steps_per_epoch", "must be positive"),
        (["train.loss_weights.et=-1"], "train.loss_weights.et", ">= 0"),
        (["model.mlp_dim=null"], "model.mlp_dim", "must be set: backbone custom"),
    ],
)
def test_out_of_range_values_name_the_key(overrides: list[str], key: str, detail: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("synthetic", overrides)
    message = str(info.value)
    assert message.startswith(f"{key}: ") or f"{key} " in message
    assert detail in message
    assert "--set" in message or "synthetic.yaml" in message  # says where to fix it


def test_batch_not_multiple_of_four_with_et() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("voc12_vit_b16", ["train.batch_size=18"])
    assert str(info.value).startswith(
        "train.batch_size must be a multiple of 4 when train.et.enabled is true "
        "(the ET loss tiles four views into one 2x2 mosaic)"
    )
    assert "--set train.batch_size=18" in str(info.value)


def test_preset_dims_conflict_is_rejected() -> None:
    with pytest.raises(
        ConfigError, match=r"model\.hidden_dim: 384 conflicts with backbone vit_b16"
    ):
        load_config("voc12_vit_b16", ["model.hidden_dim=384"])


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_presets_fill_the_dims(name: str) -> None:
    cfg = config_from_dict({"model": {"backbone": name}})
    preset = BACKBONES[name].dims
    assert {k: getattr(cfg.model, k) for k in preset} == preset
    assert cfg.model.pos_embed_grid == 384 // preset["patch_size"]


def test_preset_table_matches_the_paper() -> None:
    assert BACKBONES["vit_s16"].dims == {
        "patch_size": 16, "hidden_dim": 384, "depth": 12, "num_heads": 6, "mlp_dim": 1536,
    }  # fmt: skip
    assert BACKBONES["vit_b8"].patch_size == 8
    assert BACKBONES["vit_l16"].depth == 24


def test_resolve_config_fills_a_config_built_in_code() -> None:
    cfg = Config(model=ModelConfig(backbone="vit_s16"))
    assert cfg.model.hidden_dim is None
    assert resolve_config(cfg).model.hidden_dim == 384
    with pytest.raises(
        ConfigError, match=r"model\.patch_size: must be set: backbone custom has no preset"
    ):
        resolve_config(Config(model=ModelConfig(backbone="custom")))


def test_to_dict_round_trips_through_config_from_dict() -> None:
    cfg = load_config("coco14_vit_b16")
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    again.train.lr = 1.0
    assert cfg.train.lr == 1e-4  # independent copies
    assert dataclasses.asdict(cfg) == cfg.to_dict()
