"""Local stand-ins for the cluster's object store and tracking server.

* :class:`S3Endpoint` -- ``moto_server``: an in-memory S3 API on 127.0.0.1 in place of MinIO.
* :class:`MlflowServer` -- ``mlflow server`` set up like ``manifests/mlflow-deployment.yaml``:
  SQLite backend store, artifacts proxied (``--serve-artifacts``) to ``s3://<bucket>/mlflow``,
  ``--allowed-hosts``, background jobs off. Clients log artifacts through the server
  (``mlflow-artifacts:/`` URIs), so they need no S3 credentials, as in the cluster.
* :class:`S3Bucket` -- one bucket of an endpoint, with the few boto3 calls callers need.

``make run-local`` runs both for its run folder (:mod:`localrun.mlflow_store`); the tests use
them through the fixtures in ``tests/helpers/``. Each server runs in a process group of its
own: ``stop`` ends the CLI and its workers together, and a Ctrl-C in the terminal reaches
only the caller, which then stops them in order. Both work as context managers.

(Over 450 lines: the two servers share their process handling here, and the bucket is what
both are set up with.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from localrun.processes import stop_group
from vitpcm.errors import ConfigError, StorageError, TrackingError, VitpcmError

HOST = "127.0.0.1"
DEFAULT_MLFLOW_PORT = 5000  # MLflow's own default, so a bookmarked run URL keeps working
# moto accepts any credentials; these only have to be set, for boto3 and tensorflow-io.
ACCESS_KEY = "vitpcm-local-access-key"
SECRET_KEY = "vitpcm-local-secret-key"
REGION = "us-east-1"
# Where the MLflow server puts proxied artifacts: s3://<bucket>/mlflow.
ARTIFACTS_PREFIX = "mlflow"
# The manifest's list minus the in-cluster Service names: the local server is only ever
# reached as localhost / 127.0.0.1 (any port, for a browser behind an SSH tunnel).
ALLOWED_HOSTS = "localhost,localhost:*,127.0.0.1,127.0.0.1:*"
DB_FILE = "mlflow.db"
MLFLOW_LOG = "mlflow-server.log"
# Importing MLflow and its web app (the CLI, then uvicorn) takes 20-60 s on a busy 2-core box.
MLFLOW_START_TIMEOUT_S = 240.0
S3_START_TIMEOUT_S = 60.0
_LOG_TAIL_CHARS = 3000


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = HOST) -> bool:
    """Whether a server could bind ``host:port`` (as uvicorn does: with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _check_port(port: int, what: str, option: str) -> None:
    if not port_is_free(port):
        raise ConfigError(
            f"port {port} on {HOST} is busy, so the {what} cannot start there: stop what "
            f"listens on it (`ss -ltnp 'sport = :{port}'` shows it) or pass {option} "
            "with another port (0 picks a free one)"
        )


def log_tail(path: Path | None, chars: int = _LOG_TAIL_CHARS) -> str:
    """The end of a log file ('' when there is none)."""
    if path is None:
        return "(no log kept)"
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


def _console_script(name: str, module: str) -> list[str]:
    """The venv's console script next to this interpreter, else ``python -m module``."""
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return [str(script)]
    found = shutil.which(name)
    if found:
        return [found]
    return [sys.executable, "-m", module]


def _wait_port_closed(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                pass
        except OSError:
            return
        time.sleep(0.2)


class _ServerProcess:
    """A server subprocess in its own session, logging to a file."""

    name = "server"

    def __init__(self, port: int | None, log_path: Path | None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.cwd: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the process is alive (it may not answer yet)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process (group) id while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def _ready(self) -> bool:
        raise NotImplementedError

    def _error(self, message: str) -> VitpcmError:
        raise NotImplementedError

    def launch(self) -> None:
        """Start the process without waiting for it to answer (see :meth:`wait_ready`)."""
        if self.running:
            return
        with contextlib.ExitStack() as stack:
            output: Any = subprocess.DEVNULL
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                output = stack.enter_context(open(self.log_path, "ab"))
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                output.write(f"--- {stamp} {self.name} start\n".encode())
                output.flush()
            # A session of its own: stop() signals the CLI and its workers together, and a
            # Ctrl-C typed in the terminal goes to the caller only, which then stops us.
            self._proc = subprocess.Popen(
                self.command(),
                env=self.env(),
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float) -> None:
        """Wait until the server answers; stop it and raise when it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None:
                raise self._error("was stopped while starting")
            code = self._proc.poll()
            if code is not None:
                self.stop()
                raise self._error(
                    f"exited with code {code} while starting; the end of {self.log_path}:\n"
                    + log_tail(self.log_path)
                )
            if self._ready():
                return
            time.sleep(0.3)
        self.stop()
        raise self._error(
            f"did not answer on port {self.port} within {timeout:.0f} s (a very busy machine? "
            f"try again); the end of {self.log_path}:\n" + log_tail(self.log_path)
        )

    def stop(self, kill: bool = False) -> None:
        """Stop the server (``kill``: SIGKILL, like a crashed pod) and wait for its port."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_group(proc, kill)
        _wait_port_closed(self.port)

    def __enter__(self) -> Any:
        self.start()  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class S3Bucket:
    """One bucket of a running S3 endpoint.

    Attributes:
        endpoint: ``http://host:port``.
        bucket: the bucket's name.
    """

    endpoint: str
    bucket: str

    def uri(self, prefix: str = "") -> str:
        """``s3://bucket/prefix`` (just the bucket when ``prefix`` is empty)."""
        prefix = prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def env(self) -> dict[str, str]:
        """The S3 variables the library, tensorflow-io and MLflow read for this endpoint."""
        from vitpcm.storage import s3_environment

        credentials = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        return s3_environment({"S3_ENDPOINT": self.endpoint, "AWS_REGION": REGION, **credentials})

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def new_bucket(self, name: str | None = None) -> S3Bucket:
        """Create a bucket (random name by default; an existing one is kept) and return it."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return replace(self, bucket=name)

    def list_keys(self, prefix: str = "") -> list[str]:
        """Sorted keys in this bucket starting with ``prefix``."""
        paginator = self.client().get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix.lstrip("/")):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def read(self, key: str) -> bytes:
        """Bytes of one object."""
        return self.client().get_object(Bucket=self.bucket, Key=key.lstrip("/"))["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        """Write one object."""
        self.client().put_object(Bucket=self.bucket, Key=key.lstrip("/"), Body=data)

    def download_prefix(self, prefix: str, dest: Path) -> int:
        """Copy every object under ``prefix/`` to ``dest`` (same relative paths).

        Files already there with the same size are skipped; each file is written under a
        temporary name and renamed, so an interrupted copy leaves no torn file.

        Returns:
            How many files were written.
        """
        client = self.client()
        base = prefix.strip("/") + "/"
        written = 0
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
            for item in page.get("Contents", []):
                relative = item["Key"][len(base) :]
                if not relative or relative.endswith("/"):
                    continue
                target = dest / relative
                if target.is_file() and target.stat().st_size == item["Size"]:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f".{target.name}.partial")
                client.download_file(self.bucket, item["Key"], str(partial))
                os.replace(partial, target)
                written += 1
        return written

    def upload_folder(self, source: Path, prefix: str) -> int:
        """Copy every file under ``source`` to ``prefix/`` (same relative paths).

        Returns:
            How many files were uploaded.
        """
        client = self.client()
        uploaded = 0
        for path in sorted(source.rglob("*")):
            if path.is_file() and not path.name.endswith(".partial"):
                key = f"{prefix.strip('/')}/{path.relative_to(source).as_posix()}"
                client.upload_file(str(path), self.bucket, key)
                uploaded += 1
        return uploaded


class S3Endpoint(_ServerProcess):
    """A ``moto_server`` subprocess: a local, in-memory S3 API.

    Args:
        port: the port (a free one when None or 0).
        log_path: the server's log file (None: no log).
    """

    name = "S3 endpoint (moto_server)"

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        if port:
            _check_port(port, "S3 endpoint", "--s3-port")
        super().__init__(port, log_path)

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        base = _console_script("moto_server", "moto.server")
        return [*base, "-H", HOST, "-p", str(self.port)]

    def _ready(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 1):
            return True
        return False

    def _error(self, message: str) -> VitpcmError:
        return StorageError(f"the local S3 endpoint ({' '.join(self.command())}) {message}")

    def launch(self) -> None:
        """Start ``moto_server`` (see :meth:`_ServerProcess.launch`)."""
        if self.command()[0] == sys.executable and not _has_module("moto.server"):
            raise StorageError(
                "moto_server is not installed, so no local S3 endpoint can start: run "
                "`make setup` (it installs the dev extras, moto[server] among them)"
            )
        super().launch()

    def start(self, timeout: float = S3_START_TIMEOUT_S) -> None:
        """Start the endpoint and wait until it accepts connections."""
        self.launch()
        self.wait_ready(timeout)

    def bucket(self, name: str) -> S3Bucket:
        """A handle on bucket ``name``, created when missing."""
        return S3Bucket(self.endpoint, name).new_bucket(name)


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


class MlflowServer(_ServerProcess):
    """``mlflow server`` on 127.0.0.1: SQLite store, proxied artifacts; stoppable, restartable.

    Args:
        workdir: folder for the SQLite database (``mlflow.db``) and the server log.
        s3: the bucket that receives artifacts (under ``mlflow/``); None with
            ``artifacts_destination``.
        port: the port (a free one when None or 0); kept across restarts.
        artifacts_destination: where proxied artifacts go instead (e.g. a local folder).
        log_path: the server log (default ``workdir/mlflow-server.log``).

    A restart reuses the port, the SQLite file and the artifact store, so clients see the
    same server come back.
    """

    name = "MLflow server"

    def __init__(
        self,
        workdir: Path,
        s3: S3Bucket | None = None,
        port: int | None = None,
        *,
        artifacts_destination: str | None = None,
        log_path: Path | None = None,
    ) -> None:
        if s3 is None and artifacts_destination is None:
            raise ValueError("give the S3 bucket or an artifacts_destination")
        if port:
            _check_port(port, "MLflow server", "--mlflow-port")
        super().__init__(port, log_path or workdir / MLFLOW_LOG)
        self.workdir = workdir
        self.cwd = workdir
        self.s3 = s3
        self.backend_uri = f"sqlite:///{workdir / DB_FILE}"
        self.artifacts_destination = artifacts_destination or s3.uri(ARTIFACTS_PREFIX)  # type: ignore[union-attr]

    @property
    def uri(self) -> str:
        """The tracking URI."""
        return f"http://{HOST}:{self.port}"

    def run_url(self, experiment_id: str, run_id: str) -> str:
        """The run's page in the MLflow UI (its model-training layout)."""
        from vitpcm.tracking.naming import ui_run_url

        return ui_run_url(self.uri, experiment_id, run_id)

    def env(self) -> dict[str, str]:
        """The server's environment: S3 endpoint and credentials, fast start."""
        env = dict(os.environ)
        if self.s3 is not None:
            env.update(self.s3.env())  # MLFLOW_S3_ENDPOINT_URL included
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        # The server is not a client: a tracking URI inherited from the shell means nothing.
        env.pop("MLFLOW_TRACKING_URI", None)
        return env

    def command(self) -> list[str]:
        return [
            *_console_script("mlflow", "mlflow"),
            "server",
            "--host",
            HOST,
            "--port",
            str(self.port),
            # One worker: a laptop, not a shared deployment (the manifest runs two).
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            self.artifacts_destination,
            "--allowed-hosts",
            ALLOWED_HOSTS,
        ]

    def _ready(self) -> bool:
        import requests

        with contextlib.suppress(requests.RequestException):
            return requests.get(f"{self.uri}/health", timeout=2).status_code == 200
        return False

    def _error(self, message: str) -> VitpcmError:
        return TrackingError(f"the local MLflow server ({self.uri}) {message}")

    def start(self, timeout: float = MLFLOW_START_TIMEOUT_S) -> None:
        """Start the server and wait until ``/health`` answers."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.launch()
        self.wait_ready(timeout)

    def client(self) -> Any:
        """An ``MlflowClient`` bound to this server."""
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)
