"""Training: a few real steps and resumption after a kill (multi-worker: test_multi_worker.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.tiny import TINY_OVERRIDES, make_tiny_dataset, tiny_config
from vitpcm.errors import ConfigError, DataError
from vitpcm.train import train
from vitpcm.training_loop import schedule


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitpcm", *args]


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    sets = [item for kv in (*TINY_OVERRIDES, *extra) for item in ("--set", kv)]
    return _cli("train", "-c", "synthetic", "--data", str(data), "--out", str(out),
                "--no-progress", *sets)  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.update(TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


def test_schedule_warmup_then_finetune() -> None:
    cfg = tiny_config("train.warmup_epochs=1", "train.epochs=3", "train.unfreeze_blocks=1")
    warm, fine = schedule(cfg)
    assert (warm.name, warm.first_epoch, warm.end_epoch, warm.unfreeze_blocks) == (
        "warmup",
        0,
        1,
        0,
    )
    assert warm.lr == cfg.train.warmup_lr
    assert (fine.first_epoch, fine.end_epoch, fine.unfreeze_blocks) == (1, 4, 1)
    assert fine.lr == cfg.train.lr


def test_train_writes_outputs_and_metrics(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config("train.warmup_epochs=1", "train.epochs=1")
    seen: list[tuple[int, dict]] = []
    result = train(
        cfg,
        data_uri=str(tiny_data),
        out_uri=str(tmp_path / "run"),
        progress=False,
        callbacks=[lambda epoch, logs: seen.append((epoch, logs))],
    )
    run = tmp_path / "run"
    for name in ("model.keras", "config.yaml", "metrics.json", "history.json", "state.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["miou"] <= 1.0
    assert len(metrics["class_iou"]) == 6
    assert metrics["best_epoch"] in (1, 2) and metrics["epochs_run"] == 2  # counted from 1
    assert (metrics["strategy"], metrics["replicas"], metrics["workers"]) == (
        "MirroredStrategy",
        1,
        1,
    )
    assert result["miou"] == pytest.approx(metrics["miou"])
    # One callback per epoch (numbered from 1), with every loss term and both mIoUs.
    assert [epoch for epoch, _ in seen] == [1, 2]
    for epoch, logs in seen:
        assert {"loss", "bce", "et", "l2", "train_miou", "val_miou", "lr"} <= set(logs)
        assert logs["epoch"] == epoch
        assert logs["et"] > 0  # the ET loss is on in the synthetic config
        assert 0.0 <= logs["train_miou"] <= 1.0
    assert seen[0][1]["lr"] == cfg.train.warmup_lr and seen[1][1]["lr"] == cfg.train.lr
    # The validation mIoU of the best epoch is the one reported, with its training mIoU.
    best = max(seen, key=lambda item: item[1]["val_miou"])
    assert metrics["best_epoch"] == best[0]
    assert metrics["miou"] == pytest.approx(best[1]["val_miou"])
    assert metrics["train_miou"] == pytest.approx(best[1]["train_miou"])
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    # No tracking URI: no MLflow at all.
    assert "mlflow" not in result and not (run / "mlflow-spool").exists()
    assert not (run / "mlflow_run.json").exists()


def test_resumed_run_matches_uninterrupted(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config("train.epochs=3")
    full = train(cfg, data_uri=str(tiny_data), out_uri=str(tmp_path / "full"), progress=False)

    part = train(
        cfg,
        data_uri=str(tiny_data),
        out_uri=str(tmp_path / "split"),
        progress=False,
        stop_after_epochs=1,
    )
    assert part == {"finished": False, "next_epoch": 1}
    assert not (tmp_path / "split" / "metrics.json").exists()
    resumed = train(cfg, data_uri=str(tiny_data), out_uri=str(tmp_path / "split"), progress=False)
    assert resumed["epochs_run"] == 3
    assert resumed["weights_digest"] == full["weights_digest"]
    assert resumed["miou"] == pytest.approx(full["miou"])


def test_resume_elsewhere_refuses_a_changed_config_unless_forced(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = tiny_config("train.epochs=2")
    monkeypatch.chdir(tmp_path)
    train(first, data_uri=str(tiny_data), out_uri="run", progress=False, stop_after_epochs=1)
    out = tmp_path / "run"
    state = json.loads((out / "state.json").read_text())
    assert state["checkpoint"].startswith("checkpoints/epoch-0001")  # relative to --out
    saved = (out / "config.yaml").read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # resuming from another working directory

    changed = tiny_config("train.epochs=2", "train.lr=0.00123")
    with pytest.raises(ConfigError, match=rf"another config \(train\.lr: {first.train.lr!r} -> "
                       r"0\.00123\); .*--force-config"):  # fmt: skip
        train(changed, data_uri=str(tiny_data), out_uri="../run", progress=False)
    assert (out / "config.yaml").read_bytes() == saved  # never rewritten silently
    # Keys the checkpoint depends on cannot change, even when forced; nothing is written.
    with pytest.raises(ConfigError, match=r"different config.*model\.hidden_dim"):
        train(tiny_config("train.epochs=2", "model.hidden_dim=64"), data_uri=str(tiny_data),
              out_uri="../run", progress=False, force_config=True)  # fmt: skip
    assert not (out / "config.1.yaml").exists()

    # Forced, the run continues from its own epoch-1 checkpoint with the new values.
    result = train(changed, data_uri=str(tiny_data), out_uri="../run", progress=False,
                   force_config=True)  # fmt: skip
    assert result["epochs_run"] == 2
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0] == state["history"][0]  # epoch 1 was restored, not trained again
    assert (out / "config.1.yaml").read_bytes() == saved
    assert "lr: 0.00123" in (out / "config.yaml").read_text()


def test_bad_inputs_give_one_clear_error(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        train(tiny_config("data.num_classes=21"), data_uri=str(tiny_data),
              out_uri=str(tmp_path / "a"), progress=False)  # fmt: skip
    with pytest.raises(DataError, match="dataset.json"):
        train(tiny_config(), data_uri=str(tmp_path / "nothing"), out_uri=str(tmp_path / "b"),
              progress=False)  # fmt: skip
    with pytest.raises(DataError, match="fewer than one global batch"):
        train(tiny_config("train.batch_size=64", "train.steps_per_epoch=null"),
              data_uri=str(tiny_data), out_uri=str(tmp_path / "c"), progress=False)  # fmt: skip


def test_cli_reports_missing_data_cleanly(tmp_path: Path) -> None:
    proc = subprocess.run(
        _train_args(tmp_path / "missing", tmp_path / "out"),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "dataset.json" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_killed_training_resumes_at_next_epoch(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = _train_args(tiny_data, out, "train.epochs=3")
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = out / "state.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["next_epoch"] >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    epoch_at_kill = json.loads(state.read_text())["next_epoch"]
    assert epoch_at_kill < 3 and not (out / "metrics.json").exists()

    rerun = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming {out} at epoch {epoch_at_kill + 1}" in rerun.stderr
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
