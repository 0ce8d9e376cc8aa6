"""``make submit`` / ``make schedule`` against a recording kfp.Client, and the TFJob launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import kfp
import pytest

from components import tfjob
from pipeline import schedule as schedule_mod
from pipeline import submit as submit_mod
from pipeline.compile import compile_pipeline
from vitpcm.errors import ConfigError


class RecordingClient:
    """Stands in for ``kfp.Client``: records every call, answers like a fresh server."""

    instances: ClassVar[list[RecordingClient]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.init = kwargs
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.pipelines: dict[str, str] = {}
        self.versions: dict[str, list[str]] = {}
        RecordingClient.instances.append(self)

    def _record(self, call: str, /, **kwargs: Any) -> None:
        self.calls.append((call, kwargs))

    def get_pipeline_id(self, name: str) -> str | None:
        self._record("get_pipeline_id", name=name)
        return self.pipelines.get(name)

    def upload_pipeline(self, **kwargs: Any) -> Any:
        self._record("upload_pipeline", **kwargs)
        self.pipelines[kwargs["pipeline_name"]] = "pipe-1"
        self.versions["pipe-1"] = []
        return SimpleNamespace(pipeline_id="pipe-1")

    def list_pipeline_versions(self, **kwargs: Any) -> Any:
        self._record("list_pipeline_versions", **kwargs)
        wanted = json.loads(kwargs["filter"])["predicates"][0]["stringValue"]
        found = [
            SimpleNamespace(pipeline_version_id=f"ver-{i}", display_name=name)
            for i, name in enumerate(self.versions[kwargs["pipeline_id"]])
            if name == wanted
        ]
        return SimpleNamespace(pipeline_versions=found or None)

    def upload_pipeline_version(self, **kwargs: Any) -> Any:
        self._record("upload_pipeline_version", **kwargs)
        versions = self.versions[kwargs["pipeline_id"]]
        versions.append(kwargs["pipeline_version_name"])
        return SimpleNamespace(pipeline_version_id=f"ver-{len(versions) - 1}")

    def create_experiment(self, **kwargs: Any) -> Any:
        self._record("create_experiment", **kwargs)
        return SimpleNamespace(experiment_id="exp-1")

    def run_pipeline(self, **kwargs: Any) -> Any:
        self._record("run_pipeline", **kwargs)
        return SimpleNamespace(run_id="run-1")

    def create_recurring_run(self, **kwargs: Any) -> Any:
        self._record("create_recurring_run", **kwargs)
        return SimpleNamespace(recurring_run_id="rec-1")

    def called(self, name: str) -> list[dict[str, Any]]:
        return [kwargs for call, kwargs in self.calls if call == name]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(compile_pipeline(tmp_path_factory.mktemp("pkg") / "vitpcm_pipeline.yaml"))


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> type[RecordingClient]:
    RecordingClient.instances = []
    monkeypatch.setattr(kfp, "Client", RecordingClient)
    monkeypatch.setenv("KFP_HOST", "http://kfp.example:8080")
    monkeypatch.setenv("KFP_NAMESPACE", "team-a")
    monkeypatch.setenv("KFP_TOKEN", "t0ken")
    return RecordingClient


def test_submit_uploads_a_version_and_starts_a_typed_run(
    client: type[RecordingClient], package: str, capsys: pytest.CaptureFixture
) -> None:
    rc = submit_mod.main(
        [
            "--package",
            package,
            "--param",
            "epochs=3",
            "--param",
            "multi_worker=true",
            "--param",
            "dataset=coco14",
            "--run-name",
            "nightly",
        ]
    )
    assert rc == 0
    (kfp_client,) = client.instances
    assert kfp_client.init == {
        "host": "http://kfp.example:8080",
        "namespace": "team-a",
        "existing_token": "t0ken",
    }
    (upload,) = kfp_client.called("upload_pipeline")
    assert upload["pipeline_package_path"] == package
    assert upload["pipeline_name"] == "vitpcm-wsss"
    (version,) = kfp_client.called("upload_pipeline_version")
    assert version["pipeline_version_name"] == submit_mod.version_name_for(package)
    (run,) = kfp_client.called("run_pipeline")
    assert run == {
        "experiment_id": "exp-1",
        "job_name": "nightly",
        "params": {"epochs": 3, "multi_worker": True, "dataset": "coco14"},
        "pipeline_id": "pipe-1",
        "version_id": "ver-0",
    }
    assert "run-1" in capsys.readouterr().out


def test_submitting_the_same_package_twice_reuses_its_version(
    client: type[RecordingClient], package: str
) -> None:
    fake = RecordingClient()
    submit_mod.submit(package, client=fake)
    submit_mod.submit(package, client=fake)
    assert len(fake.called("upload_pipeline")) == 1
    assert len(fake.called("upload_pipeline_version")) == 1
    runs = fake.called("run_pipeline")
    assert [r["version_id"] for r in runs] == ["ver-0", "ver-0"]


def test_submit_without_kfp_host_names_the_variable(
    client: type[RecordingClient],
    package: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.delenv("KFP_HOST")
    assert submit_mod.main(["--package", package]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: KFP_HOST is not set")
    assert not client.instances


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("epochs=three", "epochs expects a number"),
        ("multi_worker=maybe", "multi_worker expects true or false"),
        ("nope=1", "unknown pipeline parameter 'nope'"),
        ("epochs", "is not KEY=VALUE"),
    ],
)
def test_bad_parameters_are_refused_before_contacting_the_server(
    client: type[RecordingClient], package: str, param: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        submit_mod.submit(package, [param])
    assert not client.instances


def test_missing_package_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="make compile-pipeline"):
        submit_mod.read_package(tmp_path / "nope.yaml")


def test_schedule_creates_a_recurring_run(
    client: type[RecordingClient], package: str, capsys: pytest.CaptureFixture
) -> None:
    rc = schedule_mod.main(
        ["--cron", "0  0 3 * * 1", "--package", package, "--param", "gpus=2", "--name", "weekly"]
    )
    assert rc == 0
    (kfp_client,) = client.instances
    (job,) = kfp_client.called("create_recurring_run")
    assert job["cron_expression"] == "0 0 3 * * 1"
    assert job["job_name"] == "weekly"
    assert job["params"] == {"gpus": 2}
    assert (job["pipeline_id"], job["version_id"]) == ("pipe-1", "ver-0")
    assert job["max_concurrency"] == 1
    assert job["no_catchup"] is True
    assert job["enabled"] is True
    assert kfp_client.called("create_experiment") == [{"name": "vitpcm"}]
    assert "rec-1" in capsys.readouterr().out


def test_five_field_cron_is_refused_with_the_six_field_form(
    client: type[RecordingClient], package: str, capsys: pytest.CaptureFixture
) -> None:
    assert schedule_mod.main(["--cron", "0 3 * * 1", "--package", package]) == 2
    err = capsys.readouterr().err
    assert "5 fields" in err
    assert "'0 0 3 * * 1'" in err
    assert not client.instances


@pytest.mark.parametrize(
    "cron", ["0 0 3 * * 1", "*/30 * * * * *", "0 15 10 ? * MON-FRI", "0 0 0 1,15 JAN-JUN ?"]
)
def test_valid_crons(cron: str) -> None:
    assert schedule_mod.validate_cron(cron) == cron


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("0 0 3 * *  1 2", "7 fields"),
        ("0 60 3 * * 1", "minute value '60' is out of range 0-59"),
        ("0 0 25 * * 1", "hour value '25'"),
        ("0 0 3 * * 8", "day of week value '8'"),
        ("0 0 3 0 * *", "day of month value '0'"),
        ("0 0 3 * FOO *", "month value 'FOO'"),
        ("0 0 5-3 * * *", "reversed"),
        ("? 0 3 * * *", "only allowed in the day fields"),
        ("0 0 3 * * 1/0", "step must be at least 1"),
        ("0 0 3 * * @", "cannot read the day of week field"),
    ],
)
def test_invalid_crons(cron: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        schedule_mod.validate_cron(cron)


# ----------------------------------------------------------------------------- TFJob launcher


class FakeCustomObjects:
    """CustomObjectsApi stand-in: the job goes Created -> Running -> ``final``."""

    def __init__(self, final: str = "Succeeded", on_success: Any = None) -> None:
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.polls = 0
        self.final = final
        self.on_success = on_success

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("kubeflow.org", "v1", "tfjobs")
        self.created.append(body)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.polls += 1
        states = ["Created", "Running", self.final]
        state = states[min(self.polls - 1, 2)]
        if state == "Succeeded" and self.on_success:
            self.on_success()
        return {
            "status": {
                "conditions": [
                    {"type": s, "status": "True" if s == state else "False", "message": s}
                    for s in states[: min(self.polls, 3)]
                ]
            }
        }

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted.append(name)


def test_tfjob_manifest() -> None:
    manifest = tfjob.tfjob_manifest(
        name="vitpcm-train-abc",
        namespace="team-a",
        image="reg/vitpcm-gpu:1",
        command=tfjob.train_command("voc12_vit_b16", "s3://b/d", "s3://b/o", ["train.lr=1e-4"]),
        workers=4,
        gpus_per_worker=2,
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        env_secrets=["vitpcm-s3"],
        owner={"name": "launcher-pod", "uid": "u-1"},
    )
    assert (manifest["apiVersion"], manifest["kind"]) == ("kubeflow.org/v1", "TFJob")
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    worker = manifest["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 4
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "tensorflow"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert container["envFrom"] == [{"secretRef": {"name": "vitpcm-s3"}}]
    assert container["command"] == [
        "vitpcm", "train", "-c", "voc12_vit_b16", "--data", "s3://b/d", "--out", "s3://b/o",
        "--set", "train.lr=1e-4", "--no-progress",
    ]  # fmt: skip
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    with pytest.raises(ConfigError, match="workers"):
        tfjob.tfjob_manifest(
            name="x", namespace="n", image="i", command=["c"], workers=0, gpus_per_worker=1
        )


def test_artifact_and_output_uris() -> None:
    assert tfjob.artifact_s3_uri("minio://mlpipeline/v2/a/tfrecords") == (
        "s3://mlpipeline/v2/a/tfrecords"
    )
    assert tfjob.artifact_s3_uri("s3://bucket/x") == "s3://bucket/x"
    with pytest.raises(ConfigError, match="multi_worker=false"):
        tfjob.artifact_s3_uri("gs://bucket/x")
    assert tfjob.training_out_uri("s3://vitpcm/runs/", "r1") == "s3://vitpcm/runs/r1/train"
    with pytest.raises(ConfigError, match="checkpoint_root"):
        tfjob.training_out_uri("", "r1")
    assert tfjob.job_name("0F3A_9b") == "vitpcm-train-0f3a-9b"
    assert len(tfjob.job_name("x" * 100)) == 63


def test_run_training_tfjob_waits_and_collects_outputs(tmp_path: Path) -> None:
    out = tmp_path / "work" / "train"
    model_dir = tmp_path / "model"
    model_dir.mkdir()

    def chief_finishes() -> None:
        out.mkdir(parents=True, exist_ok=True)
        for name in tfjob.OUTPUT_FILES:
            (out / name).write_text(name)
        (out / "metrics.json").write_text(json.dumps({"miou": 0.4, "best_epoch": 2}))

    api = FakeCustomObjects(on_success=chief_finishes)
    result = tfjob.run_training_tfjob(
        run_id="run-9",
        image="img",
        config="synthetic",
        overrides=[],
        data_uri="s3://b/data",
        out_uri=str(out),
        model_dir=str(model_dir),
        workers=2,
        gpus_per_worker=1,
        poll_s=0.0,
        api=api,
        namespace="team-a",
    )
    assert result == {"miou": 0.4, "best_epoch": 2}
    assert api.created[0]["metadata"]["name"] == "vitpcm-train-run-9"
    assert api.polls == 3
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(tfjob.OUTPUT_FILES)


def test_failed_tfjob_raises_with_the_log_command() -> None:
    api = FakeCustomObjects(final="Failed")
    with pytest.raises(tfjob.TFJobError, match="kubectl logs -n ns"):
        tfjob.wait_for_tfjob(api, "ns", "job", timeout_s=60, poll_s=0, sleep=lambda s: None)


def test_tfjob_timeout_deletes_the_job() -> None:
    api = FakeCustomObjects(final="Running")
    ticks = iter(range(0, 10_000, 100))
    with pytest.raises(tfjob.TFJobError, match="did not finish"):
        tfjob.wait_for_tfjob(
            api,
            "ns",
            "job",
            timeout_s=250,
            poll_s=0,
            sleep=lambda s: None,
            clock=lambda: next(ticks),
        )
    assert api.deleted == ["job"]


def test_existing_tfjob_is_reused_and_missing_operator_is_explained() -> None:
    from kubernetes.client.exceptions import ApiException

    class Conflict(FakeCustomObjects):
        def __init__(self, status: int) -> None:
            super().__init__()
            self.status = status

        def create_namespaced_custom_object(self, *args: Any) -> None:
            raise ApiException(status=self.status, reason="x")

    manifest = {"metadata": {"name": "j", "namespace": "ns"}}
    tfjob.create_or_attach(Conflict(409), manifest)  # a retried launcher attaches
    with pytest.raises(tfjob.TFJobError, match="Training Operator"):
        tfjob.create_or_attach(Conflict(404), manifest)
    with pytest.raises(tfjob.TFJobError, match="RBAC"):
        tfjob.create_or_attach(Conflict(403), manifest)


def test_launcher_helpers_import_inside_a_running_step() -> None:
    """In a step kfp offers no dsl.component; the launcher still imports its helpers."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "_KFP_RUNTIME": "true", "PYTHONPATH": str(repo)}
    code = "import components.tfjob as t; print(t.job_name('R1'))"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "vitpcm-train-r1"
