"""A real MLflow tracking server for tests: ``mlflow server`` on 127.0.0.1, artifacts in S3.

The server keeps runs and the model registry in SQLite and proxies artifacts
(``--serve-artifacts``) to ``s3://<bucket>/mlflow`` on the moto endpoint of the
``s3_server`` fixture, the same shape as the in-cluster deployment (PostgreSQL aside).

API::

    from helpers.mlflow_server import mlflow_server  # noqa: F401  (pytest fixture)

    def test_something(mlflow_server):      # started once per test process
        mlflow_server.uri                   # "http://127.0.0.1:<port>"
        mlflow_server.client()              # MlflowClient bound to it
        with mlflow_server.outage():        # killed inside the block, restarted after it
            ...
        mlflow_server.stop(); mlflow_server.start()   # the same, by hand

A restart reuses the port, the SQLite file and the bucket, so a client sees the same
server come back. Start-up takes 20-60 s on a busy 2-core machine (importing MLflow and
its web app twice: the CLI, then uvicorn), which is why the fixture is session-scoped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.s3_server import S3Server, s3_server  # noqa: F401  (fixture dependency)

_START_TIMEOUT_S = 240.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _mlflow_command() -> list[str]:
    script = Path(sys.executable).with_name("mlflow")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlflow"]


class MlflowServer:
    """A stoppable, restartable ``mlflow server`` subprocess.

    Args:
        workdir: folder for the SQLite database and the server log.
        s3: the S3 endpoint and bucket that receive artifacts.
        port: the port (a free one by default); kept across restarts.
    """

    def __init__(self, workdir: Path, s3: S3Server, port: int | None = None) -> None:
        self.workdir = workdir
        self.s3 = s3
        self.port = port or _free_port()
        self.backend_uri = f"sqlite:///{workdir / 'mlflow.db'}"
        self.artifacts_destination = s3.uri("mlflow")
        self.log_path = workdir / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """The tracking URI."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """The server's environment: S3 credentials and endpoint, fast start."""
        env = dict(os.environ)
        env.update(self.s3.env())
        env["MLFLOW_S3_ENDPOINT_URL"] = self.s3.endpoint
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.pop("MLFLOW_TRACKING_URI", None)
        return env

    def command(self) -> list[str]:
        return [
            *_mlflow_command(),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            self.artifacts_destination,
        ]

    def start(self, timeout: float = _START_TIMEOUT_S) -> None:
        """Start the server and wait until ``/health`` answers."""
        import requests

        if self.running:
            return
        log = open(self.log_path, "ab")  # noqa: SIM115  (the child owns it)
        # A session of its own, so stop() can signal the CLI and its uvicorn worker together.
        self._proc = subprocess.Popen(
            self.command(),
            env=self.env(),
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with code {self._proc.returncode}; log:\n"
                    + self.log_path.read_text(errors="replace")[-4000:]
                )
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.uri} within {timeout:.0f} s")

    def stop(self, kill: bool = False) -> None:
        """Stop the server (``kill``: SIGKILL, like a crashed pod) and wait for the port."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        sig = signal.SIGKILL if kill else signal.SIGTERM
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the worker may linger a moment after the CLI
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
            except OSError:
                return
            time.sleep(0.2)

    @contextlib.contextmanager
    def outage(self, kill: bool = True) -> Iterator[None]:
        """Take the server down for the block; it is up again afterwards, even on failure."""
        self.stop(kill=kill)
        try:
            yield
        finally:
            self.start()

    def client(self) -> Any:
        """An ``MlflowClient`` for this server."""
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


# Test modules each import the fixture, and pytest would then start one server per module;
# one per process is enough (start-up is the slow part), so the first request starts it.
_SHARED: MlflowServer | None = None


@pytest.fixture(scope="session")
def mlflow_server(
    s3_server: S3Server,  # noqa: F811  (the imported fixture)
    tmp_path_factory: pytest.TempPathFactory,
    pytestconfig: pytest.Config,
) -> MlflowServer:
    """One MLflow server (SQLite + S3 artifacts on moto) for the whole test session."""
    global _SHARED
    if _SHARED is None:
        bucket = s3_server.new_bucket("mlflow-artifacts")
        _SHARED = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), bucket)
        pytestconfig.add_cleanup(_SHARED.stop)
    _SHARED.start()  # no-op while running; brings it back if a test left it down
    return _SHARED
