"""`make run-local`: progress display, local services, summary, and the MLflow store it leaves.

The slow tests run ``python -m localrun`` (what ``make run-local`` runs) in a
subprocess on a tiny synthetic dataset with one short epoch, against its own MLflow server
and moto S3 endpoint, then check the printed summary, ``summary.json``, that nothing is left
running, and that ``make mlflow-ui``'s server shows the run, artifacts included.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers.tiny import TINY_OVERRIDES
from localrun.mlflow_store import main as mlflow_ui_main
from localrun.mlflow_store import serve_ui
from localrun.processes import run_in_own_group
from localrun.progress import KfpLogSink, StepDisplay
from localrun.services import MlflowServer, S3Endpoint, free_port
from localrun.summary import build_summary, format_summary
from pipeline.steps import STEPS
from vitpcm import events
from vitpcm.errors import ConfigError, TrackingError

REPO = Path(__file__).resolve().parents[1]
_RUN_URL = re.compile(
    r"http://127\.0\.0\.1:(\d+)/#/experiments/(\d+)/runs/([0-9a-f]{32})"
    r"\?workflowType=machine_learning"
)
_NUMBER = r"(\d\.\d{4})"


LABELS = {step.task: step.label for step in STEPS}


def _event_line(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, kind: str, **fields: object
) -> str:
    """What a step prints for ``events.emit(kind, **fields)``, as kfp.local passes it on."""
    monkeypatch.setenv(events.ENV, "1")
    capsys.readouterr()
    events.emit(kind, **fields)
    return "    " + capsys.readouterr().out.rstrip("\n")


def _kfp_lines(event: Callable[..., str], status: str = "SUCCESS") -> list[str]:
    """What kfp.local prints for a two-step run (colours included)."""
    cyan, end = "\x1b[96m", "\x1b[0m"
    return [
        f"10:00:00.000 - INFO - Executing task {cyan}'download-data'{end}",
        "10:00:00.001 - INFO - Streamed logs:",
        '    {"inputs": {"parameterValues": {"dataset": "synthetic"}}}',
        f"10:00:01.000 - INFO - Task {cyan}'download-data'{end} finished with status SUCCESS",
        f"10:00:01.001 - INFO - Executing task {cyan}'train-model'{end}",
        # A log line that reads like progress is not progress: only events are shown.
        "    [KFP Executor 10:00:02 INFO]: epoch 7/9 finetune: loss 9.0 val mIoU 0.9",
        event("epoch", epoch=1, epochs=2, loss=2.5, val_miou=0.1),
        event("epoch", epoch=2, epochs=2, loss=2.1, val_miou=0.25),
        "    Traceback (most recent call last):",
        "    ValueError: something broke",
        f"10:00:04.000 - INFO - Task {cyan}'train-model'{end} finished with status {status}",
    ]


@pytest.fixture
def event(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    return lambda kind, **fields: _event_line(capsys, monkeypatch, kind, **fields)


def test_log_sink_shows_one_line_per_step_and_keeps_the_full_log(
    tmp_path: Path, event: Callable[..., str]
) -> None:
    screen = io.StringIO()
    display = StepDisplay(screen, total=6, live=False, labels=LABELS)
    with open(tmp_path / "run.log", "w", encoding="utf-8") as log:
        sink = KfpLogSink(log, display)
        for line in _kfp_lines(event):
            sink.line(line + "\n")
    shown = screen.getvalue()
    assert re.search(r"ok \[1/6\] download / synthesise data +\d:\d\d\n", shown)
    assert re.search(
        r"ok \[2/6\] train ViT-PCM +\d:\d\d  epoch 2/2 · loss 2.1000 · val mIoU 0.2500\n", shown
    )
    assert "[KFP Executor" not in shown and "7/9" not in shown  # step logs stay in the file
    text = (tmp_path / "run.log").read_text()
    assert "ValueError: something broke" in text
    assert "\x1b[" not in text  # colour codes removed
    assert sink.failed is None
    assert [s.status for s in display.steps] == ["ok", "ok"]


def test_every_kind_of_event_is_shown(event: Callable[..., str]) -> None:
    samples = {
        "resume": ({"epoch": 3}, "resuming at epoch 3"),
        "early_stop": ({"patience": 5}, "early stop: no improvement for 5 epochs"),
        "score": ({"split": "val", "miou": 0.5, "images": 8}, "val mIoU 0.5000 (8 images)"),
        "crf_score": (
            {"split": "test", "miou": 0.4, "miou_crf": 0.45, "images": 4},
            "test: mIoU 0.4000 -> 0.4500 after CRF",
        ),
        "registered": (
            {"run_id": "r1", "model": "m", "version": "2", "promoted": True},
            "m v2: new champion",
        ),
    }
    for kind, (fields, expected) in samples.items():
        display = StepDisplay(io.StringIO(), live=False)
        sink = KfpLogSink(io.StringIO(), display)
        sink.line("Executing task 'infer-crf'")
        sink.line(event(kind, **fields))
        assert display.steps[0].detail == expected, kind
    sink.line(event("registered", run_id="r1"))  # the run exists, no model registered yet
    assert display.steps[0].detail == "MLflow run r1"


def test_events_are_silent_unless_asked(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(events.ENV, raising=False)
    events.emit("epoch", epoch=1)
    assert capsys.readouterr().out == ""
    assert events.parse("epoch 1/2 finetune: val mIoU 0.5") is None


def test_log_sink_names_the_failed_step_and_keeps_its_tail(
    tmp_path: Path, event: Callable[..., str]
) -> None:
    screen = io.StringIO()
    display = StepDisplay(screen, total=6, live=False, labels=LABELS)
    with open(tmp_path / "run.log", "w", encoding="utf-8") as log:
        sink = KfpLogSink(log, display)
        for line in _kfp_lines(event, "FAILURE"):
            sink.line(line)
    assert sink.failed == "train-model"
    assert sink.tail[-1] == "    ValueError: something broke"
    assert not any("download-data" in line for line in sink.tail)  # only the failed step's
    assert "FAILED [2/6] train ViT-PCM" in screen.getvalue()


def test_live_display_redraws_the_running_step_in_place() -> None:
    screen = io.StringIO()
    display = StepDisplay(screen, total=2, live=True)
    display.begin("train-model")
    display.detail("epoch 1/2")
    display.end("train-model")
    display.close()
    out = screen.getvalue()
    assert out.count("\r\x1b[K") >= 3  # drawn at start, on the detail, and at the end
    assert out.endswith("  epoch 1/2\n")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_an_interrupted_step_is_stopped_with_its_children() -> None:
    child = "import time; time.sleep(60)"
    step = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
        "print('pids', p.pid, flush=True); time.sleep(60)"
    )
    printed: list[str] = []
    # A real SIGINT, as Ctrl-C sends: it breaks the blocking read of the step's output.
    # Python's own handler, as at a terminal: a shell's background job inherits SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_in_own_group([sys.executable, "-c", step], printed.append)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 60
    grandchild = int(printed[0].split()[1])
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_busy_ports_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"port {port} on 127.0.0.1 is busy.*--mlflow-port"):
            MlflowServer(tmp_path, port=port, artifacts_destination=str(tmp_path))
        with pytest.raises(ConfigError, match=rf"port {port} .*--s3-port"):
            S3Endpoint(port)


def test_a_server_that_cannot_start_shows_the_end_of_its_log(tmp_path: Path) -> None:
    server = MlflowServer(tmp_path, artifacts_destination=str(tmp_path / "artifacts"))
    server.backend_uri = "nosuchscheme://nowhere"
    with pytest.raises(TrackingError, match="exited with code") as error:
        server.start(timeout=180)
    assert "nosuchscheme" in str(error.value)  # the server's own complaint, from its log
    assert not server.running


def test_a_busy_default_mlflow_port_falls_back_to_a_free_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from localrun import services
    from localrun.command import _mlflow_port

    screen = io.StringIO()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        monkeypatch.setattr(services, "DEFAULT_MLFLOW_PORT", taken)
        port = _mlflow_port(None, StepDisplay(screen, live=False))
        assert port != taken and services.port_is_free(port)
        assert f"port {taken} is busy: MLflow listens on {port} this time" in screen.getvalue()
        assert _mlflow_port(taken, StepDisplay(screen, live=False)) == taken  # asked for


def test_local_mlflow_server_is_set_up_like_the_cluster_one(tmp_path: Path) -> None:
    import yaml

    from localrun import services

    deployment = yaml.safe_load((REPO / "manifests" / "mlflow-deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    cluster = dict(arg.lstrip("-").partition("=")[::2] for arg in container["args"])
    cluster_env = {item["name"]: item for item in container["env"]}

    bucket = services.S3Bucket("http://127.0.0.1:9", "b")
    server = MlflowServer(tmp_path, bucket)
    command = server.command()
    local = {
        arg.lstrip("-"): command[i + 1] if i + 1 < len(command) else ""
        for i, arg in enumerate(command)
        if arg.startswith("--")
    }
    assert "serve-artifacts" in cluster and "serve-artifacts" in local
    for flag, prefix in (("backend-store-uri", "sqlite:///"), ("artifacts-destination", "s3://")):
        assert cluster[flag].startswith(prefix) and local[flag].startswith(prefix), flag
    assert set(local["allowed-hosts"].split(",")) <= set(cluster["allowed-hosts"].split(","))
    env = server.env()
    assert cluster_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "MLFLOW_S3_ENDPOINT_URL" in cluster_env
    assert env["MLFLOW_S3_ENDPOINT_URL"] == bucket.endpoint
    assert local["artifacts-destination"] == "s3://b/mlflow"


def test_mlflow_ui_needs_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert mlflow_ui_main(["ui", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "mlflow.db does not exist: run `make run-local` first" in err


def _fake_run(tmp_path: Path) -> SimpleNamespace:
    """A finished run's outputs as run_local returns them."""
    run_dir = tmp_path / "vitpcm-wsss-single-node-1"
    model, report, masks = (run_dir / "train-model" / "model", run_dir / "e", run_dir / "i")
    for folder in (model, report, masks / "pseudo_masks", masks / "pseudo_masks_crf"):
        folder.mkdir(parents=True)
    names = ["background", "disc"]
    (report / "metrics.json").write_text(
        json.dumps({"split": "val", "num_images": 8, "class_iou": [0.8, 0.2], "class_names": names})
    )
    (masks / "metrics.json").write_text(
        json.dumps({"split": "val", "class_iou": [0.7, 0.1], "class_iou_crf": [0.75, 0.3]})
    )
    return SimpleNamespace(
        pipeline_root=tmp_path,
        artifacts={"model": str(model), "eval_report": str(report), "pseudo_masks": str(masks)},
        metrics={
            "train_metrics": {"epochs_run": 3.0, "best_epoch": 2.0, "val_miou": 0.55},
            "eval_metrics": {"miou": 0.5, "pixel_accuracy": 0.9},
            "test_metrics": {"miou": 0.4, "miou_crf": 0.525},
        },
        summary={
            "mlflow": {
                "run_id": "a" * 32,
                "experiment": "vitpcm-local",
                "model_name": "vitpcm-local",
                "version": "2",
                "promoted": False,
                "champion_comparison": "0.500 (val) vs champion 0.600 (val)",
                "pending": 3,
                "spool_dir": "/runs/spool",
            }
        },
    )


