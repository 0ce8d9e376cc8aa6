"""A real MLflow tracking server for tests: a pytest fixture over :mod:`localrun.services`.

``mlflow server`` on 127.0.0.1 with runs and the model registry in SQLite and artifacts
proxied (``--serve-artifacts``) to ``s3://<bucket>/mlflow`` on the moto endpoint of the
``s3_server`` fixture: :class:`localrun.services.MlflowServer`, the server of
``make run-local``, set up like the in-cluster deployment (PostgreSQL aside).

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
from collections.abc import Iterator

import pytest

from helpers.s3_server import S3Server, s3_server  # noqa: F401  (fixture dependency)
from localrun import services


class MlflowServer(services.MlflowServer):
    """:class:`localrun.services.MlflowServer` with outages on demand."""

    @contextlib.contextmanager
    def outage(self, kill: bool = True) -> Iterator[None]:
        """Take the server down for the block; it is up again afterwards, even on failure."""
        self.stop(kill=kill)
        try:
            yield
        finally:
            self.start()


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
