"""MLflow tracking: names, spool, overlays, and a whole tracked run on a real MLflow server."""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.mlflow_server import MlflowServer, mlflow_server, s3_server  # noqa: F401
from helpers.tiny import make_tiny_dataset, tiny_config
from vitpcm.config import Config
from vitpcm.errors import TrackingError
from vitpcm.tracking import (
    CHAMPION_ALIAS,
    RunTracker,
    final_metrics,
    flatten_params,
    kfp_run_url,
    log_pipeline_run,
    plot_sample_overlays,
    promote_if_better,
)
from vitpcm.tracking.figures import overlay_labels, score_pseudo_masks, write_split_figures
from vitpcm.tracking.registry import comparison_text
from vitpcm.tracking.spool import JOURNAL_FILE, Spool, resolve_spool_dir

CLASSES = ["background", "square", "disc", "traffic light"]

# ----------------------------------------------------------------------------- naming


def test_config_becomes_dotted_params() -> None:
    cfg = tiny_config()
    params = flatten_params(cfg.to_dict())
    assert params["train.lr"] == str(cfg.train.lr)
    assert params["model.pretrained"] == "null"
    assert params["train.et.enabled"] == "true"
    assert params["data.augment.hue"] == str(cfg.data.augment.hue)
    assert params["name"] == "synthetic"
    assert all(isinstance(v, str) for v in params.values())


def test_final_metrics_names_split_and_classes() -> None:
    metrics = {
        "miou": 0.5,
        "miou_crf": 0.55,
        "pixel_accuracy": 0.9,
        "class_iou": [0.8, None, 0.2, float("nan")],
        "class_iou_crf": [0.85, 0.1, 0.3, 0.4],
        "class_names": CLASSES,
        "num_images": 3,
    }
    flat = final_metrics(metrics, "test")
    assert flat == {
        "test/miou": 0.5,
        "test/miou_crf": 0.55,
        "test/pixel_accuracy": 0.9,
        "class_iou/background": 0.8,
        "class_iou/disc": 0.2,
        # Undefined IoUs (class absent from ground truth and prediction) are not logged.
        "class_iou_crf/background": 0.85,
        "class_iou_crf/square": 0.1,
        "class_iou_crf/disc": 0.3,
        "class_iou_crf/traffic_light": 0.4,
    }
    assert final_metrics(metrics, "eval", per_class=False) == {
        "eval/miou": 0.5,
        "eval/miou_crf": 0.55,
        "eval/pixel_accuracy": 0.9,
    }


