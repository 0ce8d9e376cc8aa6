"""The storage primitives: local paths, ``s3://`` objects (through :mod:`vitpcm.storage.s3`) and
read-only ``http(s)://``; :mod:`vitpcm.storage` re-exports them (see its docstring).
"""

from __future__ import annotations

import contextlib
import glob as pyglob
import os
import posixpath
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from vitpcm.errors import StorageError
from vitpcm.storage import s3

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


def ensure_s3_filesystem() -> None:
    """Let TensorFlow open ``s3://`` (tensorflow-io, configured by :func:`s3_environment`)."""
    global _S3_USED
    if _S3_USED:
        return
    for key, value in s3.s3_environment().items():
        os.environ.setdefault(key, value)
    import tensorflow_io  # noqa: F401  (import registers the s3:// scheme)

    _S3_USED = True


def _local_error(action: str, path: str, exc: BaseException) -> StorageError:
    return StorageError(f"cannot {action} {path}: {exc}; check the path and its permissions")


def read_bytes(uri: str | os.PathLike[str], *, retries: int = 3, timeout: float = 60.0) -> bytes:
    """Read a whole file from a local path, ``file://``, ``s3://`` or ``http(s)://``."""
    text = local_path(uri)
    if is_http(text):
        return _http_get(text, retries=retries, timeout=timeout)
    if is_s3(text):
        return s3.read(text)
    try:
        return Path(text).read_bytes()
    except OSError as exc:
        raise _local_error("read", text, exc) from exc


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
    """Write a whole file atomically: one S3 PUT, or locally a temporary name renamed."""
    text = local_path(uri)
    if is_http(text):
        raise StorageError(f"cannot write {text}: http(s) URLs are read-only")
    if is_s3(text):
        s3.write(text, data)
        return
    path = Path(text)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _local_error("write", text, exc) from exc


def write_file(uri: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Copy the local file ``path`` to ``uri`` atomically (to ``s3://`` streamed in parts)."""
    text = local_path(uri)
    if not is_s3(text):
        write_bytes(text, Path(path).read_bytes())
        return
    s3.upload(text, path)


def exists(uri: str | os.PathLike[str]) -> bool:
    """Whether a file or folder exists (``s3://`` folders exist when they hold objects).

    Raises:
        StorageError: S3 refused the credentials or the bucket does not exist.
    """
    text = local_path(uri)
    if is_http(text):
        raise StorageError(f"cannot list {text}: http(s) URLs only support reading a file")
    if is_s3(text):
        return s3.entry_state(text) != "missing"
    return os.path.exists(text)


def entry_state(uri: str | os.PathLike[str]) -> str:
    """``missing``, ``file`` or ``dir`` (an ``s3://`` prefix holding objects is a dir).

    Raises:
        StorageError: S3 refused the credentials or the bucket does not exist.
    """
    text = local_path(uri)
    if is_s3(text):
        return s3.entry_state(text)
    if os.path.isdir(text):
        return "dir"
    return "file" if os.path.lexists(text) else "missing"


def makedirs(uri: str | os.PathLike[str]) -> None:
    """Create a folder and its parents (a no-op for ``s3://``, where folders are prefixes)."""
    text = local_path(uri)
    if is_s3(text):
        return
    try:
        os.makedirs(text, exist_ok=True)
    except OSError as exc:
        raise _local_error("create", text, exc) from exc


def listdir(uri: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the entries directly inside a folder."""
    text = local_path(uri)
    if is_s3(text):
        return s3.listdir(text)
    try:
        return sorted(os.listdir(text))
    except OSError as exc:
        raise _local_error("list", text, exc) from exc


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob pattern, local or ``s3://`` (``*`` does not cross ``/``)."""
    text = local_path(pattern)
    if is_s3(text):
        return s3.glob(text)
    return sorted(pyglob.glob(text))


def list_files(uri: str | os.PathLike[str]) -> list[str]:
    """Paths of every file under a folder or ``s3://`` prefix, relative to it, ``/``-separated."""
    root = local_path(uri).rstrip("/")
    if is_s3(root):
        return s3.list_files(root)
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def remove_files(uri: str | os.PathLike[str], relative: Sequence[str]) -> None:
    """Delete the named files under ``uri`` (missing ones are fine)."""
    text = local_path(uri).rstrip("/")
    if is_s3(text):
        s3.remove(text, relative)
        return
    for rel in relative:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(text, rel))


def remove_tree(uri: str | os.PathLike[str]) -> None:
    """Delete a folder and everything in it; a missing folder is fine."""
    text = local_path(uri)
    if is_s3(text):
        s3.remove_tree(text)
    else:
        shutil.rmtree(text, ignore_errors=True)


def exit_process(rc: int) -> None:
    """Flush output and leave with ``rc`` without running interpreter teardown.

    tensorflow-io's S3 filesystem crashes during teardown (exit code 134) after any
    ``s3://`` access, which would turn a successful step into a failed Kubeflow task.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(rc)
