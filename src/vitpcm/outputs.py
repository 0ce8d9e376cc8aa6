"""Who owns an output folder: the marker every command writes, and the check before writing.

Every folder (or ``s3://`` prefix) this tool writes holds :data:`MARKER`, a small JSON file
naming the command that wrote it (its *kind*: ``data convert``, ``train``, ``eval``...).
Before a command writes ``--out`` it calls :func:`claim_output`, which refuses, with one
line, an ``--out`` that

* equals one of the command's inputs, lies inside one, or contains one;
* is an existing file (or ``s3://`` object);
* is a non-empty folder without our marker, or with the marker of another kind.

An output of the same kind is ours to replace (or, for ``train``, to resume); an empty or
missing folder is free. Nothing is written by the check itself. The rule is git's and
rsync's: never delete or overwrite what this tool did not write.

Usage (every command that writes ``--out``)::

    from vitpcm import outputs

    outputs.claim_output(out, "predict", inputs={"-m": model, "INPUT": image_dir})
    with storage.atomic_dir(out, kind="predict") as tmp:   # writes the marker into tmp
        ...

Commands that write in place instead of through :func:`vitpcm.storage.atomic_dir` (``train``,
``data download``) call :func:`write_marker` on ``out`` right after the claim.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping

from vitpcm import storage
from vitpcm.errors import VitpcmError
from vitpcm.storage.marker import KINDS as KINDS
from vitpcm.storage.marker import MARKER as MARKER
from vitpcm.storage.marker import check_kind
from vitpcm.storage.marker import marker_bytes as marker_bytes
from vitpcm.storage.marker import read_kind as read_kind
from vitpcm.storage.marker import write_marker as write_marker


class OutputError(VitpcmError):
    """An ``--out`` that would replace or mix with something this tool did not write."""


def claim_output(
    out: str | os.PathLike[str],
    kind: str,
    *,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
    flag: str = "--out",
    allow: tuple[str, ...] = (),
) -> bool:
    """Check that ``out`` may receive a ``kind`` output; refuse with one line otherwise.

    Args:
        out: The output folder or ``s3://`` prefix.
        kind: The writing command, one of :data:`KINDS`.
        inputs: The command's inputs by the flag that named them (``{"--src": src}``);
            None values are ignored. Local paths are compared after resolving symlinks.
        flag: How the message names ``out``.
        allow: Entry names that may sit in ``out`` without making it someone else's
            (``train`` allows ``replicas``, written by the other workers of the same job).

    Returns:
        True when ``out`` already holds an output of this kind (to be replaced or resumed),
        False when it is missing or empty.

    Raises:
        OutputError: ``out`` is an input, inside or above one, a file, a non-empty folder
            this tool did not write, or the output of another command.
    """
    check_kind(kind)
    text = storage.local_path(out).rstrip("/") or "/"
    if storage.is_http(text):
        raise OutputError(f"{flag} {text}: http(s) URLs are read-only; choose a folder or s3://")
    for name, value in (inputs or {}).items():
        if value is not None and str(value):
            _check_apart(text, flag, storage.local_path(value), name)
    state = storage.entry_state(text)
    if state == "file":
        raise OutputError(
            f"{flag} {text} is an existing file; choose a folder (the file was left as it is)"
        )
    if state == "missing":
        return False
    names = [n for n in storage.listdir(text) if n not in allow]
    if not names:
        return False
    found = read_kind(text)
    if found == kind:
        return True
    if found is not None:
        raise OutputError(
            f"{flag} {text} holds the output of `vitpcm {found}`, not `vitpcm {kind}`; "
            "choose another folder"
        )
    raise OutputError(
        f"{flag} {text} is not empty and was not written by `vitpcm {kind}` (no {MARKER}); "
        "choose a new or empty folder"
    )


def _key(uri: str) -> tuple[str, str]:
    """A comparable form: ``("s3", "bucket/prefix")`` or ``("local", resolved path)``."""
    if storage.is_s3(uri):
        return "s3", posixpath.normpath(uri[len("s3://") :]).strip("/")
    return "local", os.path.realpath(uri)


def _inside(child: str, parent: str, sep: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(sep) + sep)


def _check_apart(out: str, flag: str, given: str, name: str) -> None:
    (out_scheme, out_key), (in_scheme, in_key) = _key(out), _key(given)
    if out_scheme != in_scheme:
        return
    sep = "/" if out_scheme == "s3" else os.sep
    if out_key == in_key:
        raise OutputError(
            f"{flag} {out} is the input {name} {given}; writing there would replace it: "
            f"choose another {flag}"
        )
    if _inside(out_key, in_key, sep):
        raise OutputError(
            f"{flag} {out} is inside the input {name} {given}; choose a {flag} outside it"
        )
    if _inside(in_key, out_key, sep):
        raise OutputError(
            f"{flag} {out} contains the input {name} {given}; replacing it would delete the "
            f"input: choose another {flag}"
        )
