"""Every written shard is read back through the reader's own decoder before it is committed.

Header checks and Pillow accept some damaged JPEGs that TensorFlow refuses (measured on
randomly damaged files: a stray marker inside the scan data), and such a file used to pass
``vitpcm data convert`` and then stop training hours later. Decoding each record with
:func:`vitpcm.data.reader.decode_record`, the function training runs, proves it will not. The
check runs in the converting process on each shard as a worker finishes it, decoding in
parallel inside tf.data (workers stay TensorFlow-free, see :mod:`vitpcm.data.shards`); only
when a shard fails is it walked record by record to name the file.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from vitpcm.data import tfrecord
from vitpcm.data.shards import ShardResult, ShardTask
from vitpcm.errors import BadSampleError

log = logging.getLogger(__name__)


def verify_shard(task: ShardTask, result: ShardResult) -> None:
    """Decode every record of the shard ``task`` wrote as training will.

    Args:
        task: The written shard (local ``path``, its samples to name a bad file, and
            ``skip_bad``: skip bad records instead of failing).
        result: The shard's result; with ``skip_bad`` the records TensorFlow cannot decode
            are removed from the shard and moved to ``result.skipped``.

    Raises:
        BadSampleError: A record's image or mask cannot be decoded (without ``skip_bad``).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    path, with_label = task.path, task.masks is not None
    try:
        _decode_all(with_label)(tf.constant(path))
        return
    except tf.errors.OpError:
        pass  # find which record, and which of its files
    keep: list[bytes] = []
    for serialized in tf.data.TFRecordDataset(path):
        record = serialized.numpy()
        failure = _decode_failure(record, with_label, tf)
        if failure is None:
            keep.append(record)
            continue
        where, reason = _name(record, failure[0], task), failure[1]
        if not task.skip_bad:
            raise BadSampleError(where, reason)
        result.skipped.append((where, reason))
        result.written -= 1
    with open(path, "wb") as out:
        for record in keep:
            out.write(tfrecord.tfrecord_frame(record))


_CHECKS: dict[bool, Any] = {}


def _decode_all(with_label: bool) -> Any:
    """``path -> record count``, decoding every record as training does; traced once.

    The records are decoded in parallel tf.data threads and counted inside the graph, so a
    shard costs no Python per record and no new trace (the converting process checks many).
    """
    import tensorflow as tf

    from vitpcm.data.reader import decode_record

    if with_label not in _CHECKS:

        @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
        def decode_all(path: Any) -> Any:
            heights = tf.data.TFRecordDataset(path).map(
                lambda record: decode_record(record, with_label, 1)["height"],
                num_parallel_calls=os.cpu_count() or 1,
            )
            return heights.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1)

        _CHECKS[with_label] = decode_all
    return _CHECKS[with_label]


def _decode_failure(record: bytes, with_label: bool, tf: Any) -> tuple[str, str] | None:
    """``(image|mask, reason)`` when TensorFlow cannot decode one of the record's files."""
    example = tfrecord.decode_example(record)
    checks = [("image", example[tfrecord.IMAGE_ENCODED], False)]
    if with_label and tfrecord.LABEL_ENCODED in example:
        checks.append(("mask", example[tfrecord.LABEL_ENCODED], True))
    for which, data, is_mask in checks:
        try:
            if is_mask:
                tf.io.decode_png(data, channels=1, dtype=tf.uint8)
            else:
                tf.io.decode_image(data, channels=3, expand_animations=False)
        except tf.errors.OpError as exc:
            message = (exc.message or type(exc).__name__).strip().splitlines()[0]
            message = message.split(" [Op:")[0].split("}} ")[-1]
            return which, (
                f"TensorFlow, which training decodes with, cannot decode it ({message}); "
                "replace the file or convert with --skip-bad"
            )
    return None


def _name(record: bytes, which: str, task: ShardTask) -> str:
    """The source file behind a record's image or mask."""
    name = tfrecord.decode_example(record)[tfrecord.IMAGE_FILENAME].decode("utf-8")
    for sample in task.samples:
        if os.path.basename(sample.image) == name:
            if which == "image" or task.masks is None:
                return sample.image
            return task.masks.name(sample)
    return name
