"""One way to read and write local paths, ``s3://`` objects (MinIO, AWS) and ``http(s)://`` URLs.

Local paths and ``s3://`` go through ``tf.io.gfile`` so the same URI also works in
``tf.data``; the ``s3://`` scheme is registered by importing tensorflow-io, configured by the
environment (``S3_ENDPOINT`` with its scheme, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``). ``http(s)://`` is read-only (weights, archives).

Two facts shape this module:

* S3 has no rename, so :func:`atomic_dir` (:mod:`vitpcm.atomic`) writes under a temporary
  prefix and copies into place, the commit marker (``dataset.json``, ``metrics.json``...)
  last: a reader that requires the marker never sees a half-written folder as whole.
* tensorflow-io reports an object S3 refused (HTTP 403) as missing; :func:`raise_if_refused`
  asks S3 directly, so access denied is reported as such.
* A process that touched ``s3://`` aborts at interpreter exit (tensorflow/io#2039), so
  entry points leave through :func:`exit_process`.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vitpcm.errors import StorageError

_S3_USED = False
_HTTP_SCHEMES = ("http://", "https://")


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """Whether ``uri`` names an object in S3-compatible storage."""
    return str(uri).startswith("s3://")


def is_http(uri: str | os.PathLike[str]) -> bool:
    """Whether ``uri`` is an http(s) URL."""
    return str(uri).startswith(_HTTP_SCHEMES)


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """Whether ``uri`` is not on the local filesystem."""
    return is_s3(uri) or is_http(uri)


def local_path(uri: str | os.PathLike[str]) -> str:
    """Strip a ``file://`` prefix; other URIs are returned unchanged."""
    text = str(uri)
    return text[len("file://") :] if text.startswith("file://") else text


def join(uri: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts with ``/`` for remote URIs and the OS separator locally."""
    text = local_path(uri)
    if is_remote(text):
        return posixpath.join(text.rstrip("/"), *parts)
    return os.path.join(text, *parts)


def s3_used() -> bool:
    """Whether this process registered the ``s3://`` filesystem (see :func:`exit_process`)."""
    return _S3_USED


def check_s3_config(uri: str) -> None:
    """Fail fast, naming what to set, when S3 credentials or the endpoint are unusable.

    tensorflow-io retries an unreachable endpoint for minutes; a plain TCP probe turns
    that into one clear error.
    """
    missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(k)]
    if missing:
        raise StorageError(
            f"cannot use {uri}: S3 credentials missing ({', '.join(missing)} not set); "
            "export them (in Kubeflow, mount the S3 Secret) and try again"
        )
    endpoint = os.environ.get("S3_ENDPOINT", "")
    if not endpoint:
        return  # real AWS: nothing local to probe
    if "://" not in endpoint:
        raise StorageError(f"S3_ENDPOINT={endpoint!r} has no scheme; set it like http://minio:9000")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=5):
            pass
    except OSError as exc:
        raise StorageError(
            f"cannot use {uri}: S3 endpoint {endpoint} is unreachable ({exc}); "
            "check S3_ENDPOINT and that the MinIO/S3 service is up"
        ) from exc


def ensure_s3_filesystem() -> None:
    """Register tensorflow-io's ``s3://`` filesystem with ``tf.io.gfile`` (idempotent)."""
    global _S3_USED
    if _S3_USED:
        return
    import tensorflow_io  # noqa: F401  (import registers the s3:// scheme)

    _S3_USED = True


def _gfile(uri: str) -> Any:
    """``tf.io.gfile`` ready for ``uri`` (registering and checking S3 when needed)."""
    if is_s3(uri):
        check_s3_config(uri)
        ensure_s3_filesystem()
    import tensorflow as tf

    return tf.io.gfile


def _storage_error(action: str, uri: str, exc: BaseException) -> StorageError:
    hint = (
        "check the bucket name, S3_ENDPOINT and the credentials"
        if is_s3(uri)
        else "check the path and its permissions"
    )
    return StorageError(f"cannot {action} {uri}: {exc}; {hint}")


