"""Multi-worker training: TF_CONFIG from a JobSet pod's identity, and real all-reduce.

* The derivation (:mod:`vitpcm.tf_config`) against the JobSet/Trainer naming, and the
  shipped TrainingRuntime hands each pod exactly the variables it reads.
* Two real worker processes started the way the TrainingRuntime starts them
  (``python -m vitpcm.tf_config -- vitpcm train ...``, JobSet-style environment), whose
  JobSet host names resolve to 127.0.0.1 through an /etc/hosts of their own (a user and
  mount namespace, ``unshare -rm``), train a tiny model; their weights must equal those of
  one worker trained at the same global batch. Each worker reads its own half of every
  global batch, so without the all-reduce (each applying its own gradient) the weights
  differ by orders of magnitude more than the tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.launchers import workers
from components.launchers.trainjob import trainjob_manifest
from helpers.tiny import TINY_OVERRIDES, make_tiny_dataset
from vitpcm import tf_config
from vitpcm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
RUNTIME = REPO / "manifests" / "trainer" / "tf-multiworker-runtime.yaml"
# Two steps of a 16-image global batch, no dropout (its masks differ per replica), no ET
# (the all-reduce path is the same without it, and it halves the compile time).
RUN = (
    *TINY_OVERRIDES,
    "train.epochs=1",
    "model.dropout=0.0",
    "model.backbone_dropout=0.0",
    "model.lstm_dropout=0.0",
    "train.et.enabled=false",
    "eval.train_miou_images=0",
)
GLOBAL_BATCH = 16
# Summation order is all that differs between one worker and two: measured max |diff| 3e-8
# over every weight and optimizer slot; with the all-reduce removed it is 1e-2.
ATOL = 1e-6


# ----------------------------------------------------------------------------- derivation


def _jobset_env(index: int, **extra: str) -> dict[str, str]:
    return {
        "JOBSET_NAME": "vitpcm-train-b6b0f4cc-1a2b3c4d5e",
        "JOBSET_REPLICATED_JOB": "node",
        "JOBSET_JOB_INDEX": "0",
        "JOB_COMPLETION_INDEX": str(index),
        "VITPCM_NUM_WORKERS": "3",
        **extra,
    }


def test_jobset_tf_config_names_every_worker_by_its_stable_dns_name() -> None:
    # <jobset>-<replicatedJob>-<jobIndex>-<podIndex>.<subdomain>, subdomain = the JobSet's
    # name (jobset GenPodName + the headless Service; Trainer's syncPodNetwork).
    name = "vitpcm-train-b6b0f4cc-1a2b3c4d5e"
    expected = [f"{name}-node-0-{i}.{name}:2222" for i in range(3)]
    for index in range(3):
        assert tf_config.jobset_tf_config(_jobset_env(index)) == {
            "cluster": {"worker": expected},
            "task": {"type": "worker", "index": index},
        }
    custom = tf_config.jobset_tf_config(
        _jobset_env(2, JOBSET_SUBDOMAIN="workers", VITPCM_WORKER_PORT="7001,7002,7003")
    )
    assert custom["cluster"]["worker"][2] == f"{name}-node-0-2.workers:7003"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"JOBSET_NAME": ""}, "JOBSET_NAME is not set"),
        ({"JOB_COMPLETION_INDEX": "3"}, "JOB_COMPLETION_INDEX=3 but VITPCM_NUM_WORKERS=3"),
        ({"VITPCM_NUM_WORKERS": "three"}, "VITPCM_NUM_WORKERS='three' is not a whole number"),
        ({"VITPCM_WORKER_PORT": "1,2"}, "exactly 3 .one per worker."),
    ],
)
def test_jobset_tf_config_names_what_is_wrong(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tf_config.jobset_tf_config({**_jobset_env(0), **env})


def test_runtime_hands_each_pod_what_the_derivation_reads() -> None:
    (runtime,) = [d for d in yaml.safe_load_all(RUNTIME.read_text()) if d]
    (rjob,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    (container,) = rjob["template"]["spec"]["template"]["spec"]["containers"]
    fields = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
        for e in container["env"]
        if "valueFrom" in e
    }
    # The labels JobSet puts on every pod, and the Indexed Job's completion index.
    assert fields == {
        tf_config.JOBSET_NAME: "metadata.labels['jobset.sigs.k8s.io/jobset-name']",
        tf_config.REPLICATED_JOB: "metadata.labels['jobset.sigs.k8s.io/replicatedjob-name']",
        tf_config.JOB_INDEX: "metadata.labels['jobset.sigs.k8s.io/job-index']",
        tf_config.POD_INDEX: "metadata.annotations['batch.kubernetes.io/job-completion-index']",
    }
    values = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    (port,) = container["ports"]
    assert values[tf_config.PORT] == str(port["containerPort"]) == str(tf_config.DEFAULT_PORT)
    # The one fact no label carries comes from the launcher: the TrainJob's numNodes.
    spec = workers.WorkerSpec(image="i", command=("vitpcm", "train"), workers=4, gpus=1)
    trainer = trainjob_manifest(name="j", namespace="n", spec=spec)["spec"]["trainer"]
    assert {"name": tf_config.NUM_WORKERS, "value": "4"} in trainer["env"]
    assert trainer["numNodes"] == 4


def test_entry_point_prints_keeps_and_refuses() -> None:
    base = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    base["PYTHONPATH"] = str(REPO / "src")

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vitpcm.tf_config", *args],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = run("--print", **_jobset_env(1))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["task"] == {"type": "worker", "index": 1}
    # It then runs the command with the variable set.
    done = run(
        "--", sys.executable, "-c", "import os; print(os.environ['TF_CONFIG'])", **_jobset_env(2)
    )
    assert json.loads(done.stdout) == tf_config.jobset_tf_config(_jobset_env(2))
    # A TF_CONFIG already there (a TFJob's) is kept.
    done = run("--print", TF_CONFIG='{"cluster": {}, "task": {}}')
    assert json.loads(done.stdout) == {"cluster": {}, "task": {}}
    done = run("--print")
    assert done.returncode == 2
    assert done.stderr.startswith("error: JOBSET_NAME is not set")


# ----------------------------------------------------------------------------- training


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "MLFLOW_TRACKING_URI")}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _train_args(data: Path, out: Path, batch: int) -> list[str]:
    sets = [item for kv in (*RUN, f"train.batch_size={batch}") for item in ("--set", kv)]
    return ["train", "-c", "synthetic", "--data", str(data), "--out", str(out),
            "--no-progress", *sets]  # fmt: skip


def _namespaces_work() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    done = subprocess.run(
        [unshare, "-rm", "sh", "-c", "mount --bind /etc/hostname /etc/hosts"],
        capture_output=True,
        timeout=30,
    )
    return done.returncode == 0


def _run_two_workers(data: Path, out: Path, hosts_dir: Path, *, via_jobset: bool) -> list[str]:
    """Two workers at half the global batch each; returns their logs."""
    ports = _free_ports(2)
    train = [sys.executable, "-m", "vitpcm", *_train_args(data, out, GLOBAL_BATCH // 2)]
    with socket.socket() as sock:  # an MLflow server that is down: records stay spooled
        sock.bind(("127.0.0.1", 0))
        mlflow_uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
    procs = []
    for index in range(2):
        env = _env(MLFLOW_TRACKING_URI=mlflow_uri)
        if via_jobset:  # as the TrainingRuntime starts a pod
            job = "vitpcm-train-test-0123456789"
            env.update(
                JOBSET_NAME=job,
                JOBSET_REPLICATED_JOB="node",
                JOBSET_JOB_INDEX="0",
                JOB_COMPLETION_INDEX=str(index),
                VITPCM_NUM_WORKERS="2",
                VITPCM_WORKER_PORT=",".join(map(str, ports)),
            )
            hosts = hosts_dir / "hosts"
            names = " ".join(f"{job}-node-0-{i}.{job}" for i in range(2))
            hosts.write_text(Path("/etc/hosts").read_text() + f"\n127.0.0.1 {names}\n")
            command = [
                "unshare", "-rm", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
                str(hosts), sys.executable, "-m", "vitpcm.tf_config", "--", *train,
            ]  # fmt: skip
        else:
            cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
            env["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            )
            command = train
        procs.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    return logs


def _weights(out: Path) -> dict[str, Any]:
    """Every float tensor of the last checkpoint: model weights and optimizer slots."""
    import tensorflow as tf

    state = json.loads((out / "state.json").read_text())
    reader = tf.train.load_checkpoint(str(out / state["checkpoint"]))
    tensors = {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}
    return {
        k: v
        for k, v in tensors.items()
        if getattr(v, "dtype", None) is not None and v.dtype.kind == "f"
    }


def _max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    import numpy as np

    assert a.keys() == b.keys() and len(a) > 50
    return max(float(np.max(np.abs(a[k].astype("float64") - b[k]))) for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("mw"), train=2 * GLOBAL_BATCH)


@pytest.fixture(scope="module")
def one_worker(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The reference: one worker at the global batch."""
    out = tmp_path_factory.mktemp("one") / "run"
    args = [sys.executable, "-m", "vitpcm", *_train_args(data, out, GLOBAL_BATCH)]
    done = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["replicas"] == 1
    return _weights(out)


