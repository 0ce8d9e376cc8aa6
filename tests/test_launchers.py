"""The distributed-training launchers against a fake Kubernetes API server (real client).

The server validates every object against the operators' CRD schemas (Trainer v2.0 and
v2.3, Training Operator v1.9) and records each request, so the tests check what a cluster
would receive: the objects, the Istio opt-out, CPU/memory beside the GPUs, worker 0's log
in the step's output, the delete on failure, timeout and SIGTERM, the errors for a missing
operator or runtime, and that manifests/rbac.yaml grants exactly the calls made.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.launchers import kube, workers
from components.launchers.tfjob import run_tfjob, tfjob_manifest
from components.launchers.trainjob import RUNTIME_NAME, run_trainjob
from helpers.kube_api import FakeKubeAPI, load_crd, schema_errors
from vitpcm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
NS = "team-a"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
ISTIO = {"sidecar.istio.io/inject": "false"}


def _spec(gpus: int = 2, count: int = 3) -> workers.WorkerSpec:
    return workers.WorkerSpec(
        image="reg.example/vitpcm-gpu:1",
        command=workers.train_command("voc12_vit_b16", "s3://b/d", "s3://b/r/train", ["a=1"]),
        workers=count,
        gpus=gpus,
        env=(("MLFLOW_TRACKING_URI", "http://mlflow:5000"),),
    )


def _trainjob_server(version: str = "v2.3.0", runtime: bool = True) -> FakeKubeAPI:
    api = FakeKubeAPI(
        {
            "trainjobs": f"trainjob-{version}.json",
            "trainingruntimes": f"trainingruntime-{version}.json",
        },
        namespace=NS,
    )
    if runtime:
        api.add_object("trainingruntimes", {"metadata": {"name": RUNTIME_NAME}})
    return api


def _tfjob_server() -> FakeKubeAPI:
    return FakeKubeAPI({"tfjobs": "tfjob-v1.9.3.json"}, namespace=NS)


def _jobset_pods(api: FakeKubeAPI, job: str, log: list[str], running: bool = False) -> None:
    """Two workers, labelled as JobSet and the Indexed Job controller label their pods."""
    for index in range(2):
        api.add_pod(
            f"{job}-node-0-{index}",
            labels={
                "jobset.sigs.k8s.io/jobset-name": job,
                "jobset.sigs.k8s.io/replicatedjob-name": "node",
                "jobset.sigs.k8s.io/job-index": "0",
                "batch.kubernetes.io/job-completion-index": str(index),
            },
            log=log if index == 0 else ["worker 1 says hello"],
            running=running,
        )


def _tfjob_pods(api: FakeKubeAPI, job: str, log: list[str]) -> None:
    """Two workers, labelled as the Training Operator labels replica pods."""
    for index in range(2):
        api.add_pod(
            f"{job}-worker-{index}",
            labels={
                "training.kubeflow.org/job-name": job,
                "training.kubeflow.org/replica-type": "worker",
                "training.kubeflow.org/replica-index": str(index),
            },
            log=log if index == 0 else ["worker 1 says hello"],
            container="tensorflow",
        )


@pytest.fixture
def step_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment KFP gives a step: its pod's name and uid."""
    monkeypatch.setenv(kube.POD_NAME_ENV, "run-1-train-pod")
    monkeypatch.setenv(kube.POD_UID_ENV, "0b0e5a1e-uid")


OWNER = [{"apiVersion": "v1", "kind": "Pod", "name": "run-1-train-pod", "uid": "0b0e5a1e-uid"}]
RESOURCES = {
    "requests": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"},
    "limits": {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "2"},
}


