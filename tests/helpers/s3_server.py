"""A real local S3 endpoint for tests: pytest fixtures over :mod:`localrun.services`.

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

    def test_denied(s3_with_auth):          # session-scoped: an endpoint that checks
        endpoint, key_id, secret = s3_with_auth   # signatures, one user allowed everything

The server is ``moto_server`` started by :class:`localrun.services.S3Endpoint`, the same
class ``make run-local`` uses. While the session fixture is alive ``S3_ENDPOINT``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_REGION`` are set in
``os.environ`` (restored afterwards), so code under test and subprocesses started with the
inherited environment reach the server. ``vitpcm.storage`` manages objects through the MinIO
client, which is safe in the pytest process; TensorFlow reading or writing ``s3://``
(tensorflow-io) makes the interpreter abort at exit (tensorflow/io#2039): do that work in a
subprocess ending in ``vitpcm.storage.exit_process`` and check results here with boto3
(``list_keys``/``read``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest

from localrun.services import ACCESS_KEY, REGION, SECRET_KEY, S3Endpoint
from localrun.services import S3Bucket as S3Server

__all__ = [
    "ACCESS_KEY",
    "REGION",
    "SECRET_KEY",
    "S3Server",
    "running_s3_server",
    "s3_bucket",
    "s3_server",
    "s3_with_auth",
]


@contextlib.contextmanager
def running_s3_server() -> Iterator[S3Server]:
    """Start ``moto_server``, export the S3 env vars, create a bucket; undo it all on exit."""
    with S3Endpoint() as endpoint, pytest.MonkeyPatch.context() as patch:
        server = endpoint.bucket("vitpcm-test")
        for key, value in server.env().items():
            patch.setenv(key, value)
        yield server


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


@pytest.fixture(scope="session")
def s3_with_auth() -> Iterator[tuple[str, str, str]]:
    """A moto S3 endpoint that checks credentials, with one user allowed everything.

    moto checks signatures once ``INITIAL_NO_AUTH_ACTION_COUNT`` requests are spent: three
    go to creating the user, its key and its policy. Yields (endpoint, key id, secret).
    """
    import boto3

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "3")
        with S3Endpoint() as endpoint:
            patch.delenv("INITIAL_NO_AUTH_ACTION_COUNT")
            iam = boto3.client(
                "iam",
                endpoint_url=endpoint.endpoint,
                region_name=REGION,
                aws_access_key_id="setup",
                aws_secret_access_key="setup",
            )
            iam.create_user(UserName="pipeline")
            key = iam.create_access_key(UserName="pipeline")["AccessKey"]
            allow = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
            policy = {"Version": "2012-10-17", "Statement": [allow]}
            iam.put_user_policy(
                UserName="pipeline", PolicyName="all", PolicyDocument=json.dumps(policy)
            )
            yield endpoint.endpoint, key["AccessKeyId"], key["SecretAccessKey"]
