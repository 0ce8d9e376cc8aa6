"""``vitpcm train`` logging to MLflow live: one run per pipeline run, outages lose nothing."""

from __future__ import annotations

import json
import logging
import shutil
import socket
from pathlib import Path

import pytest

from helpers.mlflow_server import MlflowServer, mlflow_server, s3_server  # noqa: F401
from helpers.s3_server import s3_bucket  # noqa: F401  (fixture, by name)
from helpers.tiny import make_tiny_dataset, tiny_config
from vitpcm.tracking import RUN_FILE, TrainingTracker, log_pipeline_run, replay_spool
from vitpcm.tracking.pipeline_run import _continue_training_spool
from vitpcm.tracking.spool import JOURNAL_FILE, Spool

CURVES = ("train/loss", "train/bce", "train/et", "train/l2", "train/miou", "val/miou", "train/lr")


def _closed_port_uri() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"), train=8, val=4, test=2)


def _points(server: MlflowServer, run_id: str, key: str) -> list[int]:
    """Steps of every point of a metric, duplicates included."""
    return sorted(m.step for m in server.client().get_metric_history(run_id, key))


def _tracked_config(uri: str, name: str) -> object:
    return tiny_config(
        f"mlflow.tracking_uri={uri}",
        f"mlflow.experiment=test-{name}",
        f"mlflow.registered_model=test-{name}-model",
        "eval.train_miou_images=4",
    )


# ----------------------------------------------------------------------------- no server


def _epoch(epoch: int) -> dict[str, float]:
    return {"epoch": epoch, "loss": 1.0 / epoch, "val_miou": 0.1 * epoch, "timestamp": 1e12 + epoch}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_spool_mirrored_to_object_storage_and_fetched_on_another_machine(
    where: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    # A spool outside <out>/mlflow-spool is mirrored there: on the object store (moto over
    # HTTP, through vitpcm.storage as in a pod) and in a local folder.
    uri = _closed_port_uri()
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        out = bucket.uri("out")

        def stored(name: str) -> bytes:
            return bucket.read(f"out/{name}")
    else:
        out = str(tmp_path / "out")

        def stored(name: str) -> bytes:
            return (tmp_path / "out" / name).read_bytes()

    cfg = _tracked_config(uri, f"mirror-{where}")
    first = TrainingTracker(cfg, out, uri, spool_dir=tmp_path / "machine-1")
    first.start([])
    first(1, _epoch(1))
    first(2, _epoch(2))
    first.close("KILLED")  # the pod is preempted
    journal = f"mlflow-spool/{JOURNAL_FILE}"
    assert stored(journal) == (tmp_path / "machine-1" / JOURNAL_FILE).read_bytes()

    # The job restarts elsewhere; its history has epoch 3, which the spool missed (killed
    # between the checkpoint and the record): it is logged before anything else.
    caplog.set_level(logging.INFO, "vitpcm.tracking")
    second = TrainingTracker(cfg, out, uri, spool_dir=tmp_path / "machine-2")
    second.start([_epoch(1), _epoch(2), _epoch(3)])
    assert "logging 1 epoch(s) the MLflow spool missed" in caplog.text
    info = second.finish({"best_epoch": 3, "epochs_run": 3, "miou": 0.3, "train_miou": 0.4})
    spool = Spool(tmp_path / "machine-2")
    assert spool.spool_id == Spool(tmp_path / "machine-1").spool_id  # the same MLflow run
    losses = [
        (m["step"], m["timestamp"])
        for r in spool.records()
        if r.kind == "metrics"
        for m in r.data["metrics"]
        if m["key"] == "train/loss"
    ]
    assert losses == [(1, 1e12 + 1), (2, 1e12 + 2), (3, 1e12 + 3)]  # the epochs' own times
    summary = [r for r in spool.records() if r.kind == "metrics"][-1].data["metrics"]
    assert {m["key"]: m["value"] for m in summary} == {
        "best/epoch": 3,
        "best/epochs_run": 3,
        "best/val_miou": 0.3,
        "best/train_miou": 0.4,
    }
    # At the last epoch's time: logged again by a re-run, MLflow keeps the points once.
    assert {m["timestamp"] for m in summary} == {1e12 + 3}
    assert info is not None and info["run_id"] is None and info["pending"] == len(spool.records())
    assert json.loads(stored("mlflow_run.json")) == info
    assert stored(journal) == (tmp_path / "machine-2" / JOURNAL_FILE).read_bytes()

    # The register step gets the model folder (without the spool) and continues the spool
    # that mlflow_run.json names, read from where the training mirrored it.
    model = tmp_path / "model"
    model.mkdir()
    (model / RUN_FILE).write_bytes(stored(RUN_FILE))
    continued, _ = _continue_training_spool(model, tmp_path / "register", uri)
    assert continued
    assert (tmp_path / "register" / JOURNAL_FILE).read_bytes() == stored(journal)


# ----------------------------------------------------------------------------- real server


@pytest.mark.slow
def test_training_logs_each_epoch_live_and_register_continues_its_run(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_data: Path,
    tmp_path: Path,
) -> None:
    from vitpcm.train import train

    cfg = _tracked_config(mlflow_server.uri, "train-live")
    out = tmp_path / "train"
    seen_live: dict[str, list[int]] = {}

    def check_previous_epoch_is_in_mlflow(epoch: int, logs: dict) -> None:
        if epoch == 2:  # epoch 1 went to MLflow when it ended, not at the end of training
            run_id = Spool(out / "mlflow-spool").load_state().run_id
            seen_live.update({key: _points(mlflow_server, run_id, key) for key in CURVES})

    result = train(
        cfg,
        data_uri=str(tiny_data),
        out_uri=str(out),
        progress=False,
        callbacks=[check_previous_epoch_is_in_mlflow],
    )
    assert seen_live == {key: [1] for key in CURVES}
    run_info = result["mlflow"]
    run_id = run_info["run_id"]
    assert run_info["pending"] == 0 and run_info["experiment"] == "test-train-live"
    assert json.loads((out / "mlflow_run.json").read_text()) == run_info
    client = mlflow_server.client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["eval.train_miou_images"] == "4"
    for key in CURVES:
        assert _points(mlflow_server, run_id, key) == [1, 2], key
    history = client.get_metric_history(run_id, "train/miou")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [h["train_miou"] for h in json.loads((out / "history.json").read_text())]
    )
    assert run.data.metrics["best/epoch"] == result["best_epoch"] >= 1  # counted from 1
    assert run.data.metrics["best/val_miou"] == pytest.approx(result["miou"])
    # The training's own files: history.json and the TensorBoard event files.
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"history.json", "tensorboard"} <= artifacts
    board = {a.path for a in client.list_artifacts(run_id, "tensorboard")}
    local_board = {f"tensorboard/{p.name}" for p in (out / "tensorboard").iterdir()}
    assert board == local_board

    # The register step continues the same run: results, model and tags are added, and
    # nothing of the training is sent again.
    logged = log_pipeline_run(
        tracking_uri=mlflow_server.uri,
        model_dir=out,
        spool_dir=tmp_path / "register-spool",
        kfp_run_id="kfp-live",
        kfp_ui_url="https://kf.example/pipeline",
        experiment="ignored-when-continuing",
    )
    assert logged["continued"] and logged["run_id"] == run_id and logged["pending"] == 0
    assert logged["experiment"] == "test-train-live" and logged["promoted"] is True
    run = client.get_run(run_id)
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]
    for key in (*CURVES, "best/epoch", "best/epochs_run"):
        expected = [0] if key.startswith("best/") else [1, 2]
        assert _points(mlflow_server, run_id, key) == expected, key
    # No evaluation or test step here: the best epoch stands for the model.
    assert run.data.metrics["best/val_miou"] == pytest.approx(result["miou"])
    assert len(client.list_artifacts(run_id, "tensorboard")) == len(board)  # not logged twice
    assert run.data.tags["kfp.run_id"] == "kfp-live"
    assert run.data.tags["promoted"] == "true"
    assert run.info.status == "FINISHED"
    version = client.get_model_version("test-train-live-model", logged["version"])
    assert version.run_id == run_id


