"""``vitpcm.storage`` on ``s3://``: objects through the MinIO client, on a local moto server.

Managing objects no longer touches tensorflow-io, so these run in the pytest process; what
the library did is checked through boto3 (``s3_bucket.list_keys``/``read``), an independent
client.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import boto3
import pytest

from helpers.s3_server import S3Server, s3_bucket, s3_server, s3_with_auth  # noqa: F401
from localrun.services import S3Endpoint, free_port
from vitpcm import storage
from vitpcm.errors import StorageError
from vitpcm.storage import s3


def test_s3_environment_derives_what_tensorflow_io_and_mlflow_read() -> None:
    user = {
        "S3_ENDPOINT": "http://minio:9000",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "HOME": "/home/me",
    }
    assert storage.s3_environment(user) == {
        "S3_ENDPOINT": "http://minio:9000",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_REGION": "eu-west-1",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "S3_USE_HTTPS": "0",
        "S3_VERIFY_SSL": "1",
        "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000",
    }
    explicit = {
        "S3_ENDPOINT": "https://s3.example.org",
        "S3_VERIFY_SSL": "0",
        "AWS_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": "https://other.example.org",
    }
    derived = storage.s3_environment(explicit)
    assert derived["S3_USE_HTTPS"] == "1"
    assert derived["S3_VERIFY_SSL"] == "0"  # what the user set is kept
    assert derived["MLFLOW_S3_ENDPOINT_URL"] == "https://other.example.org"
    assert derived["AWS_DEFAULT_REGION"] == "us-east-1"
    aws = storage.s3_environment({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    assert "S3_USE_HTTPS" not in aws and "MLFLOW_S3_ENDPOINT_URL" not in aws


def test_objects_through_minio_are_what_s3_holds(s3_bucket: S3Server) -> None:  # noqa: F811
    base = s3_bucket.uri("run")
    big = os.urandom(6 << 20)  # over MinIO's 5 MiB part size: a multipart upload
    storage.write_bytes(f"{base}/a.json", b"1")
    storage.write_bytes(f"{base}/sub/b.bin", big)
    storage.write_file(f"{base}/sub/c.bin", __file__)
    s3_bucket.put("run/empty/", b"")  # a folder placeholder, as tensorflow-io writes them
    s3_bucket.put("run.tmp-0123abcd/x", b"x")  # a sibling sharing the prefix

    assert s3_bucket.read("run/sub/b.bin") == big
    assert storage.read_bytes(f"{base}/sub/b.bin") == big
    assert s3_bucket.read("run/sub/c.bin") == Path(__file__).read_bytes()
    assert storage.list_files(base) == ["a.json", "sub/b.bin", "sub/c.bin"]
    assert storage.listdir(base) == ["a.json", "empty", "sub"]
    assert storage.entry_state(base) == "dir"
    assert storage.entry_state(f"{base}/a.json") == "file"
    assert storage.entry_state(f"{base}/a") == "missing"  # a prefix of a name, no entry
    assert storage.entry_state(s3_bucket.uri()) == "dir"
    assert not storage.exists(s3_bucket.uri("ru"))
    assert storage.glob(s3_bucket.uri("run.tmp-*")) == [s3_bucket.uri("run.tmp-0123abcd")]
    assert storage.glob(f"{base}/*") == [f"{base}/a.json", f"{base}/empty", f"{base}/sub"]
    assert storage.glob(f"{base}/s?b/b*.bin") == [f"{base}/sub/b.bin"]

    storage.remove_files(base, ["a.json", "missing.json"])
    assert s3_bucket.list_keys("run/") == ["run/empty/", "run/sub/b.bin", "run/sub/c.bin"]
    storage.remove_tree(base)
    assert s3_bucket.list_keys() == ["run.tmp-0123abcd/x"]


def _commit(out: str, files: dict[str, bytes]) -> None:
    with storage.atomic_dir(out, kind="eval") as tmp:
        for name, data in files.items():
            storage.write_bytes(storage.join(tmp, name), data)


def test_atomic_dir_on_s3_copies_markers_last_and_leaves_no_temporaries(
    s3_bucket: S3Server,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = s3_bucket.uri("eval")
    _commit(out, {"a.txt": b"old", "metrics.json": b"{}"})
    s3_bucket.put("eval/.tmp-deadbeef/a.txt", b"a killed run's upload")
    copied: list[str] = []
    real_copy = s3.copy

    def copy(src: str, dest: str) -> None:
        copied.append(dest.rsplit("/", 1)[1])
        real_copy(src, dest)

    monkeypatch.setattr(s3, "copy", copy)
    _commit(out, {"b.txt": b"new", "metrics.json": b'{"miou": 1}', "z.txt": b"z"})
    assert copied == ["b.txt", "z.txt", "metrics.json"]  # the commit marker last
    assert s3_bucket.list_keys() == [
        "eval/.vitpcm-output.json",
        "eval/b.txt",
        "eval/metrics.json",
        "eval/z.txt",
    ]
    before = {k: s3_bucket.read(k) for k in s3_bucket.list_keys()}
    with pytest.raises(RuntimeError), storage.atomic_dir(out, kind="eval") as tmp:
        storage.write_bytes(storage.join(tmp, "metrics.json"), b"half")
        raise RuntimeError("the step failed")
    assert {k: s3_bucket.read(k) for k in s3_bucket.list_keys()} == before


def _one_line(exc: pytest.ExceptionInfo[StorageError], *needles: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_s3_failures_are_one_clear_line(
    s3_with_auth: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, key_id, secret = s3_with_auth
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=key_id, aws_secret_access_key=secret)  # fmt: skip
    client.create_bucket(Bucket="kept")
    client.put_object(Bucket="kept", Key="data/x.json", Body=b"x")
    monkeypatch.setenv("S3_ENDPOINT", endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    assert storage.read_bytes("s3://kept/data/x.json") == b"x"
    with pytest.raises(StorageError) as exc:
        storage.exists("s3://missing-bucket/data")
    _one_line(exc, "s3://missing-bucket/data", "bucket 'missing-bucket' does not exist", endpoint)

    for name, value in (("AWS_SECRET_ACCESS_KEY", "not-the-secret"), ("AWS_ACCESS_KEY_ID", "x")):
        monkeypatch.setenv(name, value)
        calls = {
            "read": lambda: storage.read_bytes("s3://kept/data/x.json"),
            "write": lambda: storage.write_bytes("s3://kept/data/y.json", b"y"),
            "list": lambda: storage.exists("s3://kept/data"),
            "delete": lambda: storage.remove_files("s3://kept/data", ["x.json"]),
        }
        for action, call in calls.items():
            with pytest.raises(StorageError) as exc:
                call()
            _one_line(exc, f"cannot {action}", "access denied by S3", "AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    keys = client.list_objects_v2(Bucket="kept")["Contents"]
    assert [k["Key"] for k in keys] == ["data/x.json"]  # nothing written, nothing deleted

    monkeypatch.setenv("S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError) as exc:
        storage.read_bytes("s3://kept/data/x.json")
    _one_line(exc, "s3://kept/data/x.json", "is unreachable", "check S3_ENDPOINT")
    monkeypatch.setenv("S3_ENDPOINT", "minio:9000")
    with pytest.raises(StorageError) as exc:
        storage.read_bytes("s3://kept/data/x.json")
    _one_line(exc, "S3_ENDPOINT='minio:9000' has no scheme", "http://minio:9000")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError) as exc:
        storage.write_bytes("s3://kept/data/x.json", b"")
    _one_line(exc, "AWS_SECRET_ACCESS_KEY not set")


def test_endpoint_lost_after_the_first_request_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with S3Endpoint() as endpoint:
        bucket = endpoint.bucket("lost")
        for key, value in bucket.env().items():
            monkeypatch.setenv(key, value)
        storage.write_bytes(bucket.uri("x"), b"x")  # the client is made and checked
    with pytest.raises(StorageError) as exc:  # the server is gone now
        storage.read_bytes(bucket.uri("x"))
    _one_line(exc, "cannot read s3://lost/x", "is unreachable", "check S3_ENDPOINT")
