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
from collections.abc import Iterator, Sequence
from pathlib import Path

from vitpcm.errors import StorageError
from vitpcm.storage import (
    exists,
    is_http,
    is_s3,
    join,
    list_files,
    local_path,
    makedirs,
    remove_files,
    remove_tree,
    s3,
    write_bytes,
)

log = logging.getLogger(__name__)


def _commit_order(files: Sequence[str], commit_last: Sequence[str]) -> list[str]:
    """Files in copy order: the commit markers after everything else."""
    last = set(commit_last)
    return [f for f in files if posixpath.basename(f) not in last] + [
        f for f in files if posixpath.basename(f) in last
    ]


_TMP_NAME = re.compile(r"\.(tmp|old)-[0-9a-f]{8}$")
_S3_TMP_DIR = ".tmp-"
_OWNER = ".vitpcm-owner.json"


@contextlib.contextmanager
def atomic_dir(
    final_uri: str | os.PathLike[str],
    *,
    kind: str | None = None,
    overwrite: bool = True,
    commit_last: Sequence[str] = ("dataset.json", "metrics.json", "model.json"),
) -> Iterator[str]:
    """Yield a temporary folder URI that becomes ``final_uri`` only if the block succeeds.

    Locally the folder is built beside the final one and swapped in with one atomic
    ``renameat2(RENAME_EXCHANGE)`` (two renames where the kernel lacks it), so a reader
    sees the old folder or the new one. On ``s3://`` (no rename) the objects are staged
    under ``<final>/.tmp-<id>/``; at the commit the old commit markers go first, then the
    new files, the new markers (``commit_last``) last, then whatever the old output had
    that the new one does not: a reader keyed on the markers sees the old complete output,
    nothing, or the new complete one, never a mix. On any exception the temporary folder
    is removed and the final one is left untouched.

    Args:
        final_uri: The output folder or ``s3://`` prefix. Check it first with
            :func:`vitpcm.outputs.claim_output`: this replaces what is there.
        kind: The output's kind (:data:`vitpcm.outputs.KINDS`): the ownership marker is
            written into the temporary folder first, so the temporaries of a killed run
            are recognised (and removed) by the next run of the same kind.
        overwrite: Refuse an existing ``final_uri`` instead of replacing it.
        commit_last: File names written last on ``s3://``.
    """
    final = local_path(final_uri).rstrip("/")
    if is_http(final):
        raise StorageError(f"cannot write {final}: http(s) URLs are read-only")
    if exists(final) and not overwrite:
        raise StorageError(f"{final} already exists; remove it or choose another output")
    if kind is not None:
        remove_stale_temporaries(final, kind)
    if is_s3(final) and kind is not None:
        tmp = join(final, f"{_S3_TMP_DIR}{uuid.uuid4().hex[:8]}")
        from vitpcm import outputs

        outputs.write_marker(final, kind)  # the prefix is ours from now on
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
        if kind is not None:
            _commit_s3_in_place(final, tmp, commit_last)
        else:
            _commit_s3_copy(final, tmp, commit_last)
    finally:
        remove_tree(tmp)


def _write_owner(tmp: str, kind: str) -> None:
    from vitpcm import outputs

    owner = {"kind": kind, "pid": os.getpid(), "host": socket.gethostname()}
    write_bytes(join(tmp, _OWNER), json.dumps(owner).encode())
    if not is_s3(tmp):
        outputs.write_marker(tmp, kind)


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
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), b)


def _commit_s3_in_place(final: str, tmp: str, commit_last: Sequence[str]) -> None:
    tmp_rel = posixpath.relpath(tmp, final)
    new = [f for f in list_files(tmp) if f != _OWNER]
    old = [
        f
        for f in list_files(final)
        if not f.startswith(_S3_TMP_DIR) and posixpath.basename(f) != ".vitpcm-output.json"
    ]
    last = set(commit_last)
    remove_files(final, [f for f in old if posixpath.basename(f) in last])
    for rel in _commit_order(new, commit_last):
        s3.copy(join(final, tmp_rel, rel), join(final, rel))
    keep = set(new)
    remove_files(final, [f for f in old if f not in keep])


def _commit_s3_copy(final: str, tmp: str, commit_last: Sequence[str]) -> None:
    if exists(final):
        remove_tree(final)
    for rel in _commit_order(list_files(tmp), commit_last):
        s3.copy(join(tmp, rel), join(final, rel))


def remove_stale_temporaries(final_uri: str | os.PathLike[str], kind: str) -> list[str]:
    """Delete what killed runs of ``kind`` left beside (or, on ``s3://``, inside) ``final_uri``.

    Locally these are ``<final>.tmp-<id>`` / ``<final>.old-<id>`` folders holding the
    marker of ``kind`` and no live owner process on this host; on ``s3://`` the
    ``<final>/.tmp-<id>/`` prefixes. Nothing without our marker is touched.

    Returns:
        The removed folders or prefixes.
    """
    from vitpcm import outputs

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
        if outputs.read_kind(path) != kind or _owner_alive(path):
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
