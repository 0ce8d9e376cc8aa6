"""A real local S3 endpoint for tests: a ``moto_server`` subprocess on 127.0.0.1.

API (kept stable; other test modules rely on it)::

    from helpers.s3_server import s3_server, s3_bucket  # noqa: F401  (pytest fixtures)

    def test_something(s3_server):          # session-scoped, one server for the run
        uri = s3_server.uri("runs/a")       # "s3://<bucket>/runs/a"
        s3_server.endpoint                  # "http://127.0.0.1:<port>"
        s3_server.bucket                    # bucket created at start-up
        s3_server.client()                  # boto3 S3 client bound to the endpoint
        s3_server.list_keys("runs/a")       # sorted keys under a prefix
        s3_server.read("runs/a/x.json")     # object bytes
        s3_server.put("runs/a/x.json", b"") # write an object
        s3_server.env()                     # the S3 env vars, for subprocess env=
        s3_server.new_bucket()              # a fresh, empty bucket -> S3Server for it

    def test_other(s3_bucket):              # function-scoped: a fresh empty bucket,
        s3_bucket.uri("out")                # same endpoint, same methods

While the session fixture is alive ``S3_ENDPOINT``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and ``AWS_REGION`` are set in ``os.environ`` (restored
afterwards), so code under test and subprocesses started with the inherited environment
reach the server. Touching ``s3://`` through tensorflow-io inside the pytest process makes
the interpreter abort at exit (tensorflow/io#2039): do that work in a subprocess ending in
``vitpcm.storage.exit_process`` and check results here with boto3 (``list_keys``/``read``).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"
REGION = "us-east-1"
_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class S3Server:
    """Handle on a running local S3 endpoint and one of its buckets."""

    endpoint: str
    bucket: str

    def uri(self, prefix: str = "") -> str:
        """``s3://bucket/prefix`` (just the bucket when ``prefix`` is empty)."""
        prefix = prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def env(self) -> dict[str, str]:
        """The variables tensorflow-io and boto3 need to reach this endpoint."""
        return {
            "S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

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

    def new_bucket(self, name: str | None = None) -> S3Server:
        """Create an empty bucket (random name by default) and return a handle on it."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return replace(self, bucket=name)

    def list_keys(self, prefix: str = "") -> list[str]:
        """Sorted keys in this bucket starting with ``prefix``."""
        paginator = self.client().get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix.lstrip("/")):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def read(self, key: str) -> bytes:
        """Bytes of one object in this bucket."""
        return self.client().get_object(Bucket=self.bucket, Key=key.lstrip("/"))["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        """Write one object in this bucket."""
        self.client().put_object(Bucket=self.bucket, Key=key.lstrip("/"), Body=data)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_command(port: int) -> list[str]:
    # Prefer the console script next to the running interpreter (the project venv).
    script = Path(sys.executable).with_name("moto_server")
    if not script.exists():
        found = shutil.which("moto_server")
        script = Path(found) if found else script
    if script.exists():
        return [str(script), "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def _wait_ready(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited early with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"moto_server did not answer on port {port} in {_START_TIMEOUT_S:.0f} s")


@contextlib.contextmanager
def running_s3_server() -> Iterator[S3Server]:
    """Start ``moto_server``, export the S3 env vars, create a bucket; undo it all on exit."""
    port = _free_port()
    proc = subprocess.Popen(
        _server_command(port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(proc, port)
        server = S3Server(endpoint=f"http://127.0.0.1:{port}", bucket="vitpcm-test")
        with pytest.MonkeyPatch.context() as patch:
            for key, value in server.env().items():
                patch.setenv(key, value)
            server.client().create_bucket(Bucket=server.bucket)
            yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One local S3 endpoint for the whole test session (see the module docstring)."""
    with running_s3_server() as server:
        yield server


@pytest.fixture()
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """A fresh, empty bucket on the session's endpoint, with the S3 env vars set."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server.new_bucket()
