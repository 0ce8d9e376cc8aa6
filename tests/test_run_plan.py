"""Dataset, config and pre-trained weights: the config follows the dataset, and a mismatch
fails before any download, the same way in the CLI, make run-local, make submit and the
pipeline's first step."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.tiny import make_tiny_dataset
from vitpcm import cli, run_plan
from vitpcm.cli.common import load_cfg
from vitpcm.data.sources import dataset_names
from vitpcm.data.sources.coco14 import COCO_CLASSES
from vitpcm.data.sources.voc12 import VOC_CLASSES
from vitpcm.data.synth import SYNTH_CLASSES
from vitpcm.errors import ConfigError

S16 = (
    "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03"
    "-res_384.npz"
)


@pytest.fixture(scope="module")
def synth_records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("plan"), train=8, val=4, test=2)


def test_the_config_follows_the_dataset() -> None:
    assert run_plan.config_for("voc12") == "voc12_vit_s16"
    assert run_plan.config_for("coco14") == "coco14_vit_b16"
    assert run_plan.config_for("synthetic") == "synthetic"
    assert run_plan.config_for("voc12", "voc12_vit_b16") == "voc12_vit_b16"
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'"):
        run_plan.config_for("imagenet")


def test_every_default_config_fits_its_dataset() -> None:
    # Class counts counted independently from the class-name lists.
    classes = {
        "synthetic": len(SYNTH_CLASSES),
        "voc12": len(VOC_CLASSES),
        "coco14": len(COCO_CLASSES) + (COCO_CLASSES[0] != "background"),
    }
    assert set(dataset_names()) == set(classes)
    for dataset in dataset_names():
        cfg = run_plan.load_checked_config(dataset)
        assert cfg.data.dataset == dataset
        assert cfg.data.num_classes == classes[dataset]


@pytest.mark.parametrize(
    ("dataset", "config", "overrides", "message"),
    [
        ("voc12", "synthetic", [], "config synthetic is for dataset synthetic, not voc12"),
        ("coco14", "voc12_vit_s16", [], "is for dataset voc12, not coco14; .* coco14_vit_b16"),
        ("synthetic", "voc12_vit_b16", [], "not synthetic"),
        ("voc12", None, ["data.num_classes=20"], "num_classes=20 but voc12 has 21"),
        ("voc12", None, ["model.pretrained=/w/ViT-B_16.npz"], "vit_b16 checkpoint .* vit_s16"),
        ("coco14", None, [f"model.pretrained=s3://b/{S16}"], "vit_s16 checkpoint .* vit_b16"),
        ("voc12", None, ["model.pretrained=/nowhere/w.npz"], "/nowhere/w.npz is not a file"),
    ],
)
def test_mismatches_are_named(dataset, config, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        run_plan.load_checked_config(dataset, config, overrides)


def test_matching_checkpoints_pass(tmp_path: Path) -> None:
    local = tmp_path / S16
    local.write_bytes(b"")
    run_plan.load_checked_config("voc12", None, [f"model.pretrained={local}"])
    run_plan.load_checked_config("coco14", None, ["model.pretrained=https://h/ViT-B_16.npz"])
    # A path inside another machine's filesystem is not checked from here.
    run_plan.load_checked_config("voc12", None, ["model.pretrained=/pod/w.npz"], local_files=False)
    assert run_plan.checkpoint_backbone(f"s3://b/x/{S16}") == "vit_s16"
    assert run_plan.checkpoint_backbone("ViT-L_16.npz") == "vit_l16"
    assert run_plan.checkpoint_backbone("Ti_16-i21k.npz") == "vit_ti16"
    assert run_plan.checkpoint_backbone("my-backbone.npz") is None


def test_cli_refuses_a_config_for_another_dataset(synth_records: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "-c", "voc12_vit_s16", "--data", str(synth_records),
                     "--out", str(out), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err == [
        "error: config voc12_vit_s16 is for dataset voc12, not synthetic; use a synthetic "
        "config such as synthetic, or leave the config out to get synthetic"
    ]
    assert not out.exists()


def test_cli_config_defaults_to_the_datasets(synth_records: Path, tmp_path: Path) -> None:
    for command in ("train", "eval", "test"):
        extra = ["--out", str(tmp_path)] + (["-m", str(tmp_path)] if command != "train" else [])
        args = cli.build_parser().parse_args([command, "--data", str(synth_records), *extra])
        assert args.config is None
        assert load_cfg(args).name == "synthetic"
        assert args.config == "synthetic"
    args = cli.build_parser().parse_args(["train", "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="no config: give -c CONFIG"):
        load_cfg(args)


def test_run_local_checks_before_starting_anything(tmp_path: Path, capsys) -> None:
    from localrun import command, run

    root = tmp_path / "root"
    assert run.check_config("", [], 0, "coco14") == "coco14_vit_b16"
    assert run.check_config("voc12_vit_b16", [], 3, "voc12") == "voc12_vit_b16"
    code = command.main(["--root", str(root), "--dataset", "voc12", "-c", "synthetic"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: config synthetic is for dataset synthetic, not voc12")
    assert not root.exists()


def test_submit_checks_the_package_defaults_and_params(tmp_path: Path) -> None:
    from pipeline.compile import compile_pipeline
    from pipeline.submit import parse_params, read_package

    spec = read_package(compile_pipeline(tmp_path / "p.yaml", "cluster"))
    assert spec["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"] == ""
    assert parse_params(spec, ["dataset=coco14"]) == {"dataset": "coco14"}
    with pytest.raises(ConfigError, match="config voc12_vit_s16 is for dataset voc12"):
        parse_params(spec, ["dataset=coco14", "config=voc12_vit_s16"])
    with pytest.raises(ConfigError, match="vit_b16 checkpoint"):
        parse_params(spec, ["overrides=model.pretrained=s3://b/ViT-B_16.npz"])


@pytest.mark.parametrize("which", ["cluster", "single-node"])
def test_the_pipeline_checks_first_and_trains_with_the_checked_config(tmp_path, which) -> None:
    import yaml

    from pipeline.compile import compile_pipeline

    spec = next(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", which).read_text()))
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    assert tasks["check-run"].get("dependentTasks", []) == []
    assert "check-run" in tasks["download-data"]["dependentTasks"]
    assert "check-run" in tasks["convert-data"]["dependentTasks"]
    config = tasks["train-model"]["inputs"]["parameters"]["config"]
    text = yaml.safe_dump(config)
    assert "check-run" in text or "pipelinechannel--check-run-Output" in text, config


def test_check_step_body() -> None:
    from components.check import check_run

    body = check_run.python_func
    assert body(dataset="coco14") == "coco14_vit_b16"
    assert body(dataset="voc12", config="voc12_vit_b16") == "voc12_vit_b16"
    with pytest.raises(ConfigError, match="not voc12"):
        body(dataset="voc12", config="synthetic")
