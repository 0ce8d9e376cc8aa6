"""``s3://`` objects through the MinIO client, and the one place S3 settings are named.

The environment names one endpoint and its credentials: ``S3_ENDPOINT`` (with its scheme,
``http://minio:9000``; unset for AWS), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
optionally ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``), ``AWS_SESSION_TOKEN`` and
``S3_VERIFY_SSL=0``. :func:`s3_environment` derives from these what tensorflow-io
(``S3_USE_HTTPS``, ``S3_VERIFY_SSL``, ``AWS_REGION``) and MLflow's boto3 client
(``MLFLOW_S3_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``) read; the MinIO client is built from the
same values. Every failure becomes one :class:`~vitpcm.errors.StorageError` line saying
whether access was denied, the bucket is missing or the endpoint unreachable.
"""

from __future__ import annotations

import fnmatch
import io
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

from vitpcm.errors import StorageError

_DENIED = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"})
_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def s3_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every variable the library, tensorflow-io and MLflow read, from the ones a user sets.

    Args:
        env: The user's variables (default ``os.environ``): ``S3_ENDPOINT``, ``AWS_*``.

    Returns:
        The S3 variables of ``env`` plus the derived ones: ``S3_USE_HTTPS`` and
        ``S3_VERIFY_SSL`` (tensorflow-io), ``MLFLOW_S3_ENDPOINT_URL`` (MLflow), and
        ``AWS_REGION``/``AWS_DEFAULT_REGION`` each filled from the other. Values set in
        ``env`` are kept.
    """
    env = os.environ if env is None else env
    names = (*_CREDENTIALS, "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")
    out = {k: env[k] for k in (*names, "S3_ENDPOINT", "S3_VERIFY_SSL") if env.get(k)}
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        out.setdefault("AWS_REGION", region)
        out.setdefault("AWS_DEFAULT_REGION", region)
    endpoint = env.get("S3_ENDPOINT", "")
    if endpoint:
        out["S3_USE_HTTPS"] = "0" if endpoint.startswith("http://") else "1"
        out["MLFLOW_S3_ENDPOINT_URL"] = env.get("MLFLOW_S3_ENDPOINT_URL") or endpoint
    out.setdefault("S3_VERIFY_SSL", "1")
    return out


def check_s3_config(uri: str) -> None:
    """Fail fast, naming what to set, when S3 credentials or the endpoint are unusable.

    A plain TCP probe turns an unreachable endpoint into one clear line (tensorflow-io
    would retry it for minutes).
    """
    missing = [k for k in _CREDENTIALS if not os.environ.get(k)]
    if missing:
        raise StorageError(
            f"cannot use {uri}: S3 credentials missing ({', '.join(missing)} not set); "
            "export them (in Kubeflow, mount the S3 Secret) and try again"
        )
    endpoint = os.environ.get("S3_ENDPOINT", "")
    if not endpoint:
        return  # real AWS: nothing local to probe
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise StorageError(f"S3_ENDPOINT={endpoint!r} has no scheme; set it like http://minio:9000")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=5):
            pass
    except OSError as exc:
        raise _unreachable(uri, exc) from exc


def _unreachable(uri: str, exc: BaseException, action: str = "use") -> StorageError:
    cause = getattr(exc, "reason", None) or exc  # urllib3 wraps the socket's error twice
    while cause.__cause__ or cause.__context__:
        cause = cause.__cause__ or cause.__context__
    endpoint = os.environ.get("S3_ENDPOINT") or "AWS"
    return StorageError(
        f"cannot {action} {uri}: S3 endpoint {endpoint} is unreachable ({cause}); "
        "check S3_ENDPOINT and that the MinIO/S3 service is up"
    )


def split(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


_CLIENTS: dict[tuple[str, ...], Any] = {}
_SETTINGS = (*_CREDENTIALS, "AWS_SESSION_TOKEN", "AWS_REGION", "S3_ENDPOINT", "S3_VERIFY_SSL")


def client(uri: str) -> Any:
    """The MinIO client of the current settings; the first use of them is checked."""
    env = s3_environment()
    settings = (str(os.getpid()), *(env.get(k, "") for k in _SETTINGS))  # forks get their own
    if settings not in _CLIENTS:
        check_s3_config(uri)
        from minio import Minio

        endpoint = urlparse(env.get("S3_ENDPOINT") or "https://s3.amazonaws.com")
        _CLIENTS[settings] = Minio(
            endpoint.netloc,
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            session_token=env.get("AWS_SESSION_TOKEN"),
            secure=endpoint.scheme == "https",
            region=env.get("AWS_REGION"),
            cert_check=env["S3_VERIFY_SSL"] != "0",
        )
    return _CLIENTS[settings]


def _error(action: str, uri: str, exc: BaseException | None) -> StorageError:
    """The one-line error for a failed request (``exc`` None: the bucket does not exist)."""
    code = "NoSuchBucket" if exc is None else getattr(exc, "code", None) or ""
    if code in _DENIED:
        return StorageError(
            f"cannot {action} {uri}: access denied by S3 (the credentials are wrong or not "
            "allowed this bucket/prefix); check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY "
            "(in Kubeflow, the vitpcm-s3 Secret) and the bucket's policy"
        )
    if code == "NoSuchBucket":
        return StorageError(
            f"cannot {action} {uri}: bucket {split(uri)[0]!r} does not exist on "
            f"{os.environ.get('S3_ENDPOINT') or 'AWS'}; create it or fix the URI"
        )
    import urllib3

    if isinstance(exc, urllib3.exceptions.HTTPError):
        return _unreachable(uri, exc, action)
    detail = f"{code}: {getattr(exc, 'message', '')}" if code else str(exc)
    return StorageError(
        f"cannot {action} {uri}: {detail}; check the bucket name, S3_ENDPOINT and the credentials"
    )


def _errors() -> tuple[type[BaseException], ...]:
    """What a MinIO call raises: S3's answers, connection failures, invalid names."""
    import urllib3
    from minio.error import MinioException

    return (MinioException, urllib3.exceptions.HTTPError, ValueError)