@pytest.mark.slow
def test_two_workers_train_like_one_at_the_global_batch(
    data: Path, one_worker: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    via_jobset = _namespaces_work()
    logs = _run_two_workers(data, out, tmp_path, via_jobset=via_jobset)
    chief = json.loads((out / "metrics.json").read_text())
    other = json.loads((out / "replicas" / "worker-1" / "metrics.json").read_text())
    # tf.distribute.MultiWorkerMirroredStrategy is this class under another name.
    assert chief["strategy"] == other["strategy"] == "CollectiveAllReduceStrategy"
    assert chief["workers"] == other["workers"] == 2
    assert chief["weights_digest"] == other["weights_digest"]
    assert _max_difference(_weights(out), one_worker) < ATOL
    # Only the chief logs to MLflow (here down: its records wait in the spool).
    assert (out / "mlflow-spool" / "spool.json").is_file()
    assert json.loads((out / "mlflow_run.json").read_text())["pending"] > 0
    assert not list((out / "replicas").rglob("mlflow*"))
    if via_jobset:  # the workers found each other by their JobSet names
        assert "vitpcm-train-test-0123456789-node-0-1.vitpcm-train-test-0123456789" in logs[0]
    else:
        warnings.warn(
            "no user/mount namespaces (unshare -rm): the workers ran with a plain TF_CONFIG, "
            "the JobSet names were not resolved",
            stacklevel=1,
        )
