"""Reading the converted dataset in place, importable inside the step containers.

The scoring and registration steps take the dataset as its URI (the convert step's
output), not as an input artifact: KFP would copy every shard of every split into the pod,
tens of GB for COCO, when a step reads one split. The library reads the URI directly
(tensorflow-io's ``s3://`` filesystem, credentials from the ``vitpcm-s3`` Secret), so only
the split's shards and ``dataset.json`` travel.
"""

from __future__ import annotations

import atexit
import os
import sys


def readable_uri(uri: str) -> str:
    """The URI the library reads: KFP's ``minio://bucket/key`` is ``s3://bucket/key``."""
    if uri.startswith("minio://"):
        return "s3://" + uri[len("minio://") :]
    return uri


def exit_cleanly_after_s3(uri: str) -> None:
    """Inside a KFP step that reads ``s3://``: leave through ``os._exit`` with the right
    status, since tensorflow-io aborts at interpreter teardown after any S3 access
    (tensorflow/io#2039), which would fail a step whose outputs are already recorded."""
    if not uri.startswith("s3://") or os.environ.get("_KFP_RUNTIME") != "true":
        return
    from vitpcm import storage

    atexit.register(lambda: storage.exit_process(int(getattr(sys, "last_value", None) is not None)))
