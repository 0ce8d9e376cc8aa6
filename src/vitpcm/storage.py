"""One way to read and write local paths, ``s3://`` objects (MinIO, AWS) and ``http(s)://`` URLs.

Local paths and ``s3://`` go through ``tf.io.gfile`` so the same URI also works in
``tf.data``; the ``s3://`` scheme is registered by importing tensorflow-io, configured by the
environment (``S3_ENDPOINT`` with its scheme, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``). ``http(s)://`` is read-only (weights, archives).

Two facts shape this module:

* S3 has no rename, so :func:`atomic_dir` writes under a temporary prefix and copies into
  place, the commit marker (``dataset.json``, ``metrics.json``...) last: a reader that
  requires the marker never sees a half-written folder as whole.
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
from collections.abc import Iterator, Sequence
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
        return bool(gfile.exists(text))
    except Exception as exc:
        raise _storage_error("check", text, exc) from exc


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
        raise _storage_error("list", text, exc) from exc


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob pattern, local or ``s3://``."""
    text = local_path(pattern)
    gfile = _gfile(text)
    try:
        return sorted(gfile.glob(text))
    except Exception as exc:
        raise _storage_error("list", text, exc) from exc


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


def remove_tree(uri: str | os.PathLike[str]) -> None:
    """Delete a folder and everything in it; a missing folder is fine."""
    text = local_path(uri)
    if not is_s3(text):
        shutil.rmtree(text, ignore_errors=True)
        return
    gfile = _gfile(text)
    for rel in _walk_files(text):
        with contextlib.suppress(Exception):
            gfile.remove(join(text, rel))


def _commit_order(files: Sequence[str], commit_last: Sequence[str]) -> list[str]:
    """Files in copy order: the commit markers after everything else."""
    last = set(commit_last)
    return [f for f in files if posixpath.basename(f) not in last] + [
        f for f in files if posixpath.basename(f) in last
    ]


@contextlib.contextmanager
def atomic_dir(
    final_uri: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    commit_last: Sequence[str] = ("dataset.json", "metrics.json", "model.json"),
) -> Iterator[str]:
    """Yield a temporary folder URI that becomes ``final_uri`` only if the block succeeds.

    Locally the folder is renamed into place (atomic on one filesystem). On ``s3://`` the
    objects are copied from ``<final>.tmp-<id>/`` to the final prefix with the files named in
    ``commit_last`` copied last, so a reader keyed on them never sees a half folder. On any
    exception the temporary folder is removed and the final one is left untouched.
    """
    final = local_path(final_uri).rstrip("/")
    if is_http(final):
        raise StorageError(f"cannot write {final}: http(s) URLs are read-only")
    if exists(final) and not overwrite:
        raise StorageError(f"{final} already exists; remove it or choose another output")
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        remove_tree(tmp)
        raise
    if not is_s3(final):
        old = None
        if os.path.exists(final):
            old = f"{final}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return
    gfile = _gfile(final)
    try:
        if gfile.exists(final):
            remove_tree(final)
        for rel in _commit_order(_walk_files(tmp), commit_last):
            gfile.copy(join(tmp, rel), join(final, rel), overwrite=True)
    except Exception as exc:
        raise _storage_error("commit", final, exc) from exc
    finally:
        remove_tree(tmp)


def exit_process(rc: int) -> None:
    """Flush output and leave with ``rc`` without running interpreter teardown.

    tensorflow-io's S3 filesystem crashes during teardown (exit code 134) after any
    ``s3://`` access, which would turn a successful step into a failed Kubeflow task.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(rc)
