"""The ownership marker: the file at the root of every output naming the command that wrote it.

:mod:`vitpcm.outputs` decides with it whether an ``--out`` may be written;
:func:`vitpcm.storage.atomic_dir` writes it into every folder it commits and trusts only
marked temporaries when it cleans up after a killed run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from vitpcm.run_files import CONFIG_FILE
from vitpcm.storage import core as storage

MARKER = ".vitpcm-output.json"
"""File at the root of every output, naming the command (kind) that wrote it."""

KINDS = (
    "data convert",
    "data synth",
    "data download",
    "train",
    "eval",
    "test",
    "predict",
    "weights",
)


def marker_bytes(kind: str) -> bytes:
    """The marker's content for ``kind`` (deterministic: same bytes on every run)."""
    check_kind(kind)
    return json.dumps({"tool": "vitpcm", "kind": kind, "format": 1}, sort_keys=True).encode()


def write_marker(folder: str | os.PathLike[str], kind: str) -> None:
    """Write the marker of ``kind`` into ``folder`` (local or ``s3://``), atomically."""
    storage.write_bytes(storage.join(storage.local_path(folder), MARKER), marker_bytes(kind))


def read_kind(folder: str | os.PathLike[str]) -> str | None:
    """The kind named by ``folder``'s marker (or a pre-marker output's signature), or None."""
    text = storage.local_path(folder).rstrip("/") or "/"
    path = storage.join(text, MARKER)
    if storage.exists(path):
        try:
            data = json.loads(storage.read_bytes(path))
        except ValueError:
            return None
        kind = data.get("kind") if isinstance(data, dict) else None
        return kind if kind in KINDS else None
    for kind, (name, recognise) in _LEGACY.items():
        legacy = storage.join(text, name)
        if storage.exists(legacy):
            try:
                if recognise(storage.read_bytes(legacy)):
                    return kind
            except (ValueError, UnicodeDecodeError, AttributeError, TypeError):
                continue
    return None


def check_kind(kind: str) -> None:
    """Refuse a kind that is not one of :data:`KINDS`."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; one of {KINDS}")


def _synth_signature(data: bytes) -> bool:
    return json.loads(data).get("generator") == "vitpcm data synth"


def _dataset_signature(data: bytes) -> bool:
    info = json.loads(data)
    return "format_version" in info and isinstance(info.get("splits"), dict)


def _download_signature(data: bytes) -> bool:
    return isinstance(json.loads(data).get("files"), dict)


def _train_signature(data: bytes) -> bool:
    return data.decode("utf-8").startswith("# Resolved vitpcm config")


# Outputs written before the marker existed are recognised by a file only this tool writes.
_LEGACY: dict[str, tuple[str, Callable[[bytes], Any]]] = {
    "data synth": ("synth.json", _synth_signature),
    "data convert": ("dataset.json", _dataset_signature),
    "data download": (".vitpcm-download.json", _download_signature),
    "train": (CONFIG_FILE, _train_signature),
}
