"""The registered model as a pyfunc: `mlflow models serve` answers with the masks of predict."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.mlflow_server import MlflowServer, mlflow_server, s3_server  # noqa: F401
from helpers.tiny import tiny_config
from vitpcm.cli import main
from vitpcm.serving import VitpcmPyfunc, decode_b64_image, example_image_b64

MODEL_NAME = "serving-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, limit_s: float = 240) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"mlflow models serve not ready: {log.read_text()[-3000:]}")


def _tiny_model() -> tuple[object, object]:
    from vitpcm.model.vitpcm import build_vitpcm, patch_classifier_of

    cfg = tiny_config("model.pretrained=null", f"mlflow.registered_model={MODEL_NAME}")
    model = build_vitpcm(cfg.model, cfg.data.num_classes)
    kernel = patch_classifier_of(model).kernel
    kernel.assign(kernel.numpy() * 40.0)  # several classes present: the masks differ
    return cfg, model


def test_pyfunc_object_takes_base64_and_arrays() -> None:
    import pandas as pd

    from vitpcm.predict import Predictor

    cfg, model = _tiny_model()
    predictor = Predictor(model, [f"c{i}" for i in range(6)], 64)
    pyfunc = VitpcmPyfunc(predictor)
    text = example_image_b64(40)
    frame = pyfunc.predict(pd.DataFrame({"image": [text, f"data:image/png;base64,{text}"]}))
    assert list(frame.columns) == ["mask", "height", "width", "classes"]
    image = decode_b64_image(text, 0)
    mask, scores = predictor.predict(image)
    for row in frame.itertuples():
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(row.mask))))
        np.testing.assert_array_equal(served, mask)
        assert row.classes == scores and (row.height, row.width) == (40, 40)
    arrays = pyfunc.get_raw_model().predict([image, image[:20]])
    assert list(arrays["height"]) == [40, 20]
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="image 0 is not base64"):
        pyfunc.predict(pd.DataFrame({"image": ["%%% not base64"]}))
    with pytest.raises(MlflowException, match="image 0 is not a readable JPEG/PNG"):
        pyfunc.predict(pd.DataFrame({"image": [base64.b64encode(b"plain text").decode()]}))


@pytest.mark.slow
def test_served_champion_answers_like_vitpcm_predict(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vitpcm.tracking import RunTracker

    cfg, model = _tiny_model()
    with RunTracker(cfg, tmp_path / "run", tracking_uri=mlflow_server.uri) as tracker:
        logged = tracker.log_model(model, miou=0.5, split="val")
    assert logged.decision is not None and logged.decision.promoted
    uri = f"models:/{MODEL_NAME}@champion"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(5)
    for name, (h, w) in {"wide": (48, 80), "tall": (70, 40)}.items():
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{name}.png")
    out = tmp_path / "pred"
    assert main(["predict", "-m", uri, str(images), "--out", str(out), "--no-progress"]) == 0
    expected = {
        Path(r["image"]).stem: r
        for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())
    }

    port = _free_port()
    log = tmp_path / "serve.log"
    bin_dir = str(Path(sys.executable).parent)
    mlflow_cli = os.path.join(bin_dir, "mlflow")
    # as in an activated environment: the server runs the uvicorn installed beside mlflow
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [mlflow_cli, "models", "serve", "-m", uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, proc, log)
        names = sorted(expected)
        data = [[base64.b64encode((images / f"{n}.png").read_bytes()).decode()] for n in names]
        status, body = _post(
            f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": data}}
        )
        assert status == 200, body
        predictions = body["predictions"]
        assert len(predictions) == 2
        for name, answer in zip(names, predictions, strict=True):
            served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask"]))))
            written = np.asarray(Image.open(out / expected[name]["mask"]))
            assert served.shape == written.shape == (answer["height"], answer["width"])
            np.testing.assert_array_equal(served, written)
            assert answer["classes"] == expected[name]["classes"]
            assert len(np.unique(served)) >= 1
        # params: the CRF, and a bad image is a 400 naming it
        status, body = _post(
            f"{base}/invocations",
            {"dataframe_split": {"columns": ["image"], "data": data[:1]}, "params": {"crf": True}},
        )
        assert status == 200 and len(body["predictions"]) == 1, body
        status, body = _post(
            f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": [["@@"]]}}
        )
        assert status == 400 and "image 0 is not base64" in json.dumps(body)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        print(log.read_text()[-4000:])
