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
        run_id = tracker.run_id
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
    # the same model by its run (runs:/), with its config: the synthetic class names
    by_run = tmp_path / "by-run"
    wide = str(images / "wide.png")
    assert main(["predict", "-m", f"runs:/{run_id}/model", wide, "--out", str(by_run),
                 "--no-progress"]) == 0  # fmt: skip
    (record,) = map(json.loads, (by_run / "predictions.jsonl").read_text().splitlines())
    assert record["classes"] == expected["wide"]["classes"]
    assert set(record["classes"]) <= {"background", "disc", "triangle", "square", "ring", "star"}
    np.testing.assert_array_equal(
        np.asarray(Image.open(by_run / "wide.png")), np.asarray(Image.open(out / "wide.png"))
    )

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


# ----------------------------------------------------------------------------- KServe

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "kubeflow-user-example-com"
ISVC_CRD = "inferenceservice-v0.14.1.json"


def _kustomize(folder: Path) -> list[dict]:
    import shutil

    import yaml

    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl not found: it renders manifests/ (see README, Development)"
    done = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _isvc_errors(obj: dict) -> list[str]:
    from helpers.kube_api import load_crd, metadata_errors, schema_errors

    crd = load_crd(ISVC_CRD)
    rest = {k: v for k, v in obj.items() if k != "metadata"}
    errors = metadata_errors(obj["metadata"], NAMESPACE)
    if obj["apiVersion"] != f"{crd['group']}/{crd['version']}" or obj["kind"] != crd["kind"]:
        errors.append(f"{obj['apiVersion']} {obj['kind']}")
    return errors + schema_errors(rest, {**crd["schema"], "required": []})


def test_serving_manifests_validate_and_match_the_deploy_step() -> None:
    import kubernetes_validate

    from components.images import tagged
    from vitpcm.serving_deploy import inference_service

    objects = _kustomize(REPO / "manifests" / "serving")
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == [
        ("InferenceService", "vitpcm"),
        ("Role", "vitpcm-deploy"),
        ("RoleBinding", "vitpcm-deploy"),
    ]
    for obj in objects:
        assert obj["metadata"]["namespace"] == NAMESPACE
        if obj["kind"] == "InferenceService":
            assert _isvc_errors(obj) == []
        else:
            kubernetes_validate.validate(obj, "1.31.0", strict=True)
    (isvc,) = [o for o in objects if o["kind"] == "InferenceService"]
    image = tagged("cpu", environ={})
    built = inference_service(
        "vitpcm", NAMESPACE, "models:/vitpcm-voc12/1", image, "http://mlflow:5000"
    )
    assert isvc["spec"] == built["spec"]
    # the schema check bites: an unknown field and a wrong type are refused
    broken = json.loads(json.dumps(isvc))
    broken["spec"]["predictor"]["containers"][0]["imagePullPolicyy"] = "Always"
    broken["spec"]["predictor"]["minReplicas"] = "one"
    assert len(_isvc_errors(broken)) == 2


def _replacing_api():
    from helpers.kube_api import FakeKubeAPI, metadata_errors, schema_errors

    class ReplacingKubeAPI(FakeKubeAPI):
        """The fake API server plus ``PUT`` (replace) with resourceVersion checks."""

        def answer(self, method: str, path: str, query: dict, body: object) -> tuple[int, dict]:
            parts = path.strip("/").split("/")
            if method != "PUT":
                status, answer = super().answer(method, path, query, body)
                if method == "POST" and status == 201:
                    key = (parts[5], body["metadata"]["name"])
                    self.objects[key]["metadata"]["resourceVersion"] = "1"
                return status, answer
            resource, key = self.resources[parts[5]], (parts[5], parts[6])
            meta = dict(body["metadata"])
            version = meta.pop("resourceVersion", None)
            if key not in self.objects:
                return 404, {"kind": "Status", "code": 404, "message": "not found"}
            current = self.objects[key]["metadata"]["resourceVersion"]
            if version != current:
                return 409, {"kind": "Status", "code": 409, "message": "conflict"}
            rest = {k: v for k, v in body.items() if k != "metadata"}
            errors = metadata_errors(meta, parts[4])
            errors += schema_errors(rest, {**resource.schema, "required": []})
            if errors:
                return 422, {"kind": "Status", "code": 422, "message": "; ".join(errors)}
            self.objects[key] = {
                **body,
                "metadata": {**meta, "resourceVersion": str(int(current) + 1)},
            }
            return 200, self.objects[key]

    return ReplacingKubeAPI({"inferenceservices": ISVC_CRD}, namespace=NAMESPACE)