def test_summary_lists_scores_places_and_the_mlflow_outcome(tmp_path: Path) -> None:
    summary = build_summary(
        _fake_run(tmp_path),
        dataset="synthetic",
        config="synthetic",
        wall_seconds=75.0,
        tracking_uri="",  # no server to ask for the experiment id
        browse_command="make mlflow-ui",
    )
    assert summary["class_iou"][1] == {"class": "disc", "val": 0.2, "test": 0.1, "test_crf": 0.3}
    assert summary["artifacts"]["pseudo_masks_crf"].endswith("pseudo_masks_crf")
    text = format_summary(summary, str(tmp_path / "summary.json"))
    assert "finished in 1:15" in text
    # Each row says what it is: purpose and split (here the test ran on val: not held out).
    assert re.search(r"model selection: best of 3 epochs \(epoch 2\) +val +0\.5500\n", text)
    assert re.search(r"model selection: evaluate step +val +0\.5000\n", text)
    assert re.search(r"test \(not held out\): infer \+ CRF +val +0\.4000  0\.5250\n", text)
    assert summary["test"]["held_out"] is False
    assert "Per-class IoU (eval on val, test on val)" in text
    assert re.search(r"disc +0\.2000 +0\.1000 +0\.3000", text)
    assert "vitpcm-local version 2: champion unchanged (0.500 (val) vs champion" in text
    assert "vitpcm mlflow replay /runs/spool" in text  # 3 records were not sent
    assert "Browse later:     make mlflow-ui" in text