def test_curve_keys_are_grouped_and_links_open_the_training_view() -> None:
    from vitpcm.tracking.naming import curve_key, ui_experiment_url, ui_run_url

    keys = ["loss", "bce", "et", "l2", "train_miou", "val_miou", "val_pixel_accuracy", "lr"]
    assert [curve_key(k) for k in keys] == [
        "train/loss", "train/bce", "train/et", "train/l2", "train/miou", "val/miou",
        "val/pixel_accuracy", "train/lr",
    ]  # fmt: skip
    assert curve_key("train_seconds") == "train/epoch_seconds"
    assert ui_run_url("http://h:5000/", "3", "abc") == (
        "http://h:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    )
    assert ui_experiment_url("http://h", "3") == (
        "http://h/#/experiments/3/runs?workflowType=machine_learning"
    )


def test_champion_comparison_shows_the_difference() -> None:
    assert comparison_text(0.612, 0.58, "val") == "0.6120 > 0.5800 (val, +0.0320)"
    # Three decimals printed "0.081 > 0.081": the digits grow until the gap shows.
    assert comparison_text(0.08127, 0.08122, "val") == "0.08127 > 0.08122 (val, +0.00005)"
    assert comparison_text(0.08125, 0.08124, "val") == "0.08125 > 0.08124 (val, +0.00001)"
    assert comparison_text(0.5, 0.5, "train") == "0.5000 <= 0.5000 (train, +0.0000)"


def test_kfp_run_url_from_base_or_template() -> None:
    assert kfp_run_url("https://kf.example/pipeline/", "abc") == (
        "https://kf.example/pipeline/#/runs/details/abc"
    )
    assert kfp_run_url("https://kf/runs/{run_id}/x", "r1") == "https://kf/runs/r1/x"


# ----------------------------------------------------------------------------- spool


def test_spool_appends_in_order_and_copies_files(tmp_path: Path) -> None:
    source = tmp_path / "plot.png"
    source.write_bytes(b"png bytes")
    spool = Spool(tmp_path / "spool", tracking_uri="http://mlflow:5000")
    first = spool.append("params", {"params": {"a": "1"}})
    second = spool.append("artifact", {"artifact_path": "val"}, files={"file": source})
    source.write_bytes(b"changed later")  # the spool holds its own copy

    records = spool.records()
    assert [r.seq for r in records] == [0, 1]
    assert [r.kind for r in records] == ["params", "artifact"]
    assert first.id != second.id
    assert (spool.path / records[1].data["file"]).read_bytes() == b"png bytes"
    assert records[1].data["file"].endswith("/plot.png")
    assert [r.seq for r in spool.pending()] == [0, 1]

    state = spool.load_state()
    state.acked = 0
    spool.save_state(state)
    assert [r.seq for r in Spool(tmp_path / "spool").pending()] == [1]
    assert Spool(tmp_path / "spool").tracking_uri == "http://mlflow:5000"
    assert resolve_spool_dir(tmp_path / "spool") == tmp_path / "spool"


def test_spool_ignores_and_repairs_a_torn_last_line(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append("tags", {"tags": {"a": "1"}})
    with open(tmp_path / JOURNAL_FILE, "a") as handle:
        handle.write('{"seq": 1, "id": "x", "ki')  # killed mid-write
    assert [r.seq for r in spool.records()] == [0]
    spool.append("tags", {"tags": {"b": "2"}})
    assert [(r.seq, r.data["tags"]) for r in spool.records()] == [(0, {"a": "1"}), (1, {"b": "2"})]


def test_spool_refuses_object_storage_and_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match="local disk"):
        Spool("s3://bucket/run/mlflow-spool")
    with pytest.raises(TrackingError, match="no MLflow spool"):
        resolve_spool_dir(tmp_path)
    with pytest.raises(TrackingError, match="local spool_dir"):
        RunTracker(tiny_config(), "s3://bucket/run")


# ----------------------------------------------------------------------------- overlays


def _sample(seed: int, size: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = np.zeros((size, size), np.uint8)
    gt[4:20, 6:22] = 1 + seed % 3
    gt[0, :] = 255
    return {
        "image": rng.uniform(0, 255, (size, size, 3)).astype(np.float32),
        "ground_truth": gt,
        "bpm": gt[::2, ::2].copy(),  # label maps of another size are resized to the image
        "crf": gt,
        "name": f"img{seed}",
    }


def test_overlay_tints_only_foreground() -> None:
    image = np.full((4, 4, 3), 100, np.uint8)
    label = np.zeros((4, 4), np.uint8)
    label[0, 0] = 1  # VOC colour of class 1 is (128, 0, 0)
    out = overlay_labels(image, label, alpha=0.5)
    assert out[1, 1].tolist() == [100, 100, 100]
    assert out[0, 0].tolist() == [114, 50, 50]


def test_plot_sample_overlays_writes_a_grid(tmp_path: Path) -> None:
    path = tmp_path / "overlays.png"
    samples = [_sample(0), _sample(1)]
    samples[1]["crf"] = None  # missing cells are drawn as n/a
    plot_sample_overlays(samples, CLASSES, path)
    with Image.open(path) as image:
        width, height = image.size
    assert width > 3 * height / 2  # four columns, two rows
    with pytest.raises(ValueError, match="at least one"):
        plot_sample_overlays([], CLASSES, path)
    with pytest.raises(ValueError, match="label map"):
        plot_sample_overlays([{"image": np.zeros((8, 8, 3)), "bpm": np.zeros(8)}], None, path)


def test_split_figures_follow_what_is_known(tmp_path: Path) -> None:
    metrics = {"miou": 0.5, "class_iou": [0.9, 0.1, None, 0.5], "class_iou_crf": [1, 0, 0, 0]}
    names = write_split_figures(
        tmp_path / "test",
        metrics,
        "test",
        stage="test",
        confusion_matrix=np.eye(4, dtype=int),
        confusion_matrix_crf=np.eye(4, dtype=int),
        class_names=CLASSES,
        best=[_sample(2)],
        worst=[_sample(3)],
    )
    assert names == [
        "class_iou_before_after_crf.png",
        "confusion_matrix.png",
        "confusion_matrix_crf.png",
        "metrics.json",
        "overlays_best.png",
        "overlays_worst.png",
    ]
    assert json.loads((tmp_path / "test" / "metrics.json").read_text())["class_iou"][2] is None
    names = write_split_figures(
        tmp_path / "eval", {"class_iou": [0.2, 0.3]}, "val", samples=[_sample(1)]
    )
    assert names == ["class_iou.png", "metrics.json", "sample_overlays.png"]
    assert write_split_figures(tmp_path / "train", {"miou": 0.2}, "train") == ["metrics.json"]


def test_before_after_crf_chart_draws_both_bars_per_class(tmp_path: Path) -> None:
    from vitpcm.tracking.figures import plot_class_iou_before_after_crf

    path = tmp_path / "crf.png"
    plot_class_iou_before_after_crf([0.25, 0.5, None], [0.75, 1.0, 0.5], CLASSES[:3], path)
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours = {tuple(c) for c in rgb.tolist()}
    assert (0x4C, 0x72, 0xB0) in colours and (0xDD, 0x84, 0x52) in colours  # BPM and CRF bars
    # The after-CRF bars are twice as tall in total (0.75 + 1 + 0.5 vs 0.25 + 0.5): more pixels.
    bpm = np.all(rgb == (0x4C, 0x72, 0xB0), axis=1).sum()
    crf = np.all(rgb == (0xDD, 0x84, 0x52), axis=1).sum()
    assert crf == pytest.approx(bpm * 2.25 / 0.75, rel=0.1)
    with pytest.raises(ValueError, match="3 IoUs before the CRF but 2 after"):
        plot_class_iou_before_after_crf([0.1, 0.2, 0.3], [0.1, 0.2], None, path)


# ----------------------------------------------------------------------------- without a server


def test_tracker_without_uri_keeps_everything_in_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config()
    with caplog.at_level(logging.WARNING, "vitpcm.tracking"), RunTracker(cfg, tmp_path) as tracker:
        for epoch in range(3):
            tracker.epoch_callback(epoch, {"loss": 1.0 / (epoch + 1), "epoch": epoch})
        assert tracker.run_id is None
    spool = Spool(tmp_path / "mlflow-spool")
    kinds = [r.kind for r in spool.records()]
    assert kinds[:3] == ["start_run", "params", "artifact"]
    assert kinds.count("metrics") == 3
    assert kinds[-1] == "end_run"
    assert len(spool.pending()) == len(kinds)
    assert "vitpcm mlflow replay" in caplog.text
    epochs = [r.data["metrics"] for r in spool.records() if r.kind == "metrics"]
    assert [m[0]["step"] for m in epochs] == [0, 1, 2]
    assert all(m[0]["key"] == "train/loss" for m in epochs)


# ----------------------------------------------------------------------------- real server


def _run_data(server: MlflowServer, run_id: str) -> tuple[object, list[str]]:
    client = server.client()
    run = client.get_run(run_id)
    paths: list[str] = []
    pending = [""]
    while pending:
        for item in client.list_artifacts(run_id, pending.pop() or None):
            (pending if item.is_dir else paths).append(item.path)
    return run, sorted(paths)


@dataclass(frozen=True)
class TinyTraining:
    cfg: Config
    data: Path
    out: Path
    result: dict
    run_id: str
    spool: Path


@pytest.fixture(scope="module")
def tiny_training(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> TinyTraining:
    """A 2-epoch tiny training run, tracked live through the epoch callback."""
    from vitpcm.train import train

    root = tmp_path_factory.mktemp("tiny-training")
    data = make_tiny_dataset(root / "data", train=8, val=4, test=2)
    cfg = tiny_config("mlflow.experiment=test-full-run", "mlflow.registered_model=test-full-model")
    out = root / "train-out"
    # Beside the output folder: `vitpcm train` writes only into a new or its own folder.
    spool = root / "mlflow-spool"
    with RunTracker(
        cfg,
        out,
        spool_dir=spool,
        tracking_uri=mlflow_server.uri,
        kfp_run_id="kfp-123",
        kfp_ui_url="https://kf.example/pipeline",
    ) as tracker:
        result = train(
            cfg,
            data_uri=str(data),
            out_uri=str(out),
            progress=False,
            callbacks=[tracker.epoch_callback],
            tracking=False,  # tracked here, around the training
        )
        run_id = tracker.run_id
    assert run_id
    return TinyTraining(cfg, data, out, result, run_id, spool)


@pytest.mark.slow
def test_tracked_training_run_logs_everything(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_training: TinyTraining,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow.tensorflow

    from vitpcm.eval import load_model

    cfg, out, result = tiny_training.cfg, tiny_training.out, tiny_training.result
    # A later step of the same job reopens the run from the spool in the output folder.
    with RunTracker(
        cfg, out, spool_dir=tiny_training.spool, tracking_uri=mlflow_server.uri
    ) as tracker:
        assert tracker.run_id == tiny_training.run_id
        matrix = np.array([[50, 5, 0, 0], [4, 30, 0, 0], [1, 0, 9, 0], [0, 0, 0, 0]])
        results = {**result, "class_names": CLASSES, "class_iou": [0.8, 0.6, 0.9, None]}
        results["miou_crf"] = 0.7
        flat = tracker.log_results(
            results, "val", confusion_matrix=matrix, samples=[_sample(0), _sample(1)]
        )
        model = load_model(str(out))
        logged = tracker.log_model(model, miou=result["miou"], split="val")
        run_id = tracker.run_id
    assert tracker.spool is None and run_id

    run, artifacts = _run_data(mlflow_server, run_id)
    client = mlflow_server.client()
    # tags, with the link back to the Kubeflow run
    assert run.data.tags["dataset"] == "synthetic"
    assert run.data.tags["backbone"] == "custom"
    assert run.data.tags["kfp.run_id"] == "kfp-123"
    assert run.data.tags["kfp.run_url"] == "https://kf.example/pipeline/#/runs/details/kfp-123"
    assert "kfp-123" in run.data.tags["mlflow.note.content"]
    assert "config **synthetic**" in run.data.tags["mlflow.note.content"]
    assert run.data.tags["mlflow.source.name"] == "vitpcm"
    assert run.data.tags["eval.split"] == "val"
    assert run.data.tags["vitpcm.version"]
    assert run.data.tags["promoted"] == "true"
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "test-full-run"
    # the resolved config as dotted params
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.params["model.hidden_dim"] == "32"
    assert run.data.params["data.dataset"] == "synthetic"
    # per-epoch curves, one point per epoch (step = epoch number, from 1)
    for key in ("train/loss", "train/bce", "train/et", "train/l2", "train/miou", "val/miou"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [1, 2], key
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/lr")) == [1, 2]
    assert not {"epoch", "timestamp", "loss", "val_miou"} & set(run.data.metrics)
    # final metrics
    assert math.isclose(run.data.metrics["eval/miou"], result["miou"])
    assert run.data.metrics["eval/miou_crf"] == 0.7
    assert run.data.metrics["class_iou/square"] == 0.6
    assert "class_iou/traffic_light" not in run.data.metrics
    assert set(flat) <= set(run.data.metrics)
    # artifacts: plots, overlays, config, metrics.json
    for expected in (
        "config.yaml",
        "metrics.json",
        "eval/class_iou.png",
        "eval/confusion_matrix.png",
        "eval/sample_overlays.png",
        "eval/metrics.json",
    ):
        assert expected in artifacts, artifacts
    local = Path(client.download_artifacts(run_id, "metrics.json", str(tmp_path)))
    assert json.loads(local.read_text())["eval"]["miou_crf"] == 0.7
    png = Path(client.download_artifacts(run_id, "eval/sample_overlays.png", str(tmp_path)))
    assert png.read_bytes().startswith(b"\x89PNG")
    # the model: logged, registered, champion (first version), loadable with its signature
    assert not logged.pending
    assert logged.model_name == "test-full-model"
    assert logged.decision is not None and logged.decision.promoted
    version = client.get_model_version("test-full-model", logged.version)
    assert version.run_id == run_id
    assert version.tags["miou_split"] == "val"
    champion = client.get_model_version_by_alias("test-full-model", CHAMPION_ALIAS)
    assert champion.version == logged.version
    logged_model = client.get_logged_model(logged.model_id)
    assert logged_model.source_run_id == run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # for models:/ URIs
    loaded = mlflow.tensorflow.load_model(f"models:/test-full-model@{CHAMPION_ALIAS}")
    images = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    outputs = loaded(images)
    assert outputs["class_probs"].shape == (1, cfg.data.num_classes)
    np.testing.assert_allclose(
        outputs["class_probs"], model(images)["class_probs"], rtol=1e-5, atol=1e-6
    )
    signature = mlflow.models.get_model_info(f"models:/{logged.model_id}").signature
    # the served (pyfunc) signature: base64 images in, masks and class scores out
    assert [s.name for s in signature.inputs.inputs] == ["image"]
    assert [s.name for s in signature.outputs.inputs] == ["mask", "height", "width", "classes"]
    # nothing left in the spool
    assert Spool(tiny_training.spool).pending() == []


@pytest.mark.slow
def test_pipeline_run_logged_from_step_outputs_and_gated(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_training: TinyTraining,
    tmp_path: Path,
) -> None:
    from vitpcm.eval import run_eval
    from vitpcm.infer import run_test

    cfg, data = tiny_training.cfg, tiny_training.data
    # A training that was not tracked (no spool to continue): the run is created here.
    out = tmp_path / "train"
    shutil.copytree(tiny_training.out, out, ignore=shutil.ignore_patterns("mlflow-spool"))
    eval_dir, test_dir = tmp_path / "eval", tmp_path / "test"
    run_eval(cfg, str(out), data_uri=str(data), out_dir=str(eval_dir), progress=False)
    run_test(cfg, str(out), data_uri=str(data), out_dir=str(test_dir), crf=True, progress=False)
    common = {
        "tracking_uri": mlflow_server.uri,
        "model_dir": out,
        "test_dir": test_dir,
        "experiment": "test-pipeline-run",
        "model_name": "test-pipeline-model",
        "kfp_ui_url": "https://kf.example/pipeline",
        "data_dir": data,
    }
    first = log_pipeline_run(
        eval_dir=eval_dir, kfp_run_id="kfp-1", spool_dir=tmp_path / "spool-1", **common
    )
    assert first["pending"] == 0 and first["promoted"] is True and not first["continued"]
    assert first["split"] == "val" and first["version"] == "1"

    run, artifacts = _run_data(mlflow_server, first["run_id"])
    client = mlflow_server.client()
    assert run.data.tags["kfp.run_id"] == "kfp-1"
    steps = client.get_metric_history(first["run_id"], "train/loss")
    assert sorted(m.step for m in steps) == [1, 2]
    assert math.isclose(run.data.metrics["eval/miou"], first["miou"])
    tested = json.loads((test_dir / "metrics.json").read_text())
    assert tested["split"] == "test"  # held out: not the evaluation's val
    assert math.isclose(run.data.metrics["test/miou"], tested["miou"])
    assert math.isclose(run.data.metrics["test/miou_crf"], tested["miou_crf"])
    assert (run.data.tags["eval.split"], run.data.tags["test.split"]) == ("val", "test")
    # The confusion matrices read back from the PNGs give the test step's own scores, and
    # the best and worst overlays are the extremes of the per-image mIoU.
    from vitpcm.metrics import metrics_from_matrix

    scores = score_pseudo_masks(data, "test", test_dir, cfg.data.num_classes, count=1)
    assert metrics_from_matrix(scores.confusion_bpm)["miou"] == pytest.approx(tested["miou"])
    assert metrics_from_matrix(scores.confusion_crf)["miou"] == pytest.approx(tested["miou_crf"])
    ranked = sorted(score for _name, score in scores.per_image)
    assert (scores.best[0]["miou"], scores.worst[0]["miou"]) == (ranked[-1], ranked[0])
    assert scores.best[0]["image"].shape[-1] == 3
    assert run.data.metrics["best/epoch"] == tiny_training.result["best_epoch"]
    assert math.isclose(run.data.metrics["best/val_miou"], tiny_training.result["miou"])
    for expected in (
        "eval/confusion_matrix.png",
        "test/confusion_matrix.png",
        "test/confusion_matrix_crf.png",
        "test/class_iou_before_after_crf.png",
        "test/overlays_best.png",
        "test/overlays_worst.png",
        "history.json",
    ):
        assert expected in artifacts, artifacts
    assert any(a.startswith("tensorboard/") for a in artifacts), artifacts
    pngs = sorted(p.name for p in (test_dir / "pseudo_masks").glob("*.png"))
    assert [a for a in artifacts if a.startswith("test/pseudo_masks_sample/pseudo_masks/")] == [
        f"test/pseudo_masks_sample/pseudo_masks/{name}" for name in pngs[:8]
    ]
    assert run.data.tags["pseudo_masks.uri"] == str(test_dir)
    # The description names what ran and what it scored; the inputs name the splits.
    note = run.data.tags["mlflow.note.content"]
    assert f"test BPM mIoU {tested['miou']:.3f}" in note and "test-pipeline-model" in note
    assert run.data.tags["mlflow.source.name"] == "vitpcm pipeline"
    inputs = {
        (d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"])
        for d in run.inputs.dataset_inputs
    }
    assert inputs == {
        ("synthetic-train", "training"),
        ("synthetic-val", "validation"),
        ("synthetic-test", "test"),
    }

    # The next scheduled run scores lower: registered, but the champion stays.
    worse_eval = tmp_path / "eval-worse"
    shutil.copytree(eval_dir, worse_eval)
    metrics = json.loads((worse_eval / "metrics.json").read_text())
    metrics["miou"] = first["miou"] - 0.05
    (worse_eval / "metrics.json").write_text(json.dumps(metrics))
    second = log_pipeline_run(
        eval_dir=worse_eval, kfp_run_id="kfp-2", spool_dir=tmp_path / "spool-2", **common
    )
    assert second["version"] == "2" and second["promoted"] is False
    assert " <= " in second["champion_comparison"] and ", -0.0500)" in second["champion_comparison"]
    assert second["run_id"] != first["run_id"]
    champion = client.get_model_version_by_alias("test-pipeline-model", CHAMPION_ALIAS)
    assert champion.version == "1"
    assert client.get_model_version("test-pipeline-model", "2").tags["promoted"] == "false"


def _new_version(client: object, name: str, experiment_id: str) -> str:
    model = client.create_logged_model(experiment_id, name="gate-test")
    source = f"models:/{model.model_id}"
    return client.create_model_version(name, source=source, model_id=model.model_id).version


@pytest.mark.slow
def test_champion_gate_promotes_only_a_better_model(
    mlflow_server: MlflowServer,  # noqa: F811
) -> None:
    client = mlflow_server.client()
    name = "test-gate-model"
    experiment_id = client.create_experiment("test-gate")
    client.create_registered_model(name)

    v1 = _new_version(client, name, experiment_id)
    first = promote_if_better(client, name, v1, 0.58, "val")
    assert first.promoted and first.previous_version is None
    assert client.get_model_version_by_alias(name, CHAMPION_ALIAS).version == v1

    v2 = _new_version(client, name, experiment_id)
    better = promote_if_better(client, name, v2, 0.612, "val")
    assert better.promoted
    assert better.comparison == "0.6120 > 0.5800 (val, +0.0320)"
    tags = client.get_model_version(name, v2).tags
    assert tags["champion_comparison"] == "0.6120 > 0.5800 (val, +0.0320)"
    assert tags["promoted"] == "true"
    assert tags["previous_champion"] == v1
    assert tags["miou"].startswith("0.612")

    v3 = _new_version(client, name, experiment_id)
    worse = promote_if_better(client, name, v3, 0.6, "val")
    assert not worse.promoted
    assert worse.previous_version == v2 and worse.previous_miou == pytest.approx(0.612)
    assert client.get_model_version(name, v3).tags["promoted"] == "false"
    assert client.get_model_version(name, v3).tags["champion_comparison"] == (
        "0.6000 <= 0.6120 (val, -0.0120)"
    )

    tie = promote_if_better(client, name, _new_version(client, name, experiment_id), 0.612, "val")
    assert not tie.promoted
    other_split = promote_if_better(
        client, name, _new_version(client, name, experiment_id), 0.9, "train"
    )
    assert not other_split.promoted
    assert "not comparable" in other_split.comparison

    again = promote_if_better(client, name, v2, 0.612, "val")  # a replay: no change
    assert again.promoted
    assert client.get_model_version_by_alias(name, CHAMPION_ALIAS).version == v2
