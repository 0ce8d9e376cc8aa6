"""The TFRecord schema shared by the converter (writer) and the reader.

Files are ``<split>-<shard:05d>-of-<n:05d>.tfrecord`` holding ``tf.train.Example`` records
with the features of DESIGN.md; the test split carries no segmentation features. A
``dataset.json`` beside them (name, num_classes, class names, split sizes) is written last
and marks the folder as complete.
"""

from __future__ import annotations

import struct
from typing import Any

DATASET_JSON = "dataset.json"

IMAGE_ENCODED = "image/encoded"
IMAGE_FILENAME = "image/filename"
IMAGE_FORMAT = "image/format"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
IMAGE_CHANNELS = "image/channels"
LABEL_ENCODED = "image/segmentation/class/encoded"
LABEL_FORMAT = "image/segmentation/class/format"


def shard_name(split: str, index: int, num_shards: int) -> str:
    """File name of one shard, e.g. ``train-00003-of-00008.tfrecord``."""
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def shard_pattern(split: str) -> str:
    """Glob pattern matching every shard of ``split``."""
    return f"{split}-?????-of-?????.tfrecord"


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 on the wire is two's complement
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_example(
    *,
    image: bytes,
    filename: str,
    image_format: str,
    height: int,
    width: int,
    channels: int = 3,
    label: bytes | None = None,
    label_format: str = "png",
) -> bytes:
    """Serialize one sample as a ``tf.train.Example``, without importing TensorFlow.

    ``label`` is the encoded mask (PNG), absent for splits without ground truth. Worker
    processes of the converter would otherwise spend seconds importing TF each; the wire
    format is small enough to write directly:
    Example{features=1: Features{feature=1: map<string, Feature>}}; Feature has
    bytes_list=1 and int64_list=3, each a repeated ``value=1`` (int64 packed).
    """

    def as_bytes(value: bytes) -> bytes:
        return _field(1, _field(1, value))

    def as_int(value: int) -> bytes:
        return _field(3, _field(1, _varint(int(value))))

    features = [
        (IMAGE_ENCODED, as_bytes(image)),
        (IMAGE_FILENAME, as_bytes(filename.encode("utf-8"))),
        (IMAGE_FORMAT, as_bytes(image_format.encode("utf-8"))),
        (IMAGE_HEIGHT, as_int(height)),
        (IMAGE_WIDTH, as_int(width)),
        (IMAGE_CHANNELS, as_int(channels)),
    ]
    if label is not None:
        features.append((LABEL_ENCODED, as_bytes(label)))
        features.append((LABEL_FORMAT, as_bytes(label_format.encode("utf-8"))))
    entries = b"".join(
        _field(1, _field(1, key.encode("utf-8")) + _field(2, value)) for key, value in features
    )
    return _field(1, entries)


def _crc32c(data: bytes) -> int:
    import google_crc32c

    return int(google_crc32c.value(data))


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(record: bytes) -> bytes:
    """One TFRecord entry: length, masked CRC32C of the length, data, masked CRC32C of it."""
    length = struct.pack("<Q", len(record))
    return (
        length
        + struct.pack("<I", _masked_crc(length))
        + record
        + struct.pack("<I", _masked_crc(record))
    )


def feature_spec(with_label: bool = True) -> dict[str, Any]:
    """``tf.io.parse_single_example`` spec; ``with_label`` for splits that carry masks."""
    import tensorflow as tf

    spec = {
        IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string),
        IMAGE_FILENAME: tf.io.FixedLenFeature([], tf.string),
        IMAGE_FORMAT: tf.io.FixedLenFeature([], tf.string),
        IMAGE_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
        IMAGE_WIDTH: tf.io.FixedLenFeature([], tf.int64),
        IMAGE_CHANNELS: tf.io.FixedLenFeature([], tf.int64, default_value=3),
    }
    if with_label:
        spec[LABEL_ENCODED] = tf.io.FixedLenFeature([], tf.string)
        spec[LABEL_FORMAT] = tf.io.FixedLenFeature([], tf.string, default_value="png")
    return spec


def parse_example(serialized: Any, with_label: bool = True) -> dict[str, Any]:
    """Parse one serialized example into a dict of tensors keyed by feature name."""
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, feature_spec(with_label))


def decode_example(serialized: bytes) -> dict[str, Any]:
    """Eagerly decode one serialized example to Python values (for tests and tools)."""
    import tensorflow as tf

    example = tf.train.Example.FromString(serialized)
    out: dict[str, Any] = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value)
        out[key] = values[0] if len(values) == 1 else values
    return out