@pytest.mark.parametrize("version", ["v2.0.0", "v2.3.0"])
def test_trainjob_is_created_followed_and_kept(
    version: str, step_pod: None, capsys: pytest.CaptureFixture
) -> None:
    name = workers.job_name("run-1")
    with _trainjob_server(version) as api:
        api.script("trainjobs", name, ["Created", "Created", "Complete"])
        _jobset_pods(api, name, ["epoch 1/2 loss 0.7", "epoch 2/2 loss 0.5"])
        run_trainjob(
            name=name,
            spec=_spec(),
            labels={"vitpcm/run-id": "run-1"},
            poll_s=0.2,
            apis=api.clients(),
            namespace=NS,
        )
        (manifest,) = api.created("trainjobs")  # accepted by that release's schema
        assert not api.deletes()  # a finished job holds no GPU, and goes with the run
    out = capsys.readouterr().out
    # Worker 0's log, in order, and only worker 0's.
    assert "[worker 0] epoch 1/2 loss 0.7\n[worker 0] epoch 2/2 loss 0.5\n" in out
    assert "worker 1" not in out
    assert manifest["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "TrainingRuntime",
        "name": RUNTIME_NAME,
    }
    trainer = manifest["spec"]["trainer"]
    assert trainer["numNodes"] == 3
    assert trainer["image"] == "reg.example/vitpcm-gpu:1"
    # The runtime's command (the TF_CONFIG entry point) runs these.
    assert trainer["args"][:2] == ["vitpcm", "train"] and "command" not in trainer
    assert trainer["resourcesPerNode"] == RESOURCES
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["VITPCM_NUM_WORKERS"] == "3"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert manifest["metadata"]["ownerReferences"] == OWNER
    assert manifest["metadata"]["labels"]["vitpcm/run-id"] == "run-1"


