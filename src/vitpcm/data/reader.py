"""tf.data input pipeline over the converted TFRecords (local folder or ``s3://`` prefix).

Training elements (``training=True``), batched with the last partial batch dropped so the
per-replica batch stays a multiple of 4 (the ET mosaic tiles views in fours)::

    image   (B, S, S, 3) float32 [0, 255]  main view: jittered, flipped/transposed
    labels  (B, K)       float32           multi-hot image labels, from the mask
    params1 (B, 7)       float32           main view's ViewParams (crop_flag 0)
    view2   (B, v, v, 3) float32           second view (own jitter, flips, crop)  [ET only]
    params2 (B, 7)       float32           second view's ViewParams               [ET only]

Evaluation elements (``training=False``): every sample exactly once, in shard then record
order (the reference code dropped the last partial validation batch)::

    image          (B, S, S, 3) float32  resized for the network
    labels         (B, K)       float32  [with_label]
    mask           (B, h, w)    uint8    original resolution, padded with 255  [with_label]
    original_image (B, h, w, 3) uint8    original resolution, padded with 0    [include_original]
    filename (B,) string, height (B,) int32, width (B,) int32 (crop padded tensors back)

Randomness is stateless, keyed on (a per-iteration random stream, element index): a seeded
pipeline built twice yields the same batches, while iterating one dataset again (the next
epoch) draws a new order and new augmentations.
"""

from __future__ import annotations

import posixpath
import re
import time
from dataclasses import dataclass
from typing import Any

from vitpcm import storage
from vitpcm.config import AugmentConfig, DataConfig, EtConfig
from vitpcm.data import tfrecord
from vitpcm.data.augment import TrainingViews, resize_image
from vitpcm.data.labels import IGNORE_LABEL
from vitpcm.data.manifest import read_dataset_info
from vitpcm.errors import ConfigError, DataError

# Shards read at once while training; more only adds memory once I/O is saturated.
_MAX_CYCLE = 16
# Larger reads amortise S3 request latency; harmless locally.
_READ_BUFFER_BYTES = 8 << 20
_SHARD_COUNT = re.compile(r"-\d{5}-of-(\d{5})\.tfrecord$")


@dataclass(frozen=True)
class SplitInfo:
    """What the reader needs to know about one split of a converted dataset."""

    uri: str
    split: str
    files: tuple[str, ...]
    num_examples: int | None
    has_masks: bool | None  # None when dataset.json does not say
    num_classes: int
    class_names: tuple[str, ...]


def _convert_hint(uri: str) -> str:
    return f"convert the dataset first: `vitpcm data convert --dataset ... --out {uri}`"


