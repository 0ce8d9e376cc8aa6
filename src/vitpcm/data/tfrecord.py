"""The TFRecord schema shared by the converter (writer) and the reader.

Files are ``<split>-<shard:05d>-of-<n:05d>.tfrecord`` holding ``tf.train.Example`` records
with the features of DESIGN.md; the test split carries no segmentation features. A
``dataset.json`` beside them (name, num_classes, class names, split sizes) is written last
and marks the folder as complete.
"""

from __future__ import annotations

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
    """Serialize one sample; ``label`` is the encoded mask (PNG), absent for the test split."""
    import tensorflow as tf

    def _bytes(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def _int(value: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    feature = {
        IMAGE_ENCODED: _bytes(image),
        IMAGE_FILENAME: _bytes(filename.encode("utf-8")),
        IMAGE_FORMAT: _bytes(image_format.encode("utf-8")),
        IMAGE_HEIGHT: _int(height),
        IMAGE_WIDTH: _int(width),
        IMAGE_CHANNELS: _int(channels),
    }
    if label is not None:
        feature[LABEL_ENCODED] = _bytes(label)
        feature[LABEL_FORMAT] = _bytes(label_format.encode("utf-8"))
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString()


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
