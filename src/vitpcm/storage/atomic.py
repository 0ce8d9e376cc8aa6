"""Atomic output folders, local and ``s3://``: a reader sees the old output or the new one.

:func:`atomic_dir` builds an output under a temporary name and commits it whole;
:func:`remove_stale_temporaries` removes what killed runs left. Both are re-exported by
:mod:`vitpcm.storage`; on ``s3://`` the commit copies objects server-side (MinIO client).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from vitpcm.errors import StorageError
from vitpcm.run_files import METRICS_JSON
from vitpcm.storage import marker, s3
from vitpcm.storage.core import (
    is_http,
    is_s3,
    join,
    list_files,
    local_path,
    makedirs,
    remove_files,
    remove_tree,
    write_bytes,
)

log = logging.getLogger(__name__)


_TMP_NAME = re.compile(r"\.(tmp|old)-[0-9a-f]{8}$")
_S3_TMP_DIR = ".tmp-"
_OWNER = ".vitpcm-owner.json"
# Commit markers: readers require them, so on s3:// they are copied in last.
COMMIT_LAST = ("dataset.json", METRICS_JSON, "model.json")


@contextlib.contextmanager
def atomic_dir(final_uri: str | os.PathLike[str], *, kind: str | None = None) -> Iterator[str]:
    """Yield a temporary folder URI that becomes ``final_uri`` only if the block succeeds.

    Locally the folder is built beside the final one and swapped in with one atomic
    ``renameat2(RENAME_EXCHANGE)`` (two renames where the kernel lacks it), so a reader
    sees the old folder or the new one. On ``s3://`` (no rename) the objects are staged
    under ``<final>/.tmp-<id>/``; at the commit the old commit markers go first, then the
    new files, the new markers (:data:`COMMIT_LAST`) last, then whatever the old output had
    that the new one does not: a reader keyed on the markers sees the old complete output,
    nothing, or the new complete one, never a mix. On any exception the temporary folder
    is removed and the final one is left untouched.

    Args:
        final_uri: The output folder or ``s3://`` prefix. Check it first with
            :func:`vitpcm.outputs.claim_output`: this replaces what is there.
        kind: The output's kind (:data:`vitpcm.storage.marker.KINDS`): the ownership marker is
            written into the temporary folder first, so the temporaries of a killed run
            are recognised (and removed) by the next run of the same kind.
    """
    final = local_path(final_uri).rstrip("/")
    if is_http(final):
        raise StorageError(f"cannot write {final}: http(s) URLs are read-only")
    if kind is not None:
        remove_stale_temporaries(final, kind)
    if is_s3(final):
        tmp = join(final, f"{_S3_TMP_DIR}{uuid.uuid4().hex[:8]}")
        if kind is not None:
            marker.write_marker(final, kind)  # the prefix is ours from now on
    else:
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    makedirs(tmp)
    try:
        if kind is not None:
            _write_owner(tmp, kind)
        yield tmp
    except BaseException:
        remove_tree(tmp)
        raise
    if not is_s3(final):
        if kind is not None:
            os.remove(os.path.join(tmp, _OWNER))
        _swap_in(tmp, final)
        return
    try:
        _commit_s3(final, tmp)
    finally:
        remove_tree(tmp)


def _write_owner(tmp: str, kind: str) -> None:
    owner = {"kind": kind, "pid": os.getpid(), "host": socket.gethostname()}
    write_bytes(join(tmp, _OWNER), json.dumps(owner).encode())
    if not is_s3(tmp):
        marker.write_marker(tmp, kind)


def _swap_in(tmp: str, final: str) -> None:
    """Put the finished folder ``tmp`` at ``final``; delete the old one after the swap."""
    if os.path.isdir(final) and _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
        return
    old = None
    if os.path.lexists(final):
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where that is unsupported."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p] * 2 + [ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), b)


def _commit_s3(final: str, tmp: str) -> None:
    """Copy the staged objects into place, markers last (see :func:`atomic_dir`)."""
    tmp_rel = posixpath.relpath(tmp, final)
    new = [f for f in list_files(tmp) if f != _OWNER]
    old = [
        f
        for f in list_files(final)
        if not f.startswith(_S3_TMP_DIR) and posixpath.basename(f) != ".vitpcm-output.json"
    ]
    last = [f for f in new if posixpath.basename(f) in COMMIT_LAST]
    remove_files(final, [f for f in old if posixpath.basename(f) in COMMIT_LAST])
    for rel in [f for f in new if f not in last] + last:
        s3.copy(join(final, tmp_rel, rel), join(final, rel))
    keep = set(new)
    remove_files(final, [f for f in old if f not in keep])


def remove_stale_temporaries(final_uri: str | os.PathLike[str], kind: str) -> list[str]:
    """Delete what killed runs of ``kind`` left beside (or, on ``s3://``, inside) ``final_uri``.

    Locally these are ``<final>.tmp-<id>`` / ``<final>.old-<id>`` folders holding the
    marker of ``kind`` and no live owner process on this host; on ``s3://`` the
    ``<final>/.tmp-<id>/`` prefixes. Nothing without our marker is touched.

    Returns:
        The removed folders or prefixes.
    """
    final = local_path(final_uri).rstrip("/")
    removed = []
    if is_s3(final):
        stale = {f.split("/", 1)[0] for f in list_files(final) if f.startswith(_S3_TMP_DIR)}
        for name in sorted(stale):
            remove_tree(join(final, name))
            removed.append(join(final, name))
        return removed
    parent, name = os.path.split(os.path.abspath(final))
    try:
        siblings = os.listdir(parent)
    except OSError:
        return []
    for sibling in siblings:
        path = os.path.join(parent, sibling)
        if not (sibling.startswith(name) and _TMP_NAME.fullmatch(sibling[len(name) :])):
            continue
        if marker.read_kind(path) != kind or _owner_alive(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("removed %d stale temporary folder(s)", len(removed))
    return removed


def _owner_alive(path: str) -> bool:
    """Whether the process that made a temporary folder still runs (on this host)."""
    try:
        owner = json.loads(Path(path, _OWNER).read_text())
        pid, host = int(owner["pid"]), owner["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return host != socket.gethostname()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
