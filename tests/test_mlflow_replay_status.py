"""`vitpcm mlflow replay` brings the training's mlflow_run.json up to date.

A training logged while MLflow was down writes ``mlflow_run.json`` with ``run_id: null`` and
its pending count; after a successful replay the file names the run MLflow now holds and
says nothing is pending.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from helpers.mlflow_server import MlflowServer, mlflow_server, s3_server  # noqa: F401
from helpers.tiny import tiny_config
from vitpcm.cli import main
from vitpcm.tracking import RUN_FILE, TrainingTracker, replay_spool
from vitpcm.tracking.sender import SPOOL_TAG
from vitpcm.tracking.spool import Spool


def _closed_port_uri() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _offline_training(out: Path, name: str) -> dict:
    """A two-epoch training's tracking, all of it while MLflow is down."""
    uri = _closed_port_uri()
    cfg = tiny_config(f"mlflow.tracking_uri={uri}", f"mlflow.experiment=test-{name}")
    tracker = TrainingTracker(cfg, str(out), uri, retry_interval_s=0.0)
    tracker.start([])
    for epoch in (1, 2):
        tracker(epoch, {"epoch": epoch, "loss": 1.0 / epoch, "timestamp": 1e12 + epoch})
    info = tracker.finish({"best_epoch": 2, "epochs_run": 2, "miou": 0.5})
    assert info is not None
    return info


@pytest.mark.slow
def test_replay_updates_mlflow_run_json(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "train"
    before = _offline_training(out, "replay-status")
    spool = Spool(out / "mlflow-spool")
    assert before["run_id"] is None and before["pending"] == len(spool.records()) > 0
    assert json.loads((out / RUN_FILE).read_text()) == before

    rc = main(["mlflow", "replay", str(out), "--tracking-uri", mlflow_server.uri, "--no-progress"])
    assert rc == 0
    assert f"sent {before['pending']} pending MLflow record(s)" in capsys.readouterr().out

    after = json.loads((out / RUN_FILE).read_text())
    run = mlflow_server.client().get_run(after["run_id"])
    assert run.data.tags[SPOOL_TAG] == spool.spool_id  # the run this spool created
    assert run.info.status == "FINISHED"
    assert after == {
        **before,
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "tracking_uri": mlflow_server.uri,
        "pending": 0,
    }
    # Every spooled point reached the run, once.
    spooled = sorted(
        (m["key"], m["step"], m["value"])
        for r in spool.records()
        if r.kind == "metrics"
        for m in r.data["metrics"]
    )
    client = mlflow_server.client()
    logged = sorted(
        (key, m.step, m.value)
        for key in {k for k, _, _ in spooled}
        for m in client.get_metric_history(run.info.run_id, key)
    )
    assert logged == spooled and len(spooled) >= 2


def test_replay_leaves_a_run_file_of_another_spool_alone(tmp_path: Path) -> None:
    out = tmp_path / "train"
    spool = Spool(out / "mlflow-spool", tracking_uri="http://127.0.0.1:9")
    foreign = json.dumps({"run_id": None, "pending": 3, "spool_id": "someone-else"})
    (out / RUN_FILE).write_text(foreign)
    assert spool.pending() == []
    assert replay_spool(out, progress=False) == 0  # nothing pending: no server needed
    assert (out / RUN_FILE).read_text() == foreign