@pytest.mark.slow
def test_training_offline_then_register_sends_everything_once(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_data: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from vitpcm.train import train

    caplog.set_level(logging.WARNING, "vitpcm.tracking")
    cfg = _tracked_config(_closed_port_uri(), "train-offline")  # MLflow down all along
    out = tmp_path / "train"
    result = train(cfg, data_uri=str(tiny_data), out_uri=str(out), progress=False)
    assert result["finished"] and result["epochs_run"] == 2
    spool = Spool(out / "mlflow-spool")
    assert result["mlflow"]["run_id"] is None
    assert result["mlflow"]["pending"] == len(spool.records()) == len(spool.pending())
    assert "vitpcm mlflow replay" in caplog.text

    # The register step gets the model folder without the spool (as from an s3:// training
    # output): it reads the spool where mlflow_run.json says the training wrote it.
    model_dir = tmp_path / "model-artifact"
    model_dir.mkdir()
    for name in ("model.keras", "config.yaml", "metrics.json", "history.json", RUN_FILE):
        shutil.copy(out / name, model_dir / name)
    # The register step reaches MLflow: the training's records go first, then its own.
    logged = log_pipeline_run(
        tracking_uri=mlflow_server.uri, model_dir=model_dir, spool_dir=tmp_path / "register-spool"
    )
    assert logged["continued"] and logged["pending"] == 0
    run_id = logged["run_id"]
    client = mlflow_server.client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert logged["experiment"] == "test-train-offline"
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]
    for key in CURVES:
        assert _points(mlflow_server, run_id, key) == [1, 2], key
    assert _points(mlflow_server, run_id, "best/epoch") == [0]
    assert run.data.metrics["best/epoch"] == result["best_epoch"]
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert "config.yaml" in {a.path for a in client.list_artifacts(run_id)}
    # Nothing is left to replay, and replaying again sends nothing twice.
    assert replay_spool(tmp_path / "register-spool", progress=False) == 0
    assert _points(mlflow_server, run_id, "train/loss") == [1, 2]
    assert run.data.tags["vitpcm.spool_id"] == spool.spool_id  # the training's own run