def test_tfjob_is_created_followed_and_kept(step_pod: None, capsys: pytest.CaptureFixture) -> None:
    name = workers.job_name("run-1")
    with _tfjob_server() as api:
        api.script("tfjobs", name, ["Created", "Running", "Succeeded"])
        _tfjob_pods(api, name, ["epoch 1/2 loss 0.7"])
        run_tfjob(
            name=name,
            spec=_spec(),
            node_selector={"pool": "a100"},
            tolerations=[GPU_TOLERATION],
            env_secrets=["vitpcm-s3", "vitpcm-mlflow"],
            poll_s=0.2,
            apis=api.clients(),
            namespace=NS,
        )
        (manifest,) = api.created("tfjobs")
        assert not api.deletes()
    assert "[worker 0] epoch 1/2 loss 0.7\n" in capsys.readouterr().out
    worker = manifest["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 3
    template = worker["template"]
    assert template["metadata"]["annotations"] == ISTIO
    pod = template["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "tensorflow"
    assert container["resources"] == RESOURCES
    assert container["command"][:2] == ["vitpcm", "train"]
    assert container["envFrom"] == [
        {"secretRef": {"name": "vitpcm-s3", "optional": True}},
        {"secretRef": {"name": "vitpcm-mlflow", "optional": True}},
    ]
    assert pod["nodeSelector"] == {"pool": "a100"} and pod["tolerations"] == [GPU_TOLERATION]
    assert manifest["metadata"]["ownerReferences"] == OWNER


def test_cpu_workers_ask_for_no_gpu() -> None:
    resources = _spec(gpus=0).resources()
    assert resources == {
        "requests": {"cpu": "8", "memory": "32Gi"},
        "limits": {"cpu": "16", "memory": "64Gi"},
    }


@pytest.mark.parametrize("gpus", [0, 2])
def test_gpu_placement_reaches_gpu_workers_only(gpus: int) -> None:
    # The compiled pipeline passes the cluster's GPU node labels and tolerations whatever
    # the run's gpus; CPU-only workers must not be pinned to (or wait for) GPU nodes.
    manifest = tfjob_manifest(
        name="job",
        namespace=NS,
        spec=_spec(gpus=gpus),
        node_selector={"pool": "a100"},
        tolerations=[GPU_TOLERATION],
    )
    pod = manifest["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod.get("nodeSelector") == ({"pool": "a100"} if gpus else None)
    assert pod.get("tolerations") == ([GPU_TOLERATION] if gpus else None)


def test_a_failed_job_is_deleted_and_explained() -> None:
    name = workers.job_name("run-2")
    with _trainjob_server() as api:
        api.script("trainjobs", name, ["Created", "Failed"])
        with pytest.raises(kube.LaunchError, match="failed: job is Failed"):
            run_trainjob(name=name, spec=_spec(), poll_s=0.1, apis=api.clients(), namespace=NS)
        (delete,) = api.deletes()
        assert delete.path.endswith(f"/trainjobs/{name}")
        assert delete.query["propagationPolicy"] == "Background"  # its pods go too
        assert api.objects.get(("trainjobs", name)) is None


def test_a_job_past_its_timeout_is_deleted() -> None:
    name = workers.job_name("run-3")
    with _tfjob_server() as api:
        api.script("tfjobs", name, ["Running"])
        with pytest.raises(kube.LaunchError, match="did not finish within"):
            run_tfjob(
                name=name, spec=_spec(), timeout_s=0.3, poll_s=0.1, apis=api.clients(), namespace=NS
            )
        assert [r.path.rsplit("/", 1)[-1] for r in api.deletes()] == [name]


def test_a_retried_step_follows_the_job_it_started() -> None:
    name = workers.job_name("run-4")
    with _trainjob_server() as api:
        api.add_object("trainjobs", {"metadata": {"name": name}})
        api.script("trainjobs", name, ["Created", "Complete"])
        run_trainjob(name=name, spec=_spec(), poll_s=0.1, apis=api.clients(), namespace=NS)
        posts = [r for r in api.requests if r.method == "POST"]
        assert [r.status for r in posts] == [409]  # tried once, then attached
        assert not api.deletes()


@pytest.mark.parametrize(
    ("server", "launch", "message"),
    [
        (
            lambda: FakeKubeAPI({}, namespace=NS),
            run_trainjob,
            r"TrainJob resource \(trainer.kubeflow.org/v1alpha1\) is unknown to this cluster: "
            "install Kubeflow Trainer v2",
        ),
        (
            lambda: _trainjob_server(runtime=False),
            run_trainjob,
            f"TrainingRuntime {NS}/{RUNTIME_NAME} does not exist: apply it with "
            f"`kubectl apply -k manifests/trainer -n {NS}`",
        ),
        (
            lambda: FakeKubeAPI({}, namespace=NS),
            run_tfjob,
            r"TFJob resource \(kubeflow.org/v1\) is unknown to this cluster: install the "
            "Kubeflow Training Operator v1",
        ),
    ],
)
def test_a_missing_operator_or_runtime_is_named(server: Any, launch: Any, message: str) -> None:
    with server() as api:
        with pytest.raises(kube.LaunchError, match=message):
            launch(
                name="vitpcm-train-x", spec=_spec(), poll_s=0.1, apis=api.clients(), namespace=NS
            )
        assert not api.deletes()  # nothing was created, nothing to delete


def test_an_invalid_object_is_refused_with_the_servers_reasons() -> None:
    with (
        _trainjob_server() as api,
        pytest.raises(kube.LaunchError, match="refused the TrainJob Bad_Name: 422"),
    ):
        run_trainjob(name="Bad_Name", spec=_spec(), apis=api.clients(), namespace=NS)


_SIGTERM_SCRIPT = """
import sys
from kubernetes import client
from components.launchers import workers
from components.launchers.trainjob import run_trainjob

config = client.Configuration()
config.host = sys.argv[1]
api = client.ApiClient(config)
spec = workers.WorkerSpec(image="img", command=("vitpcm", "train"), workers=2, gpus=1)
try:
    run_trainjob(name=sys.argv[2], spec=spec, poll_s=0.2, namespace="team-a",
                 apis=(client.CustomObjectsApi(api), client.CoreV1Api(api)))
except Exception as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(1)
"""


def test_sigterm_deletes_the_running_job() -> None:
    """What terminating the run in the KFP UI does to the step: its job must go."""
    name = workers.job_name("run-5")
    with _trainjob_server() as api:
        api.script("trainjobs", name, ["Created", "Running"])  # runs until stopped
        _jobset_pods(api, name, ["epoch 1/40 loss 0.9"], running=True)
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'src'}"}
        proc = subprocess.Popen(
            [sys.executable, "-c", _SIGTERM_SCRIPT, api.url, name],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()  # worker 0 is being followed: the job runs
        assert line == "[worker 0] epoch 1/40 loss 0.9\n"
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1
        assert f"error: terminated (signal 15): TrainJob {NS}/{name} deleted" in err
        (delete,) = api.deletes()
        assert delete.path.endswith(f"/trainjobs/{name}")
        assert ("trainjobs", name) not in api.objects


def _rbac_rules(role: str) -> set[tuple[str, str, str]]:
    docs = yaml.safe_load_all((REPO / "manifests" / "rbac.yaml").read_text())
    (found,) = [d for d in docs if d and d["kind"] == "Role" and d["metadata"]["name"] == role]
    rules = set()
    for rule in found["rules"]:
        assert "resourceNames" not in rule and "*" not in rule["verbs"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                rules |= {(verb, group, resource) for verb in rule["verbs"]}
    return rules


def test_rbac_grants_exactly_the_calls_the_launchers_make(step_pod: None) -> None:
    """Least privilege: every call made is granted, and nothing is granted that is not called."""
    calls: set[tuple[str, str, str]] = set()
    for launch, server, plural, final in (
        (run_trainjob, _trainjob_server, "trainjobs", "Failed"),
        (run_tfjob, _tfjob_server, "tfjobs", "Failed"),
    ):
        name = workers.job_name(f"rbac-{plural}")
        with server() as api:
            api.script(plural, name, ["Created", "Created", "Created", final])
            (_jobset_pods if plural == "trainjobs" else _tfjob_pods)(api, name, ["x"])
            with pytest.raises(kube.LaunchError):  # a failure: the delete is called too
                launch(name=name, spec=_spec(), poll_s=0.2, apis=api.clients(), namespace=NS)
            time.sleep(0.2)
            calls |= api.calls()
    assert calls == _rbac_rules("vitpcm-train-launcher")


def test_worker_names_and_uris() -> None:
    name = workers.job_name("b6b0f4cc-2f8e-4c3e-a6f0-1f0b1c9d3e21")
    assert name == workers.job_name("b6b0f4cc-2f8e-4c3e-a6f0-1f0b1c9d3e21")  # retries agree
    assert name != workers.job_name("b6b0f4cc-2f8e-4c3e-a6f0-1f0b1c9d3e22")
    # JobSet pod hostnames <name>-node-0-<index> must stay DNS labels (63 characters).
    assert len(f"{name}-node-0-999") <= 63
    assert workers.dataset_uri("minio://mlpipeline/v2/a/tfrecords") == (
        "s3://mlpipeline/v2/a/tfrecords"
    )
    assert workers.dataset_uri("s3://bucket/x") == "s3://bucket/x"
    with pytest.raises(ConfigError, match="distributed=none"):
        workers.dataset_uri("/local/folder")
    assert workers.training_out_uri("s3://vitpcm/runs/", "r1") == "s3://vitpcm/runs/r1/train"
    with pytest.raises(ConfigError, match="needs checkpoint_root"):
        workers.training_out_uri("", "r1")
    with pytest.raises(ConfigError, match="workers must be at least 1"):
        workers.WorkerSpec(image="i", command=("c",), workers=0, gpus=1)
    with pytest.raises(ConfigError, match="worker_size must be a JSON object"):
        workers.worker_spec_from_json('{"cpu": 4}', image="i", command=(), workers=1, gpus=0)


@pytest.mark.parametrize("version", ["v2.0.0", "v2.3.0"])
def test_shipped_runtime_fits_trainer(version: str) -> None:
    """manifests/trainer/ holds one TrainingRuntime valid for Trainer v2.0 and v2.3."""
    docs = [
        d
        for d in yaml.safe_load_all(
            (REPO / "manifests" / "trainer" / "tf-multiworker-runtime.yaml").read_text()
        )
        if d
    ]
    (runtime,) = docs
    crd = load_crd(f"trainingruntime-{version}.json")
    assert runtime["apiVersion"] == f"{crd['group']}/{crd['version']}"
    assert runtime["kind"] == crd["kind"] == "TrainingRuntime"
    assert runtime["metadata"]["name"] == RUNTIME_NAME
    body = {k: v for k, v in runtime.items() if k != "metadata"}
    assert schema_errors(body, crd["schema"]) == []
    (rjob,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == "node"  # Trainer fills in the container named "node" of it
    assert rjob["template"]["metadata"]["labels"] == {
        "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"
    }
    pod = rjob["template"]["spec"]["template"]
    assert pod["metadata"]["annotations"] == ISTIO
    assert pod["spec"]["automountServiceAccountToken"] is False
    (container,) = pod["spec"]["containers"]
    assert container["name"] == "node"
    assert container["command"] == ["python", "-m", "vitpcm.tf_config", "--"]
    assert {s["secretRef"]["name"] for s in container["envFrom"]} == {"vitpcm-s3", "vitpcm-mlflow"}
    # Without an mlPolicy Trainer applies neither numNodes nor resourcesPerNode.
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 1}


def test_step_modules_import_inside_a_running_step() -> None:
    """In a step kfp offers no dsl.component; the train step still imports the launchers."""
    env = {**os.environ, "_KFP_RUNTIME": "true", "PYTHONPATH": str(REPO)}
    code = (
        "import components.launchers.trainjob, components.launchers.tfjob as t, json; "
        "print(json.dumps(t.TFJOB.plural))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == "tfjobs"