def _split_entries(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Split name -> its ``dataset.json`` entry (``num_examples``, ``has_masks``, ...)."""
    splits = info.get("splits", {})
    if isinstance(splits, list):
        return {str(name): {} for name in splits}
    if not isinstance(splits, dict):
        return {}
    return {
        str(name): value if isinstance(value, dict) else {"num_examples": value}
        for name, value in splits.items()
    }


def _listed_files(uri: str, split: str, listed: list[str]) -> list[str]:
    """The shards ``dataset.json`` lists for ``split``, checked to exist (one listing a folder)."""
    files = [storage.join(uri, rel) for rel in listed]
    present: set[str] = set()
    for folder in sorted({posixpath.dirname(rel) for rel in listed}):
        pattern = storage.join(uri, folder, tfrecord.shard_pattern(split)) if folder else None
        present.update(storage.glob(pattern or storage.join(uri, tfrecord.shard_pattern(split))))
    missing = [f for f in files if f not in present]
    if missing:
        raise DataError(
            f"split {split!r} in {uri} has {len(files) - len(missing)} of its {len(files)} "
            f"shards ({posixpath.basename(missing[0])} is missing); the dataset is "
            f"incomplete: {_convert_hint(uri)}"
        )
    return files


def read_split_info(uri: str, split: str, num_classes: int | None = None) -> SplitInfo:
    """Check a converted dataset and list one split's shards.

    Raises:
        DataError: ``dataset.json`` is missing or broken, the split does not exist or has
            missing shards, or ``num_classes`` disagrees with the dataset.
    """
    uri = storage.local_path(uri).rstrip("/")
    if storage.is_s3(uri):
        storage.ensure_s3_filesystem()  # tf.data streams the shards through tensorflow-io
    info = read_dataset_info(uri)
    entries = _split_entries(info)
    listed = entries.get(split, {}).get("files")
    if isinstance(listed, list) and listed:
        # dataset.json names the shards (on s3:// under the generation it committed).
        files = _listed_files(uri, split, [str(f) for f in listed])
    else:
        files = storage.glob(storage.join(uri, tfrecord.shard_pattern(split)))
    if not files:
        available = set(entries)
        for name in storage.listdir(uri):
            match = _SHARD_COUNT.search(name)
            if match:
                available.add(name[: match.start()])
        raise DataError(
            f"split {split!r} not found in {uri}; available splits: "
            f"{', '.join(sorted(available)) or 'none'}"
        )
    expected = int(_SHARD_COUNT.search(posixpath.basename(files[0])).group(1))
    if len(files) != expected:
        raise DataError(
            f"split {split!r} in {uri} has {len(files)} of its {expected} shards; "
            f"the dataset is incomplete: {_convert_hint(uri)}"
        )
    if num_classes is not None and info["num_classes"] != num_classes:
        raise DataError(
            f"{uri} has {info['num_classes']} classes but {num_classes} were asked for; "
            "set data.num_classes to match the dataset or point data.uri at the right one"
        )
    names = info.get("class_names", [])
    entry = entries.get(split, {})
    size, has_masks = entry.get("num_examples"), entry.get("has_masks")
    return SplitInfo(
        uri=uri,
        split=split,
        files=tuple(files),
        num_examples=size if isinstance(size, int) else None,
        has_masks=has_masks if isinstance(has_masks, bool) else None,
        num_classes=int(info["num_classes"]),
        class_names=tuple(str(n) for n in names) if isinstance(names, list) else (),
    )


def split_has_masks(split_info: SplitInfo) -> bool:
    """Whether a split's records carry masks (``dataset.json`` says, or peek at one record)."""
    import tensorflow as tf

    if split_info.has_masks is not None:
        return split_info.has_masks
    for record in tf.data.TFRecordDataset(split_info.files[0]).take(1):
        example = tf.train.Example.FromString(record.numpy())
        return tfrecord.LABEL_ENCODED in example.features.feature
    return True  # an empty first shard: nothing to decode, so nothing can fail


def decode_record(serialized: Any, with_label: bool, num_classes: int) -> dict[str, Any]:
    """Parse one record: uint8 image (3 channels), uint8 index mask, multi-hot labels."""
    import tensorflow as tf

    features = tfrecord.parse_example(serialized, with_label=with_label)
    # decode_image sniffs JPEG/PNG from the bytes; expand_animations=False keeps it 3-D.
    image = tf.io.decode_image(
        features[tfrecord.IMAGE_ENCODED], channels=3, expand_animations=False
    )
    image.set_shape([None, None, 3])
    shape = tf.shape(image)
    sample = {
        "original_image": image,
        "filename": features[tfrecord.IMAGE_FILENAME],
        "height": shape[0],
        "width": shape[1],
    }
    if with_label:
        # Single-channel PNG of class indices (255 = ignore).
        mask = tf.io.decode_png(features[tfrecord.LABEL_ENCODED], channels=1, dtype=tf.uint8)
        mask = mask[..., 0]
        # bincount drops values >= maxlength, so the ignore label never counts as a class.
        counts = tf.math.bincount(
            tf.reshape(tf.cast(mask, tf.int32), [-1]), minlength=num_classes, maxlength=num_classes
        )
        sample["mask"] = mask
        sample["labels"] = tf.cast(counts > 0, tf.float32)
    return sample


def make_dataset(
    uri: str,
    split: str,
    *,
    image_size: int,
    batch_size: int,
    training: bool,
    num_classes: int,
    augment: AugmentConfig | None = None,
    et: EtConfig | None = None,
    patch_size: int = 16,
    seed: int | None = None,
    shuffle_buffer: int = DataConfig.shuffle_buffer,
    with_label: bool | None = True,
    include_original: bool = False,
    drop_remainder: bool | None = None,
) -> Any:
    """Build the batched ``tf.data.Dataset`` of one split (structure in the module docstring).

    Args:
        uri: folder or ``s3://`` prefix holding the shards and ``dataset.json``.
        split: split name, e.g. ``trainaug`` or ``val``.
        image_size: side S the network sees (multiple of ``patch_size``).
        batch_size: images per batch.
        training: shuffled, augmented views (True) or every sample once, in order (False).
        num_classes: K; must match ``dataset.json``.
        augment: the ``data.augment`` config section; ``None`` means no augmentation.
        et: the resolved ``train.et`` config section; ``None`` disables the second view.
        patch_size: ViT patch side in pixels (views are built on its grid).
        seed: makes the pipeline reproducible; ``None`` draws fresh randomness.
        shuffle_buffer: records held by the training shuffle.
        with_label: read masks and labels (False for a split without masks, like VOC's
            test split); ``None`` decides from the split itself.
        include_original: evaluation only: also return the original uint8 image (CRF).
        drop_remainder: defaults to True for training and False for evaluation.

    Raises:
        DataError: missing/incomplete dataset, unknown split, class-count mismatch, or a
            split without masks where labels are needed.
        ConfigError: sizes that do not fit the patch grid, ET batch not a multiple of 4.
    """
    import tensorflow as tf

    if image_size <= 0 or image_size % patch_size:
        raise ConfigError(
            f"image size {image_size} must be a positive multiple of the patch size {patch_size}"
        )
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if training and with_label is False:
        raise DataError(
            f"cannot train on split {split!r} without labels: training needs the masks' "
            "image-level labels; pick a split with masks (train, trainaug)"
        )
    views = TrainingViews(image_size, patch_size, augment, et) if training else None
    if views is not None and views.et_enabled and batch_size % 4:
        raise ConfigError(
            f"batch size {batch_size} is not a multiple of 4, which the equivariance "
            "mosaic needs (four second views per 2x2 mosaic): set train.batch_size"
        )
    info = read_split_info(uri, split, num_classes)
    if with_label is not False:
        has_masks = split_has_masks(info)
        if with_label is None:
            with_label = has_masks or training
        if with_label and not has_masks:
            raise DataError(
                f"split {split!r} in {info.uri} has no segmentation masks (like a test "
                "split): training and evaluation need masks for the image labels; read it "
                "with with_label=False for inference only"
            )
    if drop_remainder is None:
        drop_remainder = training
    deterministic = seed is not None or not training

    if training:
        files = tf.data.Dataset.from_tensor_slices(list(info.files)).shuffle(
            len(info.files), seed=seed, reshuffle_each_iteration=True
        )
        records = files.interleave(
            lambda f: tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER_BYTES),
            cycle_length=min(len(info.files), _MAX_CYCLE),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=deterministic,
        )
    else:
        # Sequential reads keep shard order then record order.
        records = tf.data.TFRecordDataset(list(info.files), buffer_size=_READ_BUFFER_BYTES)
    if info.num_examples is not None:
        records = records.apply(tf.data.experimental.assert_cardinality(info.num_examples))

    if training:
        records = records.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        # A per-iteration random stream: same for a rebuilt pipeline, new for the next epoch.
        stream = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        keyed = tf.data.Dataset.zip((records, stream)).enumerate()

        def train_map(index: Any, pair: Any) -> dict[str, Any]:
            record, draw = pair
            sample = decode_record(record, True, num_classes)
            out = views(sample["original_image"], tf.stack([draw, index]))
            out["labels"] = sample["labels"]
            return out

        ds = keyed.map(train_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    else:

        def eval_map(record: Any) -> dict[str, Any]:
            sample = decode_record(record, with_label, num_classes)
            sample["image"] = resize_image(sample["original_image"], image_size)
            sample["image"].set_shape([image_size, image_size, 3])
            if not include_original:
                del sample["original_image"]
            return sample

        ds = records.map(eval_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        # Masks pad with the ignore label so padded pixels never count in a metric.
        pads = {"filename": "", "mask": IGNORE_LABEL}
        padding = {
            key: tf.constant(pads.get(key, 0), dtype=spec.dtype)
            for key, spec in ds.element_spec.items()
        }
        ds = ds.padded_batch(batch_size, padding_values=padding, drop_remainder=drop_remainder)

    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def dataset_from_config(
    cfg: Any,
    split: str,
    training: bool,
    batch_size: int | None = None,
    uri: str | None = None,
    *,
    image_size: int | None = None,
    seed: int | None = None,
    with_label: bool | None = None,
    include_original: bool = False,
) -> Any:
    """:func:`make_dataset` with every setting taken from a loaded :class:`~vitpcm.config.Config`.

    Args:
        cfg: the config (sections ``data``, ``model``, ``train``, ``eval``).
        split: split name.
        training: training views or evaluation samples.
        batch_size: defaults to ``train.batch_size`` / ``eval.batch_size``.
        uri: overrides ``data.uri`` (the CLI's ``--data``).
        image_size: overrides ``data.image_size`` (e.g. ``data.test_size`` for test inference).
        seed: defaults to ``train.seed`` when training, so runs are reproducible.
        with_label: defaults to whether the split has masks.
        include_original: also return the original image (for CRF).
    """
    data = cfg.data
    uri = uri or data.uri
    if not uri:
        raise ConfigError("no dataset location: set data.uri in the config or pass --data URI")
    if batch_size is None:
        batch_size = cfg.train.batch_size if training else cfg.eval.batch_size
    if seed is None and training:
        seed = cfg.train.seed
    return make_dataset(
        uri,
        split,
        image_size=image_size or data.image_size,
        batch_size=batch_size,
        training=training,
        num_classes=data.num_classes,
        augment=data.augment,
        et=cfg.train.et,
        patch_size=cfg.model.patch_size,
        seed=seed,
        shuffle_buffer=data.shuffle_buffer,
        with_label=with_label,
        include_original=include_original,
    )


def measure_throughput(ds: Any, num_batches: int, warmup: int = 1) -> float:
    """Images per second produced by ``ds`` over ``num_batches`` batches (after ``warmup``).

    The first batches pay for start-up (thread pools, file opens, autotuning), so they are
    read but not timed.
    """
    if num_batches <= 0:
        raise ValueError(f"num_batches must be positive, got {num_batches}")
    iterator = iter(ds)
    for _ in range(warmup):
        next(iterator, None)
    images = 0
    start = time.perf_counter()
    for _ in range(num_batches):
        batch = next(iterator, None)
        if batch is None:  # a short dataset: time what there was
            break
        first = batch["image"] if isinstance(batch, dict) else batch
        images += int(first.shape[0])
    if images == 0:
        raise ValueError("the dataset produced no batches to time; use a larger split")
    return images / (time.perf_counter() - start)