def read(uri: str) -> bytes:
    """The bytes of one object."""
    bucket, key = split(uri)
    try:
        response = client(uri).get_object(bucket, key)
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()
    except _errors() as exc:
        raise _error("read", uri, exc) from exc


def write(uri: str, data: bytes) -> None:
    """Write one object (one PUT, or a multipart upload completed at once: atomic)."""
    bucket, key = split(uri)
    try:
        client(uri).put_object(bucket, key, io.BytesIO(data), len(data))
    except _errors() as exc:
        raise _error("write", uri, exc) from exc


def upload(uri: str, path: str | os.PathLike[str]) -> None:
    """Stream a local file into one object (multipart for large files, completed at once)."""
    bucket, key = split(uri)
    try:
        client(uri).fput_object(bucket, key, os.fspath(path))
    except _errors() as exc:
        raise _error("write", uri, exc) from exc


def copy(src: str, dest: str) -> None:
    """Copy one object inside the store (server-side: no bytes pass through this process)."""
    from minio.commonconfig import CopySource

    bucket, key = split(dest)
    try:
        client(dest).copy_object(bucket, key, CopySource(*split(src)))
    except _errors() as exc:
        raise _error("copy to", dest, exc) from exc


def _list(uri: str, prefix: str, *, recursive: bool) -> Iterator[str]:
    """Names of the objects (and, not ``recursive``, sub-prefixes) starting with ``prefix``."""
    bucket = split(uri)[0]
    try:
        for obj in client(uri).list_objects(bucket, prefix=prefix, recursive=recursive):
            yield obj.object_name
    except _errors() as exc:
        raise _error("list", uri, exc) from exc


def _folder(uri: str) -> str:
    """The key prefix of the folder ``uri`` (``""`` for the bucket, else ending in ``/``)."""
    key = split(uri)[1].strip("/")
    return f"{key}/" if key else ""


def entry_state(uri: str) -> str:
    """``missing``, ``file`` (an object) or ``dir`` (a prefix holding objects; a bucket)."""
    key = split(uri)[1].strip("/")
    if not key:
        try:
            found = client(uri).bucket_exists(split(uri)[0])
        except _errors() as exc:
            raise _error("read", uri, exc) from exc
        if not found:
            raise _error("read", uri, None)
        return "dir"
    state = "missing"
    for name in _list(uri, key, recursive=False):  # sorted: key, key.x, key/, key0...
        if name.startswith(f"{key}/"):
            return "dir"
        if name > f"{key}/":
            break
        state = "file" if name == key else state
    return state


def listdir(uri: str) -> list[str]:
    """Sorted names directly under a prefix (an empty list for a prefix without objects)."""
    start = len(_folder(uri))
    names = {n[start:].rstrip("/") for n in _list(uri, _folder(uri), recursive=False)}
    return sorted(names - {""})


def list_files(uri: str) -> list[str]:
    """Every object under a prefix, relative to it (folder placeholders ``x/`` left out)."""
    start = len(_folder(uri))
    names = _list(uri, _folder(uri), recursive=True)
    return sorted(n[start:] for n in names if not n.endswith("/"))


def glob(pattern: str) -> list[str]:
    """Sorted objects and prefixes matching ``pattern``; ``*``/``?``/``[`` do not cross ``/``."""
    bucket, key = split(pattern)
    head = key.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
    parts = key.split("/")
    found = set()
    for name in _list(pattern, head, recursive=True):
        candidate = name.split("/")[: len(parts)]
        if len(candidate) == len(parts) and all(map(fnmatch.fnmatchcase, candidate, parts)):
            found.add(f"s3://{bucket}/{'/'.join(candidate)}")
    return sorted(found)


def remove(uri: str, relative: Sequence[str]) -> None:
    """Delete the named objects under ``uri`` (missing ones are fine)."""
    from minio.deleteobjects import DeleteObject

    if not relative:
        return
    bucket, prefix = split(uri)[0], _folder(uri)
    try:
        deletes = [DeleteObject(prefix + r) for r in relative]
        failed = list(client(uri).remove_objects(bucket, deletes))
    except _errors() as exc:
        raise _error("delete under", uri, exc) from exc
    if failed:
        raise _error("delete under", uri, failed[0])


def remove_tree(uri: str) -> None:
    """Delete every object under a prefix, folder placeholders included."""
    start = len(_folder(uri))
    remove(uri, [n[start:] for n in _list(uri, _folder(uri), recursive=True)])
