"""Each component's Python function, called directly on tiny data with real artifact objects."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from kfp import dsl

from components import (
    convert_data,
    download_data,
    evaluate_model,
    infer_crf,
    register_model,
    train_model,
)
from helpers.s3_server import s3_bucket, s3_server  # noqa: F401  (fixtures)
from helpers.tiny import TINY_OVERRIDES

pytest_plugins = ("helpers.http_server",)

# One training step of one epoch: enough to produce every output file.
TRAIN_OVERRIDES = " ".join([*TINY_OVERRIDES, "train.epochs=1", "train.steps_per_epoch=1"])
SYNTH = {"synthetic_train": 16, "synthetic_val": 8, "synthetic_test": 4, "synthetic_size": 64}


def artifact(cls: type, root: Path, name: str, **metadata: Any) -> Any:
    """An artifact object like the executor builds: ``.path`` is ``root/name``."""
    return cls(name=name, uri=str(root / name), metadata=dict(metadata))


@pytest.fixture(scope="module")
def tfrecords(tmp_path_factory: pytest.TempPathFactory) -> dsl.Dataset:
    root = tmp_path_factory.mktemp("data")
    raw = artifact(dsl.Dataset, root, "raw")
    download_data.python_func(raw=raw, dataset="synthetic", seed=3, **SYNTH)
    out = artifact(dsl.Dataset, root, "tfrecords")
    convert_data.python_func(raw=raw, tfrecords=out, dataset="synthetic", shards=1, workers=1)
    return out


@pytest.fixture(autouse=True, scope="module")
def _restore_environment() -> Any:
    """Components set process environment variables (as in their own containers): undo them
    after this module so later tests do not inherit a run id or a tracking URI."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def trained(
    tfrecords: dsl.Dataset, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dsl.Model, dsl.Metrics]:
    root = tmp_path_factory.mktemp("train")
    model = artifact(dsl.Model, root, "model")
    metrics = artifact(dsl.Metrics, root, "metrics")
    train_model.python_func(
        tfrecords_uri=tfrecords.uri,
        model=model,
        metrics=metrics,
        config="synthetic",
        overrides=TRAIN_OVERRIDES,
        kfp_run_id="run-1",
    )
    return model, metrics