def test_make_targets_run_the_modules() -> None:
    for target, command in (
        ("run-local", "-m localrun --epochs 2"),
        ("mlflow-ui", "-m localrun.mlflow_store ui --epochs 2"),
    ):
        dry = subprocess.run(
            ["make", "-n", target, "ARGS=--epochs 2"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        assert command in dry.stdout, dry.stdout


# ------------------------------------------------------------------- the real command


def _command(root: Path, *extra: str, tiny: bool = True) -> list[str]:
    """``python -m localrun`` on a small synthetic set (and a tiny model: ``tiny``)."""
    sets = [arg for item in TINY_OVERRIDES for arg in ("--set", item)] if tiny else []
    return [
        sys.executable,
        "-m",
        "localrun",
        "--root",
        str(root),
        "--train",
        "16",
        "--val",
        "8",
        "--test",
        "4",
        "--size",
        "64",
        *sets,
        *extra,
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "S3_ENDPOINT"):
        env.pop(key, None)
    return env


def _leftovers(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and _alive(int(proc.name)):
            found.append(cmdline[:200])
    return found


def _port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


@pytest.mark.slow
def test_run_local_end_to_end_and_the_mlflow_store_it_leaves(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    s3_port = free_port()
    done = subprocess.run(
        _command(root, "--epochs", "1", "--mlflow-port", "0", "--s3-port", str(s3_port)),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert re.search(r"\[\d/8\] train ViT-PCM +\d:\d\d  epoch 1/1", out)
    assert re.search(r"\[1/8\] check dataset and config", out)
    # Each scoring step's line ends with what it reported (its progress events).
    ended = r"(?:✓|ok) \[\d/8\] "
    assert re.search(ended + r"evaluate baseline pseudo masks +\S+  val mIoU \d\.\d{4} \(8 ", out)
    assert re.search(ended + r"infer pseudo masks \+ CRF +\S+  test: mIoU .* after CRF", out)
    assert re.search(ended + r"register in MLflow +\S+  vitpcm-local v1: new champion", out)
    val = re.search(rf"model selection: evaluate step +val +{_NUMBER}\n", out)
    test = re.search(rf"\n +held-out test: infer \+ CRF +test +{_NUMBER}  {_NUMBER}\n", out)
    url = _RUN_URL.search(out)
    assert val and test and url, out
    port, experiment_id, run_id = url.groups()
    assert "Registered model: vitpcm-local version 1: new champion" in out
    assert "Browse later:     make mlflow-ui" in out
    assert re.search(r"Per-class IoU \(eval on val, test on test\)\n.*\n +background +\d", out)

    summary = json.loads((root / "summary.json").read_text())
    assert f"{summary['val']['miou']:.4f}" == val.group(1)
    assert f"{summary['test']['miou_crf']:.4f}" == test.group(2)
    assert summary["mlflow"]["run_url"] == url.group(0)
    assert summary["mlflow"]["pending"] == 0
    assert Path(summary["artifacts"]["model"], "model.keras").is_file()
    assert any(Path(summary["artifacts"]["pseudo_masks_crf"]).glob("*.png"))
    assert Path(summary["artifacts"]["mlflow_spool"], "spool.json").is_file()
    assert "ValueError" not in Path(summary["log"]).read_text()
    assert "Executing task 'register-model'" in Path(summary["log"]).read_text()

    # Everything was stopped: no step or server process, both ports closed.
    assert _port_closed(int(port)) and _port_closed(s3_port)
    assert _leftovers(str(root)) == []

    # `make mlflow-ui`'s server shows the run from the SQLite file and the saved artifacts.
    server = serve_ui(root, port=None)
    try:
        client = server.client()
        run = client.get_run(run_id)
        assert run.info.experiment_id == experiment_id
        assert run.data.metrics["eval/miou"] == pytest.approx(summary["val"]["miou"])
        assert run.data.metrics["test/miou_crf"] == pytest.approx(summary["test"]["miou_crf"])
        # The run's params name the model it registered.
        assert run.data.params["mlflow.registered_model"] == "vitpcm-local"
        shown = {item.path for item in client.list_artifacts(run_id, "test")}
        assert {"test/overlays_best.png", "test/class_iou_before_after_crf.png"} <= shown
        from mlflow.artifacts import download_artifacts

        png = download_artifacts(
            run_id=run_id,
            artifact_path="test/overlays_worst.png",
            tracking_uri=server.uri,
            dst_path=tempfile.mkdtemp(dir=tmp_path),
        )
        assert Path(png).read_bytes().startswith(b"\x89PNG")
        champion = client.get_model_version_by_alias("vitpcm-local", "champion")
        assert champion.version == "1" and champion.run_id == run_id
    finally:
        server.stop()


@pytest.mark.slow
def test_a_failed_step_is_named_with_its_error_and_log(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    done = subprocess.run(
        # 8 training images, fewer than one batch of 16 (the full config's): train fails.
        _command(root, "--no-mlflow", "--train", "8", tiny=False),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"(✗|FAILED) \[\d/8\] train ViT-PCM", done.stdout)
    assert "The end of the failed step's log" in done.stdout
    assert "Traceback (most recent call last)" in done.stdout
    assert re.match(
        r"error: step 'train ViT-PCM' failed: vitpcm\.errors\.DataError: split 'train' .* has "
        r"8 images, fewer than one global batch.*; the full log is .*\.log\n$",
        done.stderr,
    )
    log = re.search(r"the full log is (\S+\.log)", done.stderr)
    assert log and "DataError" in Path(log.group(1)).read_text()
    assert not (root / "summary.json").exists()
    assert _leftovers(str(root)) == []


@pytest.mark.slow
def test_run_local_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    s3_port, mlflow_port = free_port(), free_port()
    proc = subprocess.Popen(
        # Enough epochs that the training step is still running when interrupted.
        _command(
            root, "--epochs", "50", "--mlflow-port", str(mlflow_port), "--s3-port", str(s3_port)
        ),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # SIGINT handled as at a terminal, even when the tests run as a shell's background
        # job (which inherits it ignored).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if re.search(r"\[\d/8\] train ViT-PCM \.\.\.", line):
                break
        time.sleep(5)  # inside the step: TensorFlow imported, the model being built
        assert _leftovers(str(root)), "the training step should be running"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(seen) + rest
    assert proc.returncode == 130, output[-3000:]
    assert "interrupted (SIGINT): every step and server was stopped" in output
    assert re.search(r"(✗|FAILED) \[\d/8\] train ViT-PCM", output)
    assert _port_closed(mlflow_port) and _port_closed(s3_port)
    assert _leftovers(str(root)) == []
