"""``dataset.json``: what a converted dataset holds, written last by the converter.

Its content: ``name``, ``num_classes``, ``class_names``, ``splits`` (per split
``num_examples``, ``num_shards``, ``has_masks`` and the shard ``files``, relative to the
dataset root), ``skipped`` samples, ``source`` and ``format_version``. The converter
(:mod:`vitpcm.data.convert`) writes it and every reader reads it through this module.
"""

from __future__ import annotations

import json
import os
from typing import Any

from vitpcm import storage
from vitpcm.data.tfrecord import DATASET_JSON
from vitpcm.errors import DataError

FORMAT_VERSION = 1


def write_dataset_info(folder: str, info: dict[str, Any]) -> None:
    """Write ``info`` as ``<folder>/dataset.json`` in one write (on S3: one PUT, the commit)."""
    payload = json.dumps(info, indent=2).encode("utf-8") + b"\n"
    storage.write_bytes(storage.join(folder, DATASET_JSON), payload)


def read_dataset_info(uri: str | os.PathLike[str]) -> dict[str, Any]:
    """Load the ``dataset.json`` of a converted dataset (local folder or ``s3://`` prefix).

    Raises:
        DataError: No ``dataset.json`` (not converted, or interrupted), unreadable JSON, or
            no ``splits`` or integer ``num_classes`` in it.
    """
    text = storage.local_path(uri).rstrip("/")
    path = storage.join(text, DATASET_JSON)
    if not storage.exists(path):
        raise DataError(
            f"no dataset.json in {text}: not a converted dataset or an interrupted "
            "conversion; run vitpcm data convert"
        )
    try:
        info = json.loads(storage.read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); run vitpcm data convert again") from exc
    if (
        not isinstance(info, dict)
        or "splits" not in info
        or not isinstance(info.get("num_classes"), int)
    ):
        raise DataError(
            f"{path} lacks 'splits' or an integer 'num_classes'; run vitpcm data convert again"
        )
    return info
