"""``make submit`` / ``make schedule`` against a recording kfp.Client."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import kfp
import pytest
import yaml

from pipeline import schedule as schedule_mod
from pipeline import submit as submit_mod
from pipeline.compile import compile_pipeline
from vitpcm.errors import ConfigError

REAL_CLIENT = kfp.Client


class RecordingClient:
    """Stands in for ``kfp.Client``: records every call (checked against the real client's
    signature, so a misspelt or unknown argument fails), answers like a fresh server."""

    instances: ClassVar[list[RecordingClient]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.init = kwargs
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.pipelines: dict[str, str] = {}
        self.versions: dict[str, list[str]] = {}
        RecordingClient.instances.append(self)

    def _record(self, call: str, /, **kwargs: Any) -> None:
        inspect.signature(getattr(REAL_CLIENT, call)).bind(self, **kwargs)
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
            "distributed=tfjob",
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
        "params": {"epochs": 3, "distributed": "tfjob", "dataset": "coco14"},
        "pipeline_id": "pipe-1",
        "version_id": "ver-0",
        # The ServiceAccount of manifests/rbac.yaml, so its RBAC is the one in force.
        "service_account": "vitpcm-pipeline",
    }
    assert "run-1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("env", "flag", "expected"),
    [
        (None, None, "vitpcm-pipeline"),
        ("team-sa", None, "team-sa"),
        ("team-sa", "other-sa", "other-sa"),
        ("team-sa", "", None),  # the profile's default-editor
    ],
)
def test_runs_use_the_chosen_service_account(
    client: type[RecordingClient],
    package: str,
    monkeypatch: pytest.MonkeyPatch,
    env: str | None,
    flag: str | None,
    expected: str | None,
) -> None:
    if env is not None:
        monkeypatch.setenv("KFP_SERVICE_ACCOUNT", env)
    argv = ["--package", package] + ([] if flag is None else ["--service-account", flag])
    assert submit_mod.main(argv) == 0
    assert schedule_mod.main(["--cron", "0 0 3 * * 1", *argv]) == 0
    (submitted,) = client.instances[0].called("run_pipeline")
    (scheduled,) = client.instances[1].called("create_recurring_run")
    assert submitted["service_account"] == scheduled["service_account"] == expected


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
        ("crf=maybe", "crf expects true or false"),
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
    assert job["service_account"] == "vitpcm-pipeline"
    assert kfp_client.called("create_experiment") == [{"name": "vitpcm"}]
    assert "rec-1" in capsys.readouterr().out


def _tasks(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    spec = docs[0]
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def test_the_recurring_run_fetches_the_data_every_time(
    client: type[RecordingClient], package: str
) -> None:
    """KFP's cache never expires: a schedule uploads a version with the data steps uncached."""
    fake = RecordingClient()
    schedule_mod.schedule("0 0 3 * * 1", package, client=fake)
    (upload,) = fake.called("upload_pipeline")
    uploaded = Path(upload["pipeline_package_path"])
    assert uploaded.name == "vitpcm_pipeline-recurring.yaml"
    original = list(yaml.safe_load_all(Path(package).read_text()))
    recurring = list(yaml.safe_load_all(uploaded.read_text()))
    for step in ("download-data", "convert-data"):
        assert _tasks(original)[step]["cachingOptions"] == {"enableCache": True}
        assert _tasks(recurring)[step]["cachingOptions"] == {}
        _tasks(recurring)[step]["cachingOptions"] = {"enableCache": True}
    assert recurring == original  # nothing else changed, the platform spec included
    # Its own version (its content differs), reused when scheduled again.
    (version,) = fake.called("upload_pipeline_version")
    assert version["pipeline_version_name"] == submit_mod.version_name_for(uploaded)
    assert version["pipeline_version_name"] != submit_mod.version_name_for(package)
    # --cache-data: the package as compiled.
    schedule_mod.schedule("0 0 3 * * 1", package, client=fake, cache_data=True)
    assert fake.called("upload_pipeline_version")[-1]["pipeline_package_path"] == package


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