def read_bytes(uri: str | os.PathLike[str], *, retries: int = 3, timeout: float = 60.0) -> bytes:
    """Read a whole file from a local path, ``file://``, ``s3://`` or ``http(s)://``."""
    text = local_path(uri)
    if is_http(text):
        return _http_get(text, retries=retries, timeout=timeout)
    if not is_s3(text):
        try:
            return Path(text).read_bytes()
        except OSError as exc:
            raise _storage_error("read", text, exc) from exc
    gfile = _gfile(text)
    try:
        with gfile.GFile(text, "rb") as handle:
            return handle.read()
    except Exception as exc:
        raise_if_refused(text, "read")
        raise _storage_error("read", text, exc) from exc


def _http_get(url: str, *, retries: int, timeout: float) -> bytes:
    import requests

    delay = 0.5
    for attempt in range(retries + 1):
        try:
            response = requests.get(url, timeout=timeout)
        except requests.RequestException as exc:
            if attempt == retries:
                raise StorageError(f"cannot read {url}: {exc}; check the URL and network") from exc
        else:
            if response.status_code == 200:
                return response.content
            if response.status_code < 500 or attempt == retries:
                raise StorageError(f"cannot read {url}: HTTP {response.status_code}; check the URL")
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def write_bytes(uri: str | os.PathLike[str], data: bytes) -> None:
    """Write a whole file; local writes go through a temporary name and an atomic rename."""
    text = local_path(uri)
    if is_http(text):
        raise StorageError(f"cannot write {text}: http(s) URLs are read-only")
    if is_s3(text):
        gfile = _gfile(text)
        try:  # a single S3 PUT is atomic: readers see the old object or the new one
            with gfile.GFile(text, "wb") as handle:
                handle.write(data)
        except Exception as exc:
            raise_if_refused(text, "write")
            raise _storage_error("write", text, exc) from exc
        return
    path = Path(text)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _storage_error("write", text, exc) from exc


def exists(uri: str | os.PathLike[str]) -> bool:
    """Whether a file or folder exists (``s3://`` folders exist when they hold objects)."""
    text = local_path(uri)
    if is_http(text):
        raise StorageError(f"cannot list {text}: http(s) URLs only support reading a file")
    if not is_s3(text):
        return os.path.exists(text)
    gfile = _gfile(text)
    try:
        found = bool(gfile.exists(text))
    except Exception as exc:
        raise _storage_error("check", text, exc) from exc
    if not found:
        raise_if_refused(text, "read")
    return found


def s3_entry_state(uri: str) -> str:
    """``missing``, ``file`` (an object) or ``dir`` (a prefix holding objects) of an ``s3://`` URI.

    Raises:
        StorageError: The credentials are refused or the bucket does not exist.
    """
    gfile = _gfile(uri)
    try:
        if gfile.isdir(uri):
            return "dir"
        if gfile.exists(uri):
            return "file"
    except Exception as exc:
        raise _storage_error("check", uri, exc) from exc
    raise_if_refused(uri, "read")
    return "missing"


_DENIED_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403"}
)


def raise_if_refused(uri: str, action: str) -> None:
    """Raise a true error when S3 refused ``uri`` rather than not having it.

    tensorflow-io reports an object it was not allowed to see (HTTP 403: wrong secret,
    unknown key, a policy that denies it) as *not found*, which would send the user off to
    recreate data that exists. One direct request, signed with the same credentials, tells
    the two apart.

    Raises:
        StorageError: Access denied, or the bucket does not exist.
    """
    reason = _s3_refusal(uri)
    if reason == "denied":
        raise StorageError(
            f"cannot {action} {uri}: access denied by S3 (the credentials are wrong or not "
            "allowed this bucket/prefix); check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY "
            "(in Kubeflow, the vitpcm-s3 Secret) and the bucket's policy"
        )
    if reason == "no-bucket":
        bucket = uri[len("s3://") :].split("/", 1)[0]
        raise StorageError(
            f"cannot {action} {uri}: bucket {bucket!r} does not exist on "
            f"{os.environ.get('S3_ENDPOINT') or 'AWS'}; create it or fix the URI"
        )


