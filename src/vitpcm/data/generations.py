"""Generations of a converted dataset on ``s3://``: upload beside, commit by one PUT.

S3 has no rename, so :func:`vitpcm.data.convert.convert_dataset` uploads each run's shards
under a new prefix ``<out>/gen-<id>/`` and commits them by writing ``<out>/dataset.json``,
which lists them: readers follow ``dataset.json``, so they see the old complete dataset or
the new complete one. :func:`remove_unreferenced` then deletes what no ``dataset.json``
refers to: older generations, the uploads of killed runs, files of the flat layout earlier
versions wrote.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import re
from collections.abc import Iterator
from typing import Any

from vitpcm import outputs, storage
from vitpcm.data import tfrecord
from vitpcm.errors import DataError

logger = logging.getLogger(__name__)

KIND = "data convert"
_GENERATION = re.compile(r"gen-[0-9a-f]{12}$")


@contextlib.contextmanager
def open_generation(out: str, generation: str) -> Iterator[str]:
    """The ``s3://`` generation prefix a run uploads into (see the module docstring).

    The prefix is marked as ours first; what killed runs left is removed; on failure the
    run's own upload is removed and the committed dataset is left as it was.
    """
    fresh = not storage.list_files(out)
    outputs.write_marker(out, KIND)
    current = _read_existing_info(out)
    remove_unreferenced(out, current)
    _remove_legacy_temporaries(out)
    target = storage.join(out, generation)
    try:
        yield target
    except BaseException:
        # A first conversion that failed leaves nothing, not even the marker.
        storage.remove_tree(out if fresh else target)
        raise


def _read_existing_info(out: str) -> dict[str, Any] | None:
    """The committed ``dataset.json`` of ``out``, or None (none yet, or unreadable)."""
    from vitpcm.data.manifest import read_dataset_info

    try:
        return read_dataset_info(out)
    except DataError:
        return None


def _referenced(info: dict[str, Any] | None) -> set[str]:
    """Files (relative to the dataset root) that a ``dataset.json`` makes part of the dataset."""
    keep = {tfrecord.DATASET_JSON, outputs.MARKER}
    for entry in (info or {}).get("splits", {}).values():
        if isinstance(entry, dict):
            keep.update(str(f) for f in entry.get("files", []))
    return keep


def remove_unreferenced(out: str, info: dict[str, Any] | None) -> None:
    """Delete objects under ``out`` that its ``dataset.json`` does not list.

    Without a readable ``dataset.json`` only generation prefixes (``gen-<id>/``, always
    ours) are removed: there is then no list to tell ours from anything else.
    """
    keep = _referenced(info)
    stale = [
        rel
        for rel in storage.list_files(out)
        if rel not in keep and (info is not None or _GENERATION.match(rel.split("/", 1)[0]))
    ]
    if stale:
        logger.info("removing %d object(s) no dataset.json refers to under %s", len(stale), out)
        storage.remove_files(out, stale)


def _remove_legacy_temporaries(out: str) -> None:
    """Delete ``<out>.tmp-<id>/`` prefixes that killed conversions of earlier versions left."""
    name = posixpath.basename(out)
    for folder in storage.glob(f"{out}.tmp-*"):
        tail = posixpath.basename(folder.rstrip("/"))[len(name) :]
        if not re.fullmatch(r"\.tmp-[0-9a-f]{8}", tail):
            continue
        files = storage.list_files(folder)
        if all(f.endswith(".tfrecord") or f == tfrecord.DATASET_JSON for f in files):
            logger.info("removing %s, left by an interrupted conversion", folder)
            storage.remove_files(folder, files)