def test_download_synthetic_writes_the_voc_layout(tmp_path: Path) -> None:
    raw = artifact(dsl.Dataset, tmp_path, "raw")
    download_data.python_func(raw=raw, dataset="synthetic", **SYNTH)
    lists = Path(raw.path) / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    assert len((lists / "train.txt").read_text().split()) == 16
    assert len((lists / "val.txt").read_text().split()) == 8
    assert len(list((Path(raw.path) / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg"))) == 28
    assert raw.metadata == {"dataset": "synthetic", "data_version": ""}


def test_download_rejects_an_unknown_dataset(tmp_path: Path) -> None:
    from vitpcm.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown dataset 'voc07'"):
        download_data.python_func(raw=artifact(dsl.Dataset, tmp_path, "raw"), dataset="voc07")


def test_download_from_a_mirror_drops_the_archives(tmp_path: Path, http_server: Any) -> None:
    """The real-dataset branch: archives fetched from --mirror, unpacked, then removed."""
    from vitpcm.data import download
    from vitpcm.data.sources import get_source

    # A one-image COCO-shaped mirror; checksums are not known for hand-made archives.
    _write_tiny_coco_archives(http_server.root)
    raw = artifact(dsl.Dataset, tmp_path, "raw")
    download_data.python_func(
        raw=raw, dataset="coco14", mirror=http_server.base_url, skip_checksum=True
    )
    names = {f.name for f in get_source("coco14").files}
    assert {r.name for r in http_server.requests if r.method == "GET"} >= names
    assert (Path(raw.path) / "coco2014" / "annotations").is_dir()
    assert not (Path(raw.path) / download.DOWNLOADS_DIR).exists()


def _write_tiny_coco_archives(root: Path) -> None:
    import zipfile

    members = {
        "train2014.zip": {"train2014/COCO_train2014_000000000009.jpg": b"t9"},
        "val2014.zip": {"val2014/COCO_val2014_000000000042.jpg": b"v42"},
        "annotations_trainval2014.zip": {
            "annotations/instances_train2014.json": b'{"images": []}',
            "annotations/instances_val2014.json": b'{"images": []}',
        },
    }
    for archive_name, files in members.items():
        with zipfile.ZipFile(root / archive_name, "w") as archive:
            for name, data in files.items():
                archive.writestr(name, data)


def test_convert_records_split_sizes(tfrecords: dsl.Dataset) -> None:
    info = json.loads((Path(tfrecords.path) / "dataset.json").read_text())
    assert info["splits"]["train"]["num_examples"] == 16
    assert tfrecords.metadata["train_examples"] == 16
    assert tfrecords.metadata["val_examples"] == 8
    assert tfrecords.metadata["num_classes"] == 6
    assert tfrecords.metadata["skipped"] == 0
    assert (Path(tfrecords.path) / "train-00000-of-00001.tfrecord").is_file()


def test_convert_fails_cleanly_on_an_empty_download(tmp_path: Path) -> None:
    from vitpcm.errors import DataError

    raw = artifact(dsl.Dataset, tmp_path, "raw")
    Path(raw.path).mkdir()
    out = artifact(dsl.Dataset, tmp_path, "tfrecords")
    with pytest.raises(DataError):
        convert_data.python_func(raw=raw, tfrecords=out, dataset="voc12", workers=1)
    assert not Path(out.path).exists()  # nothing half-written


@pytest.mark.slow
def test_train_writes_the_model_folder_and_metrics(trained: tuple[dsl.Model, dsl.Metrics]) -> None:
    model, metrics = trained
    folder = Path(model.path)
    for name in ("model.keras", "config.yaml", "metrics.json", "history.json"):
        assert (folder / name).is_file(), name
    assert 0.0 <= metrics.metadata["val_miou"] <= 1.0
    assert metrics.metadata["epochs_run"] == 1
    assert metrics.metadata["best_epoch"] == 1
    assert model.metadata["config"] == "synthetic"
    assert model.metadata["num_classes"] == 6
    # The saved config carries the overrides, so later steps use the trained sizes.
    assert "image_size: 64" in (folder / "config.yaml").read_text()


def test_train_rejects_a_bad_override_before_reading_data(tmp_path: Path) -> None:
    from vitpcm.errors import ConfigError

    with pytest.raises(ConfigError, match="train.nope"):
        train_model.python_func(
            tfrecords_uri=str(tmp_path / "missing"),
            model=artifact(dsl.Model, tmp_path, "model"),
            metrics=artifact(dsl.Metrics, tmp_path, "metrics"),
            config="synthetic",
            overrides="train.nope=1",
        )


@pytest.mark.slow
def test_evaluate_logs_metrics_and_a_class_iou_table(
    trained: tuple[dsl.Model, dsl.Metrics], tfrecords: dsl.Dataset, tmp_path: Path
) -> None:
    model, _ = trained
    metrics = artifact(dsl.Metrics, tmp_path, "metrics")
    table = artifact(dsl.Markdown, tmp_path, "class_iou")
    report = artifact(dsl.Artifact, tmp_path, "report")
    evaluate_model.python_func(
        model=model,
        tfrecords_uri=tfrecords.uri,
        metrics=metrics,
        class_iou=table,
        report=report,
    )
    assert 0.0 <= metrics.metadata["miou"] <= 1.0
    assert metrics.metadata["num_images"] == 8
    written = json.loads((Path(report.path) / "metrics.json").read_text())
    assert written["miou"] == pytest.approx(metrics.metadata["miou"])
    assert (Path(report.path) / "confusion_matrix.png").is_file()
    lines = Path(table.path).read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| #")]
    assert len(rows) == 6
    assert rows[0].startswith("| 0 | background |")
    assert report.metadata["split"] == "val"


@pytest.mark.slow
def test_infer_with_crf_writes_masks_and_both_mious(
    trained: tuple[dsl.Model, dsl.Metrics], tfrecords: dsl.Dataset, tmp_path: Path
) -> None:
    model, _ = trained
    masks = artifact(dsl.Dataset, tmp_path, "pseudo_masks")
    metrics = artifact(dsl.Metrics, tmp_path, "metrics")
    infer_crf.python_func(
        model=model,
        tfrecords_uri=tfrecords.uri,
        pseudo_masks=masks,
        metrics=metrics,
        crf=True,
        workers=1,
        overrides="crf.iterations=2",
    )
    from vitpcm.metrics import SCALAR_METRICS

    scalars = {name for base in SCALAR_METRICS for name in (base, f"{base}_crf")}
    assert set(metrics.metadata) == scalars | {"num_images"}
    written = json.loads((Path(masks.path) / "metrics.json").read_text())
    assert {key: written[key] for key in scalars} == pytest.approx(
        {key: metrics.metadata[key] for key in scalars}
    )
    # The synthetic config infers on its held-out test split (labelled, unlike VOC's).
    test = SYNTH["synthetic_test"]
    assert len(list((Path(masks.path) / "pseudo_masks").glob("*.png"))) == test
    assert len(list((Path(masks.path) / "pseudo_masks_crf").glob("*.png"))) == test
    assert masks.metadata == {"split": "test", "num_images": test, "crf": True}


def _register_inputs(tmp_path: Path) -> dict[str, Any]:
    model = artifact(dsl.Model, tmp_path, "model", config="synthetic")
    Path(model.path).mkdir()
    return {
        "model": model,
        "eval_metrics": artifact(dsl.Metrics, tmp_path, "eval", miou=0.5, pixel_accuracy=0.8),
        "test_metrics": artifact(dsl.Metrics, tmp_path, "test", miou=0.5, miou_crf=0.55),
        "eval_report": artifact(dsl.Artifact, tmp_path, "report"),
        "pseudo_masks": artifact(dsl.Dataset, tmp_path, "masks"),
        "summary": artifact(dsl.Artifact, tmp_path, "summary"),
        "mlflow_spool": artifact(dsl.Artifact, tmp_path, "spool"),
    }


def test_register_without_mlflow_writes_the_summary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inputs = _register_inputs(tmp_path)
    register_model.python_func(**inputs, tracking_uri="", kfp_run_id="run-7")
    # An empty URI is a choice, said out loud, not a failure.
    assert any("MLflow skipped on purpose" in r.getMessage() for r in caplog.records)
    summary = json.loads(Path(inputs["summary"].path).read_text())
    assert summary["kfp_run_id"] == "run-7"
    assert summary["eval"] == {"miou": 0.5, "pixel_accuracy": 0.8}
    assert summary["test"]["miou_crf"] == 0.55
    assert summary["model"] == {"config": "synthetic"}
    assert summary["mlflow"] is None
    assert inputs["summary"].metadata["tracked"] is False
    # The spool output exists even unused: a missing output folder fails the upload.
    assert Path(inputs["mlflow_spool"].path).is_dir()
    assert summary["mlflow_spool_uri"] == inputs["mlflow_spool"].uri


def test_register_hands_the_run_to_vitpcm_tracking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    def log_pipeline_run(**kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        return {"run_id": "abc", "version": "3", "promoted": True, "pending": 0}

    fake = types.ModuleType("vitpcm.tracking")
    fake.__spec__ = importlib.machinery.ModuleSpec("vitpcm.tracking", None)
    fake.log_pipeline_run = log_pipeline_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vitpcm.tracking", fake)
    import vitpcm

    monkeypatch.setattr(vitpcm, "tracking", fake, raising=False)

    inputs = _register_inputs(tmp_path)
    register_model.python_func(
        **inputs,
        # KFP's name for an object in its MinIO store; read in place as s3://.
        tfrecords_uri="minio://mlpipeline/v2/artifacts/run-8/convert-data/tfrecords",
        tracking_uri="http://mlflow:5000",
        experiment="exp",
        model_name="vitpcm-voc",
        kfp_run_id="run-8",
    )
    assert calls == [
        {
            "tracking_uri": "http://mlflow:5000",
            "experiment": "exp",
            "model_name": "vitpcm-voc",
            "model_dir": inputs["model"].path,
            "eval_dir": inputs["eval_report"].path,
            "test_dir": inputs["pseudo_masks"].path,
            "kfp_run_id": "run-8",
            "data_dir": "s3://mlpipeline/v2/artifacts/run-8/convert-data/tfrecords",
            "spool_dir": inputs["mlflow_spool"].path,
            "data_uri": "s3://mlpipeline/v2/artifacts/run-8/convert-data/tfrecords",
            "pseudo_masks_uri": inputs["pseudo_masks"].uri,
        }
    ]
    summary = json.loads(Path(inputs["summary"].path).read_text())
    assert summary["mlflow"] == {"run_id": "abc", "version": "3", "promoted": True, "pending": 0}
    assert inputs["summary"].metadata["tracked"] is True


def _closed_port_uri() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


def test_register_fails_the_run_when_mlflow_is_unreachable(
    trained: tuple[dsl.Model, dsl.Metrics], tmp_path: Path
) -> None:
    """MLflow asked for but down: the step fails, the summary says why, the spool stays."""
    model, _ = trained
    inputs = _register_inputs(tmp_path)
    inputs["model"] = model
    uri = _closed_port_uri()
    with pytest.raises(RuntimeError, match=f"MLflow registration at {uri} failed") as failure:
        register_model.python_func(**inputs, tracking_uri=uri, kfp_run_id="run-9")
    spool = Path(inputs["mlflow_spool"].path)
    assert f"the records wait in {spool}" in str(failure.value)
    summary = json.loads(Path(inputs["summary"].path).read_text())
    assert summary["mlflow"]["version"] is None
    assert summary["mlflow"]["pending"] > 0
    assert "not sent" in summary["mlflow_error"]
    assert inputs["summary"].metadata["tracked"] is False
    # The pending records are there to replay: the same count the result reported.
    from vitpcm.tracking.spool import Spool

    assert len(Spool(spool).pending()) == summary["mlflow"]["pending"]


@pytest.mark.slow
def test_a_failed_registration_keeps_the_spool_in_the_artifact_store(
    tmp_path: Path,
    s3_bucket: Any,  # noqa: F811  (fixture)
) -> None:
    """On a cluster the failing step uploads nothing: the spool is copied to its URI."""
    from components.registration import keep_spool, registration_failure

    spool = tmp_path / "spool"
    (spool / "records").mkdir(parents=True)
    (spool / "meta.json").write_text('{"run": 1}')
    (spool / "records" / "000001.json").write_text('{"metric": 2}')
    target = s3_bucket.uri("v2/artifacts/run/register/mlflow_spool")
    # In a child: tensorflow-io's S3 filesystem aborts the process that used it at exit.
    script = (
        "import sys; from components.registration import keep_spool; "
        "from vitpcm import storage; print(keep_spool(sys.argv[1], sys.argv[2])); "
        "sys.stdout.flush(); storage.exit_process(0)"
    )
    uri = "minio://" + target.split("://", 1)[1]
    child = subprocess.run(
        [sys.executable, "-c", script, str(spool), uri],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **s3_bucket.env()},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip() == target
    keys = sorted(s3_bucket.list_keys("v2/artifacts/run/register/mlflow_spool/"))
    assert [k.rsplit("mlflow_spool/", 1)[1] for k in keys] == ["meta.json", "records/000001.json"]
    assert s3_bucket.read(keys[1]) == b'{"metric": 2}'
    # kfp.local: the artifact is the local folder itself.
    assert keep_spool(str(spool), str(spool)) == str(spool)
    assert registration_failure({"version": "4", "pending": 0}) is None
    assert registration_failure({"version": "4", "pending": 2}) == "2 record(s) not sent"
    assert registration_failure(None) == "no result"


_EVALUATE_FROM_S3 = """
import json, sys
from kfp import dsl
from components import evaluate_model
from vitpcm import storage
model, data, out = sys.argv[1:4]
metrics = dsl.Metrics(name="metrics", uri=out + "/metrics", metadata={})
evaluate_model.python_func(
    model=dsl.Model(name="model", uri=model, metadata={}),
    tfrecords_uri=data,
    metrics=metrics,
    class_iou=dsl.Markdown(name="class_iou", uri=out + "/class_iou", metadata={}),
    report=dsl.Artifact(name="report", uri=out + "/report", metadata={}),
)
print(json.dumps(metrics.metadata))
sys.stdout.flush()
storage.exit_process(0)
"""


@pytest.mark.slow
def test_evaluate_reads_its_split_in_place_from_the_object_store(
    trained: tuple[dsl.Model, dsl.Metrics],
    tfrecords: dsl.Dataset,
    tmp_path: Path,
    s3_bucket: Any,  # noqa: F811  (fixture)
) -> None:
    """Only the val split and dataset.json are in the store: evaluate needs nothing else,
    and scores the same as from the local copy."""
    model, _ = trained
    local = Path(tfrecords.path)
    needed = ["dataset.json", *sorted(p.name for p in local.glob("val-*.tfrecord"))]
    assert len(list(local.iterdir())) > len(needed)  # train and test shards stay behind
    for name in needed:
        s3_bucket.put(f"artifacts/tfrecords/{name}", (local / name).read_bytes())
    uri = "minio://" + s3_bucket.uri("artifacts/tfrecords").split("://", 1)[1]
    child = subprocess.run(
        [sys.executable, "-c", _EVALUATE_FROM_S3, model.path, uri, str(tmp_path / "s3")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **s3_bucket.env()},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert child.returncode == 0, child.stderr[-3000:]
    from_s3 = json.loads(child.stdout.strip().splitlines()[-1])
    metrics = artifact(dsl.Metrics, tmp_path / "local", "metrics")
    evaluate_model.python_func(
        model=model,
        tfrecords_uri=tfrecords.uri,
        metrics=metrics,
        class_iou=artifact(dsl.Markdown, tmp_path / "local", "class_iou"),
        report=artifact(dsl.Artifact, tmp_path / "local", "report"),
    )
    assert from_s3 == pytest.approx(metrics.metadata)
    assert from_s3["num_images"] == 8


# ----------------------------------------------------------------------------- pretrained


@pytest.mark.parametrize(
    ("config", "file_name"),
    [
        ("voc12_vit_s16", "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0"),
        ("voc12_vit_b16", "imagenet21k+imagenet2012/ViT-B_16.npz"),
        ("coco14_vit_b16", "imagenet21k+imagenet2012/ViT-B_16.npz"),
    ],
)
def test_paper_configs_start_from_the_official_checkpoint(config: str, file_name: str) -> None:
    from vitpcm.config import load_config
    from vitpcm.run_plan import checkpoint_backbone

    cfg = load_config(config)
    assert cfg.model.pretrained.startswith("https://storage.googleapis.com/vit_models/")
    assert file_name in cfg.model.pretrained
    assert checkpoint_backbone(cfg.model.pretrained) == cfg.model.backbone


def test_pretrained_choice_becomes_an_override() -> None:
    from components.pretrained import pretrained_overrides

    assert pretrained_overrides("") == []
    assert pretrained_overrides(" none ") == ["model.pretrained=null"]
    assert pretrained_overrides("RANDOM") == ["model.pretrained=null"]
    assert pretrained_overrides("s3://w/ViT-B_16.npz") == ["model.pretrained=s3://w/ViT-B_16.npz"]


def test_random_weights_on_a_real_dataset_are_logged_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from components.pretrained import pretrained_overrides, warn_if_random
    from vitpcm.config import load_config

    assert not warn_if_random(load_config("voc12_vit_b16"))
    assert not warn_if_random(load_config("synthetic"))  # random by design, said in its YAML
    assert not caplog.records
    cfg = load_config("voc12_vit_b16", pretrained_overrides("none"))
    assert warn_if_random(cfg)
    (record,) = caplog.records
    assert record.levelname == "ERROR"
    assert "TRAINING vit_b16 FROM RANDOM WEIGHTS on voc12" in record.getMessage()


# ----------------------------------------------------------------------------- kfp.local


def test_run_local_refuses_bad_source_folders(tmp_path: Path) -> None:
    from localrun.run import run_local
    from vitpcm.errors import ConfigError

    with pytest.raises(ConfigError, match="is not a folder"):
        run_local(pipeline_root=tmp_path, dataset="voc12", source_dir=tmp_path / "nope")
    with pytest.raises(ConfigError, match="dataset to coco14 or voc12"):
        run_local(pipeline_root=tmp_path, source_dir=tmp_path)


def test_run_local_cli_reports_errors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from localrun.command import main

    missing = str(tmp_path / "nope")
    assert main(["--root", str(tmp_path), "--dataset", "voc12", "--source-dir", missing]) == 2
    assert (
        capsys.readouterr().err
        == f"error: source_dir {missing} is not a folder; pass a downloaded dataset\n"
    )


@pytest.mark.slow
def test_whole_dag_runs_under_kfp_local(tmp_path: Path) -> None:
    """The single-node pipeline, every step a subprocess, as `make run-local` runs it."""
    from localrun.run import SyntheticData, run_local

    run = run_local(
        pipeline_root=tmp_path / "runs",
        overrides=[*TINY_OVERRIDES, "train.epochs=1", "train.steps_per_epoch=1"],
        synthetic=SyntheticData(train=16, val=8, test=4, size=64),
        epochs=1,
        crf=True,
    )
    for name in ("tfrecords", "model", "eval_report", "pseudo_masks"):
        assert Path(run.artifacts[name]).is_dir(), name
        assert Path(run.artifacts[name]).is_relative_to(tmp_path / "runs")
    model = Path(run.artifacts["model"])
    assert (model / "model.keras").is_file()
    assert "image_size: 64" in (model / "config.yaml").read_text()
    assert run.metrics["train_metrics"]["epochs_run"] == 1
    assert set(run.metrics["eval_metrics"]) >= {"miou", "pixel_accuracy"}
    assert set(run.metrics["test_metrics"]) >= {"miou", "miou_crf"}
    assert run.metrics["eval_metrics"]["num_images"] == 8
    assert "| background |" in Path(run.artifacts["class_iou"]).read_text()
    # The registration step saw the scoring steps' metrics and a resolved run id.
    scores = run.metrics
    assert run.summary["eval"]["miou"] == pytest.approx(scores["eval_metrics"]["miou"])
    assert run.summary["test"]["miou_crf"] == pytest.approx(scores["test_metrics"]["miou_crf"])
    assert run.summary["kfp_run_id"] and "{{" not in run.summary["kfp_run_id"]
    assert run.summary["model_uri"] == run.artifacts["model"]