def _s3_refusal(uri: str) -> str | None:
    """``denied``, ``no-bucket`` or None (allowed; or the probe itself could not run)."""
    if not is_s3(uri):
        return None
    try:
        import boto3
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return None
    bucket, _, key = uri[len("s3://") :].partition("/")
    client = boto3.client(
        "s3",
        endpoint_url=os.environ.get("S3_ENDPOINT") or None,
        region_name=os.environ.get("AWS_REGION") or None,
        config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=15),
    )
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if error.get("Code") in _DENIED_CODES or status == "403":
            return "denied"
        if error.get("Code") == "NoSuchBucket":
            return "no-bucket"
    except BotoCoreError:
        return None
    return None


def makedirs(uri: str | os.PathLike[str]) -> None:
    """Create a folder and its parents (a no-op for ``s3://``, where folders are prefixes)."""
    text = local_path(uri)
    if is_s3(text):
        return
    try:
        os.makedirs(text, exist_ok=True)
    except OSError as exc:
        raise _storage_error("create", text, exc) from exc


def listdir(uri: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the entries directly inside a folder."""
    text = local_path(uri)
    if not is_s3(text):
        try:
            return sorted(os.listdir(text))
        except OSError as exc:
            raise _storage_error("list", text, exc) from exc
    gfile = _gfile(text)
    try:
        return sorted(name.rstrip("/") for name in gfile.listdir(text))
    except Exception as exc:
        raise_if_refused(text, "list")
        raise _storage_error("list", text, exc) from exc


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob pattern, local or ``s3://``."""
    text = local_path(pattern)
    gfile = _gfile(text)
    try:
        found = sorted(gfile.glob(text))
    except Exception as exc:
        raise_if_refused(text.split("*", 1)[0].split("?", 1)[0], "list")
        raise _storage_error("list", text, exc) from exc
    if not found and is_s3(text):
        raise_if_refused(posixpath.dirname(text.split("*", 1)[0].split("?", 1)[0]), "list")
    return found


def _walk_files(root: str) -> list[str]:
    """Paths of every file under ``root``, relative to it, with ``/`` separators."""
    if not is_s3(root):
        found = []
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                found.append(rel.replace(os.sep, "/"))
        return sorted(found)
    gfile = _gfile(root)
    found = []
    for dirpath, _dirs, files in gfile.walk(root):
        for name in files:
            full = posixpath.join(dirpath.rstrip("/"), name)
            found.append(posixpath.relpath(full, root.rstrip("/")))
    return sorted(found)


def list_files(uri: str | os.PathLike[str]) -> list[str]:
    """Paths of every file under a folder or ``s3://`` prefix, relative to it, ``/``-separated."""
    return _walk_files(local_path(uri).rstrip("/"))


def remove_files(uri: str | os.PathLike[str], relative: Sequence[str]) -> None:
    """Delete the named files under ``uri`` (missing ones are fine)."""
    text = local_path(uri).rstrip("/")
    gfile = _gfile(text) if is_s3(text) else None
    for rel in relative:
        path = join(text, rel)
        if gfile is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        else:
            with contextlib.suppress(Exception):
                gfile.remove(path)


def remove_tree(uri: str | os.PathLike[str]) -> None:
    """Delete a folder and everything in it; a missing folder is fine."""
    text = local_path(uri)
    if not is_s3(text):
        shutil.rmtree(text, ignore_errors=True)
        return
    remove_files(text, _walk_files(text))


# Atomic output folders live in their own module; re-exported here, where callers look.


# Atomic output folders live in their own module; re-exported here, where callers look.
from vitpcm.atomic import atomic_dir, remove_stale_temporaries  # noqa: E402, F401


def exit_process(rc: int) -> None:
    """Flush output and leave with ``rc`` without running interpreter teardown.

    tensorflow-io's S3 filesystem crashes during teardown (exit code 134) after any
    ``s3://`` access, which would turn a successful step into a failed Kubeflow task.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(rc)
