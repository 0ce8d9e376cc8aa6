"""MLflow outages: nothing lost, nothing logged twice, training never waits long."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import pytest
import requests
from mlflow.exceptions import MlflowException

from helpers.mlflow_server import MlflowServer, mlflow_server, s3_server  # noqa: F401
from helpers.tiny import tiny_config
from vitpcm.errors import TrackingError
from vitpcm.tracking import RunTracker, replay_spool
from vitpcm.tracking.sender import SPOOL_TAG, client_timeouts, is_transient
from vitpcm.tracking.spool import STATE_FILE, Spool


def _closed_port_uri() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


def _outage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " is unreachable (" in r.getMessage()]


def _log_epochs(tracker: RunTracker, epochs: range) -> None:
    for epoch in epochs:
        tracker.epoch_callback(
            epoch, {"loss": 1.0 / (epoch + 1), "val_miou": 0.1 * epoch, "lr": 1e-3, "epoch": epoch}
        )


# ----------------------------------------------------------------------------- no server needed


def test_error_classes() -> None:
    from mlflow.exceptions import RestException
    from mlflow.protos import databricks_pb2 as codes

    assert is_transient(requests.ConnectionError("refused"))
    assert is_transient(requests.Timeout("slow"))
    assert is_transient(ConnectionResetError())
    assert is_transient(MlflowException("API request failed", error_code=codes.INTERNAL_ERROR))
    assert is_transient(MlflowException("down", error_code=codes.TEMPORARILY_UNAVAILABLE))
    assert is_transient(RestException({"error_code": "PERMISSION_DENIED", "message": "token"}))
    assert not is_transient(MlflowException.invalid_parameter_value("changed param"))
    assert not is_transient(
        RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"})
    )
    assert not is_transient(FileNotFoundError("spool file"))


def test_client_timeouts_are_short_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    with client_timeouts(15):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"  # the user's longer value wins
    with client_timeouts(900):
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "900"  # uploads get long
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"


def test_unreachable_server_costs_seconds_and_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri = _closed_port_uri()
    started = time.monotonic()
    caplog.set_level(logging.INFO, "vitpcm.tracking")
    # retry_interval_s=0: every epoch tries again, the worst case for the training loop.
    with RunTracker(tiny_config(), tmp_path, tracking_uri=uri, retry_interval_s=0) as tracker:
        _log_epochs(tracker, range(5))
        tracker.set_tags({"note": "offline"})
        assert tracker.run_id is None
    assert time.monotonic() - started < 20
    assert len(_outage_warnings(caplog)) == 1, caplog.text
    assert f"vitpcm mlflow replay {tmp_path / 'mlflow-spool'}" in caplog.text
    spool = Spool(tmp_path / "mlflow-spool")
    assert len(spool.pending()) == len(spool.records())
    assert spool.tracking_uri == uri


def test_hanging_server_costs_one_probe_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "vitpcm.tracking")
    with socket.socket() as hung:  # accepts connections (backlog) but never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
        started = time.monotonic()
        with RunTracker(tiny_config(), tmp_path, tracking_uri=uri) as tracker:
            _log_epochs(tracker, range(4))  # within the retry interval: no new attempt
            assert time.monotonic() - started < 8
        # start + end of run: two probes of 3 s each, whatever the number of records
        assert time.monotonic() - started < 12
    assert len(_outage_warnings(caplog)) == 1
    assert "ReadTimeout" in _outage_warnings(caplog)[0]


def test_replay_errors_name_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingError, match="no MLflow spool"):
        replay_spool(tmp_path)
    with RunTracker(tiny_config(), tmp_path) as tracker:  # no URI: spool only
        _log_epochs(tracker, range(2))
    with pytest.raises(TrackingError, match="--tracking-uri"):
        replay_spool(tmp_path)
    with pytest.raises(TrackingError, match=r"still pending: run the replay again"):
        replay_spool(tmp_path, tracking_uri=_closed_port_uri(), progress=False)
    assert (
        len(Spool(tmp_path / "mlflow-spool").pending()) == 6
    )  # start, params, config, 2x epoch, end


# ----------------------------------------------------------------------------- real server


def _metric_steps(server: MlflowServer, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in server.client().get_metric_history(run_id, key))


def _artifact_paths(server: MlflowServer, run_id: str, folder: str | None = None) -> list[str]:
    return sorted(a.path for a in server.client().list_artifacts(run_id, folder))


@pytest.mark.slow
def test_server_killed_mid_run_loses_nothing(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = tiny_config("mlflow.experiment=test-outage")
    caplog.set_level(logging.INFO, "vitpcm.tracking")
    with RunTracker(cfg, tmp_path, tracking_uri=mlflow_server.uri) as tracker:
        _log_epochs(tracker, range(2))
        run_id = tracker.run_id
        assert run_id is not None and tracker.pending == 0
        assert _metric_steps(mlflow_server, run_id, "train/loss") == [0, 1]

        with mlflow_server.outage():  # SIGKILL, like a crashed pod
            started = time.monotonic()
            _log_epochs(tracker, range(2, 5))
            tracker.log_results(
                {"miou": 0.5, "class_iou": [0.9, 0.1] + [None] * 4, "pixel_accuracy": 0.8},
                "val",
            )
            tracker.set_tags({"phase": "during outage"})
            training_cost = time.monotonic() - started
            pending_during = tracker.pending
        assert training_cost < 15
        assert pending_during >= 5
        assert len(_outage_warnings(caplog)) == 1

        # The next epoch after the restart sends the backlog first, in order.
        tracker.flush(force=True)
        assert tracker.pending == 0
        assert "reachable again" in caplog.text
        _log_epochs(tracker, range(5, 6))

    client = mlflow_server.client()
    run = client.get_run(run_id)
    for key in ("train/loss", "val/miou", "train/lr"):
        assert _metric_steps(mlflow_server, run_id, key) == [0, 1, 2, 3, 4, 5], key
    assert run.data.metrics["eval/miou"] == 0.5
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.tags["phase"] == "during outage"
    assert run.info.status == "FINISHED"
    assert "eval/class_iou.png" in _artifact_paths(mlflow_server, run_id, "eval")
    assert {"config.yaml", "metrics.json", "eval"} <= set(_artifact_paths(mlflow_server, run_id))
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.slow
def test_offline_run_replayed_later_and_resumed_in_the_same_run(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    cfg = tiny_config("mlflow.experiment=test-replay")
    with RunTracker(cfg, tmp_path, tracking_uri=_closed_port_uri()) as tracker:
        _log_epochs(tracker, range(3))
    spool_dir = tmp_path / "mlflow-spool"
    total = len(Spool(spool_dir).records())

    assert replay_spool(tmp_path, tracking_uri=mlflow_server.uri, progress=False) == total
    assert replay_spool(spool_dir, tracking_uri=mlflow_server.uri, progress=False) == 0
    run_id = Spool(spool_dir).load_state().run_id
    run = mlflow_server.client().get_run(run_id)
    assert run.data.tags[SPOOL_TAG] == Spool(spool_dir).spool_id
    assert _metric_steps(mlflow_server, run_id, "train/loss") == [0, 1, 2]
    # Timestamps are those of the epochs, not of the replay.
    history = mlflow_server.client().get_metric_history(run_id, "train/loss")
    assert max(m.timestamp for m in history) <= Spool(spool_dir).records()[-1].time

    # A restarted job with the same output folder continues the same MLflow run.
    with RunTracker(cfg, tmp_path, tracking_uri=mlflow_server.uri) as tracker:
        assert tracker.run_id == run_id
        _log_epochs(tracker, range(3, 5))
    assert _metric_steps(mlflow_server, run_id, "train/loss") == [0, 1, 2, 3, 4]
    assert mlflow_server.client().get_run(run_id).info.status == "FINISHED"

    # A replay goes to the server holding the run; another one is refused.
    Spool(spool_dir).append("tags", {"tags": {"late": "yes"}})
    with pytest.raises(TrackingError, match="replay it there"):
        replay_spool(tmp_path, tracking_uri=_closed_port_uri(), progress=False)
    assert replay_spool(tmp_path, progress=False) == 1
    assert mlflow_server.client().get_run(run_id).data.tags["late"] == "yes"


@pytest.mark.slow
def test_refused_record_is_skipped_and_the_rest_goes_on(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = tiny_config("mlflow.experiment=test-refused")
    with RunTracker(cfg, tmp_path, tracking_uri=mlflow_server.uri) as tracker:
        _log_epochs(tracker, range(1))
        run_id = tracker.run_id
    # Resumed with another learning rate: MLflow refuses to change a logged param.
    changed = tiny_config("mlflow.experiment=test-refused", "train.lr=0.5")
    caplog.set_level(logging.WARNING, "vitpcm.tracking")
    with RunTracker(changed, tmp_path, tracking_uri=mlflow_server.uri) as tracker:
        _log_epochs(tracker, range(1, 3))
        assert tracker.pending == 0
    state = Spool(tmp_path / "mlflow-spool").load_state()
    assert len(state.rejected) == 1
    assert "MLflow refused params record" in caplog.text
    assert _metric_steps(mlflow_server, run_id, "train/loss") == [0, 1, 2]
    assert mlflow_server.client().get_run(run_id).data.params["train.lr"] == str(cfg.train.lr)


@pytest.mark.slow
def test_lost_acknowledgements_do_not_duplicate_anything(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    from vitpcm.model.vitpcm import build_vitpcm

    cfg = tiny_config(
        "mlflow.experiment=test-lost-ack", "mlflow.registered_model=test-lost-ack-model"
    )
    model = build_vitpcm(cfg.model, cfg.data.num_classes)
    with RunTracker(cfg, tmp_path, tracking_uri=mlflow_server.uri) as tracker:
        _log_epochs(tracker, range(3))
        logged = tracker.log_model(model, miou=0.4, split="val")
        run_id = tracker.run_id
    assert not logged.pending and logged.decision is not None and logged.decision.promoted
    client = mlflow_server.client()
    experiment_id = client.get_run(run_id).info.experiment_id

    # Simulate a crash after every send but before any acknowledgement was written.
    (tmp_path / "mlflow-spool" / STATE_FILE).unlink()
    spool = Spool(tmp_path / "mlflow-spool")
    assert replay_spool(tmp_path, tracking_uri=mlflow_server.uri, progress=False) == len(
        spool.records()
    )

    assert [r.info.run_id for r in client.search_runs([experiment_id])] == [run_id]
    assert spool.load_state().run_id == run_id
    assert _metric_steps(mlflow_server, run_id, "train/loss") == [0, 1, 2]
    versions = client.search_model_versions("name = 'test-lost-ack-model'")
    assert [v.version for v in versions] == [logged.version]
    models = client.search_logged_models(experiment_ids=[experiment_id])
    assert [m.model_id for m in models] == [logged.model_id]
    assert client.get_model_version_by_alias("test-lost-ack-model", "champion").version == (
        logged.version
    )
