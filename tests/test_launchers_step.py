"""The train step's distributed branch, as the pipeline runs it (real S3, fake Kubernetes API).

The step takes the dataset by its URI, starts a TrainJob or a TFJob through the launchers
(:mod:`tests.test_launchers` covers them in detail), and returns the chief's outputs, read
from ``checkpoint_root`` on a real S3 endpoint (moto), as its Model artifact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from components.launchers import workers
from helpers.s3_server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)
from test_launchers import GPU_TOLERATION, _tfjob_server, _trainjob_server
from vitpcm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

_STEP_SCRIPT = """
import json, sys
from kubernetes import client
from kfp import dsl
from components.launchers import kube
from vitpcm import storage
from components import train_model

rc = 0
for url, model_dir, metrics_dir, args in json.loads(sys.argv[1]):
    config = client.Configuration()
    config.host = url
    api = client.ApiClient(config)
    # In a pod these come from the service account; here from the fake API server.
    kube.kubernetes_apis = lambda: (client.CustomObjectsApi(api), client.CoreV1Api(api))
    kube.current_namespace = lambda: "team-a"
    model = dsl.Model(name="model", uri=model_dir, metadata={})
    metrics = dsl.Metrics(name="metrics", uri=metrics_dir, metadata={})
    try:
        train_model.python_func(model=model, metrics=metrics, **args)
        print(json.dumps({"metrics": metrics.metadata, "model": model.metadata}))
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        rc = 1
storage.exit_process(rc)  # s3:// was touched (tensorflow/io#2039)
"""


@pytest.mark.slow
def test_train_step_launches_the_job_and_returns_the_chiefs_model(
    s3_bucket: Any,  # noqa: F811  (fixture)
    tmp_path: Path,
) -> None:
    """The step as the pipeline runs it, once per kind of job (one process: one TF import):
    the dataset by URI, checkpoints on checkpoint_root, the job through the fake API server,
    the chief's outputs into the Model artifact."""
    modes = ("trainjob", "tfjob")
    runs, servers, chiefs = [], [], []
    for mode in modes:
        run_id = f"b6b0f4cc-2f8e-4c3e-a6f0-{mode}"
        chief = f"runs/{run_id}/train"
        chiefs.append(chief)
        metrics = {"miou": 0.61, "pixel_accuracy": 0.9, "best_epoch": 3, "epochs_run": 4}
        for name in workers.OUTPUT_FILES:  # what worker 0 wrote before the job completed
            s3_bucket.put(f"{chief}/{name}", name.encode())
        s3_bucket.put(f"{chief}/metrics.json", json.dumps({**metrics, "workers": 2}).encode())
        s3_bucket.put(f"{chief}/mlflow_run.json", b'{"run_id": "abc", "pending": 0}')
        args = {
            "tfrecords_uri": "minio://mlpipeline/v2/artifacts/run/convert/tfrecords",
            "config": "synthetic",
            "overrides": "train.lr=1e-4",
            "checkpoint_root": s3_bucket.uri("runs"),
            "kfp_run_id": run_id,
            "distributed": mode,
            "workers": 2,
            "gpus_per_worker": 1,
            "worker_image": "reg.example/vitpcm-gpu:1",
            "worker_size": json.dumps({"cpu_request": "4", "memory_request": "8Gi"}),
            "worker_tolerations": [GPU_TOLERATION],
        }
        server = (_trainjob_server() if mode == "trainjob" else _tfjob_server()).__enter__()
        servers.append(server)
        final = "Complete" if mode == "trainjob" else "Succeeded"
        server.script(f"{mode}s", workers.job_name(run_id), ["Created", final])
        runs.append([server.url, str(tmp_path / mode / "model"), str(tmp_path / mode / "m"), args])
    try:
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'src'}"}
        env.pop("MLFLOW_TRACKING_URI", None)
        done = subprocess.run(
            [sys.executable, "-c", _STEP_SCRIPT, json.dumps(runs)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        for server in servers:
            server.__exit__(None, None, None)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = [json.loads(line) for line in done.stdout.strip().splitlines()[-2:]]
    for mode, server, chief, logged in zip(modes, servers, chiefs, outputs, strict=True):
        assert logged["metrics"]["val_miou"] == 0.61 and logged["metrics"]["workers"] == 2
        assert logged["model"]["distributed"] == mode
        folder = tmp_path / mode / "model"
        assert (folder / "model.keras").read_bytes() == b"model.keras"
        assert json.loads((folder / "mlflow_run.json").read_text())["run_id"] == "abc"
        (job,) = server.created(f"{mode}s")
        if mode == "trainjob":
            command = job["spec"]["trainer"]["args"]
            resources = job["spec"]["trainer"]["resourcesPerNode"]
        else:
            pod = job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]
            (container,) = pod["containers"]
            command, resources = container["command"], container["resources"]
            assert pod["tolerations"] == [GPU_TOLERATION]
        # The workers read the dataset where KFP stored it and write to checkpoint_root.
        assert command[command.index("--data") + 1] == (
            "s3://mlpipeline/v2/artifacts/run/convert/tfrecords"
        )
        assert command[command.index("--out") + 1] == s3_bucket.uri(chief)
        assert "train.lr=1e-4" in command
        assert resources["requests"] == {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"}


def test_train_step_refuses_an_unknown_mode_before_anything_runs(tmp_path: Path) -> None:
    from kfp import dsl

    from components import train_model

    with pytest.raises(ConfigError, match="distributed must be one of none, trainjob, tfjob"):
        train_model.python_func(
            tfrecords_uri=str(tmp_path),
            model=dsl.Model(name="m", uri=str(tmp_path / "m"), metadata={}),
            metrics=dsl.Metrics(name="x", uri=str(tmp_path / "x"), metadata={}),
            distributed="mpi",
        )
