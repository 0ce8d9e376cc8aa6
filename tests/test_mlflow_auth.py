"""The shipped MLflow server's basic auth, run for real: `mlflow server --app-name basic-auth`.

The server is started on 127.0.0.1 with what manifests/ gives the in-cluster one: the
Deployment's ``--app-name``, its environment (the admin user from the ``vitpcm-mlflow``
Secret's keys, the Flask key from ``vitpcm-mlflow-server``) and the ``mlflow-auth``
ConfigMap's ``basic_auth.ini`` -- only the auth database path is moved from the volume to a
temporary folder. Then: no credentials 401, the pipeline's credentials 200, a wrong password
401, ``/health`` open for the probes, and the pipeline's own client logs with the Secret's
keys while an anonymous caller cannot delete its run.
"""

from __future__ import annotations

import configparser
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from localrun import services
from pipeline import cluster

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
USER = "vitpcm-pipeline"
PASSWORD = "correct-horse-battery-staple"  # a throwaway server's


def _deployment_container() -> dict[str, Any]:
    deployment = yaml.safe_load((MANIFESTS / "mlflow-deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _auth_ini() -> configparser.ConfigParser:
    config_map = yaml.safe_load((MANIFESTS / "mlflow-auth-configmap.yaml").read_text())
    ini = configparser.ConfigParser()
    ini.read_string(config_map["data"]["basic_auth.ini"])
    return ini


class AuthMlflowServer(services.MlflowServer):
    """The local MLflow server, with the manifest's basic-auth app and environment."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, artifacts_destination=str(workdir / "artifacts"))
        container = _deployment_container()
        self.app_name = dict(a.partition("=")[::2] for a in container["args"])["--app-name"]
        ini = _auth_ini()
        assert ini["mlflow"]["database_uri"] == "sqlite:////mlflow/basic_auth.db"
        ini["mlflow"]["database_uri"] = f"sqlite:///{workdir / 'basic_auth.db'}"
        self.ini_path = workdir / "basic_auth.ini"
        workdir.mkdir(parents=True, exist_ok=True)
        with self.ini_path.open("w") as handle:
            ini.write(handle)
        secrets_by_name = {
            cluster.MLFLOW_SECRET: {
                "MLFLOW_TRACKING_USERNAME": USER,
                "MLFLOW_TRACKING_PASSWORD": PASSWORD,
            },
            "vitpcm-mlflow-server": {"MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)},
        }
        self.manifest_env: dict[str, str] = {}
        for entry in container["env"]:
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["name"] in secrets_by_name:
                self.manifest_env[entry["name"]] = secrets_by_name[ref["name"]][ref["key"]]
            elif "value" in entry and entry["name"] != "HOME":
                self.manifest_env[entry["name"]] = entry["value"]
        assert self.manifest_env["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow-auth/basic_auth.ini"
        self.manifest_env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.ini_path)

    def env(self) -> dict[str, str]:
        env = super().env()
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(name, None)
        env.update(self.manifest_env)
        return env

    def command(self) -> list[str]:
        return [*super().command(), "--app-name", self.app_name]


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthMlflowServer]:
    server = AuthMlflowServer(tmp_path_factory.mktemp("mlflow-auth"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


@pytest.mark.slow
def test_requests_need_the_pipelines_credentials(auth_server: AuthMlflowServer) -> None:
    url = auth_server.uri + SEARCH
    anonymous = requests.get(url, timeout=30)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
    assert requests.get(url, auth=(USER, PASSWORD), timeout=30).status_code == 200
    assert requests.get(url, auth=(USER, "wrong-password-123"), timeout=30).status_code == 401
    assert requests.get(url, auth=("someone-else", PASSWORD), timeout=30).status_code == 401
    # The kubelet's probes carry no credentials.
    assert requests.get(auth_server.uri + "/health", timeout=30).status_code == 200


@pytest.mark.slow
def test_pipeline_client_logs_and_anonymous_callers_cannot_delete(
    auth_server: AuthMlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    # What the train and register steps get from the vitpcm-mlflow Secret.
    for key, value in zip(cluster.MLFLOW_SECRET_KEYS, (USER, PASSWORD), strict=True):
        monkeypatch.setenv(key, value)
    client = MlflowClient(tracking_uri=auth_server.uri)
    experiment_id = client.create_experiment("auth-check")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "miou", 0.5)

    anonymous = requests.post(
        auth_server.uri + "/api/2.0/mlflow/runs/delete",
        json={"run_id": run.info.run_id},
        timeout=30,
    )
    assert anonymous.status_code == 401
    assert client.get_run(run.info.run_id).info.lifecycle_stage == "active"
    assert client.get_run(run.info.run_id).data.metrics == {"miou": 0.5}


def test_template_password_cannot_bootstrap_an_admin() -> None:
    """The Secret template's placeholder is refused by MLflow's own bootstrap check."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth import _validate_bootstrap_admin_password

    template = yaml.safe_load((MANIFESTS / "secrets" / "vitpcm-mlflow.yaml").read_text())
    placeholder = template["stringData"]["MLFLOW_TRACKING_PASSWORD"]
    with pytest.raises(MlflowException, match="at least 12 characters"):
        _validate_bootstrap_admin_password("admin", placeholder)
    _validate_bootstrap_admin_password("admin", PASSWORD)  # a real one passes


@pytest.mark.slow
def test_wrong_credentials_keep_records_pending_until_fixed(
    auth_server: AuthMlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vitpcm.errors import TrackingError
    from vitpcm.tracking import replay_spool
    from vitpcm.tracking.spool import Spool

    spool = Spool(tmp_path / "mlflow-spool", tracking_uri=auth_server.uri)
    spool.append("start_run", {"experiment": "auth-pending", "tags": {}})
    spool.append("params", {"params": {"train.lr": "0.001"}})
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "a-wrong-password")
    with pytest.raises(TrackingError, match="2 record\\(s\\) still pending"):
        replay_spool(tmp_path, progress=False)
    assert spool.load_state().rejected == {}  # an operator can fix credentials: not refused

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    assert replay_spool(tmp_path, progress=False) == 2
    run = auth_server.client().get_run(spool.load_state().run_id)
    assert run.data.params == {"train.lr": "0.001"}