def test_deploy_step_follows_the_champion_against_a_validating_api() -> None:
    from vitpcm.serving_deploy import DeployError, deploy_champion, served_model

    api = _replacing_api()
    with api:
        custom, _core = api.clients()

        def deploy(version: str | None, promoted: bool | None, name: str = "vitpcm") -> dict:
            registration = None if version is None else {
                "model_name": "vitpcm-voc12", "version": version, "promoted": promoted
            }  # fmt: skip
            return deploy_champion(
                registration,
                api=custom,
                name=name,
                namespace=NAMESPACE,
                image="reg/vitpcm-cpu:1",
                tracking_uri="http://mlflow:5000",
            )

        assert deploy(None, None)["action"] == "skipped"
        assert deploy("1", False)["action"] == "skipped"
        assert api.requests == []  # no champion change: the cluster is not even asked
        assert deploy("1", True)["action"] == "created"
        assert deploy("1", True)["action"] == "unchanged"
        assert deploy("2", True) == {
            "action": "updated",
            "model_uri": "models:/vitpcm-voc12/2",
            "reason": "champion models:/vitpcm-voc12/2",
        }
        stored = api.objects[("inferenceservices", "vitpcm")]
        assert served_model(stored) == "models:/vitpcm-voc12/2"
        assert stored["metadata"]["resourceVersion"] == "2"
        assert deploy("3", False)["action"] == "skipped"
        assert served_model(api.objects[("inferenceservices", "vitpcm")]).endswith("/2")
        # an object the server refuses is one clear error
        with pytest.raises(DeployError, match="refused InferenceService .*Bad_Name"):
            deploy("4", True, name="Bad_Name")
        calls = {c for c in api.calls() if c[2] == "inferenceservices"}
    # exactly the verbs manifests/serving/rbac.yaml grants
    (role,) = [o for o in _kustomize(REPO / "manifests" / "serving") if o["kind"] == "Role"]
    (rule,) = role["rules"]
    granted = {
        (v, g, r) for v in rule["verbs"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert calls == granted


def test_pipeline_deploy_flag_is_off_by_default() -> None:
    import inspect

    from pipeline.pipeline import vitpcm_pipeline

    signature = inspect.signature(vitpcm_pipeline.pipeline_func)
    assert signature.parameters["deploy"].default is False
    task = vitpcm_pipeline.pipeline_spec.root.dag.tasks["deploy-model"]
    params = task.inputs.parameters
    assert params["enabled"].component_input_parameter == "deploy"
    assert task.inputs.artifacts["summary"].task_output_artifact.producer_task == "register-model"


def test_deploy_component_is_a_no_op_unless_enabled(tmp_path: Path) -> None:
    from kfp.dsl import Artifact

    from components.deploy import deploy_model

    summary = Artifact(uri=str(tmp_path / "s"), metadata={})
    summary.path = str(tmp_path / "summary.json")
    Path(summary.path).write_text(json.dumps({"mlflow": {"version": "3", "promoted": True}}))
    # off: no Kubernetes API is contacted (there is none here: it would fail)
    assert deploy_model.python_func(summary=summary, tracking_uri="x", image="i") == "off"
