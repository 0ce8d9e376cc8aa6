"""The tf.data reader over small hand-written TFRecords with known masks."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vitpcm.config import AugmentConfig, EtConfig
from vitpcm.data import tfrecord
from vitpcm.data.augment import resize_image
from vitpcm.data.reader import dataset_from_config, make_dataset, measure_throughput
from vitpcm.errors import ConfigError, DataError
from vitpcm.model import equivariance

NUM_CLASSES = 4
SIZE = 32  # network input side: a 2x2 grid of 16 px patches
NO_JITTER = AugmentConfig(contrast=0.0, saturation=0.0, hue=0.0, grayscale_prob=0.0)
JITTER = AugmentConfig(contrast=0.4, saturation=0.4, hue=0.1, grayscale_prob=0.2)
ET = EtConfig(enabled=True, view_size=16, crop_size=16, crop_prob=0.5)


@dataclass
class Sample:
    """One record's ground truth."""

    filename: str
    image: np.ndarray  # (H, W, 3) uint8, or (H, W) for a grey JPEG
    mask: np.ndarray | None  # (H, W) uint8
    image_format: str = "png"

    @property
    def labels(self) -> np.ndarray:
        present = np.zeros(NUM_CLASSES, np.float32)
        for value in np.unique(self.mask):
            if value != 255:
                present[value] = 1.0
        return present


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG" if fmt == "jpeg" else "PNG")
    return buffer.getvalue()


def make_samples(count: int, *, seed: int = 0, with_mask: bool = True, fmt: str = "png"):
    """Images of varied sizes; each mask is background plus one class box and an ignore band."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        height, width = 24 + 4 * (i % 4), 40 - 4 * (i % 3)
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        mask = None
        if with_mask:
            mask = np.zeros((height, width), np.uint8)
            mask[4:12, 6:20] = 1 + i % (NUM_CLASSES - 1)
            mask[:, -2:] = 255
            if i % 5 == 4:  # no background at all in this one
                mask[mask == 0] = 3
        samples.append(Sample(f"img_{i:03d}", image, mask, fmt))
    return samples


def write_dataset(
    root: Path,
    splits: dict[str, list[Sample]],
    *,
    shards: int = 2,
    num_classes: int = NUM_CLASSES,
    write_json: bool = True,
    split_details: bool = True,
) -> Path:
    """Write ``<split>-*.tfrecord`` shards (records split in order) and ``dataset.json``."""
    root.mkdir(parents=True, exist_ok=True)
    for split, samples in splits.items():
        per_shard = -(-len(samples) // shards)
        for index in range(shards):
            path = root / tfrecord.shard_name(split, index, shards)
            with tf.io.TFRecordWriter(str(path)) as writer:
                for sample in samples[index * per_shard : (index + 1) * per_shard]:
                    writer.write(
                        tfrecord.encode_example(
                            image=_encode(sample.image, sample.image_format),
                            filename=sample.filename,
                            image_format=sample.image_format,
                            height=sample.image.shape[0],
                            width=sample.image.shape[1],
                            channels=3,
                            label=None if sample.mask is None else _encode(sample.mask, "png"),
                        )
                    )
    if write_json:
        # The converter's layout; without details only the split sizes are known.
        info = {
            "name": "tiny",
            "num_classes": num_classes,
            "class_names": [f"class{i}" for i in range(num_classes)],
            "splits": {
                split: {
                    "num_examples": len(samples),
                    "num_shards": shards,
                    "has_masks": samples[0].mask is not None,
                }
                if split_details
                else len(samples)
                for split, samples in splits.items()
            },
        }
        (root / tfrecord.DATASET_JSON).write_text(json.dumps(info))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[Sample]]]:
    splits = {
        "train": make_samples(10, seed=1, fmt="jpeg"),
        "val": make_samples(7, seed=2),
        "test": make_samples(5, seed=3, with_mask=False),
    }
    return write_dataset(tmp_path_factory.mktemp("tiny"), splits), splits


def _train(root: Path, **kwargs):
    args = {
        "image_size": SIZE,
        "batch_size": 4,
        "training": True,
        "num_classes": NUM_CLASSES,
        "augment": JITTER,
        "et": ET,
        "seed": 7,
        "shuffle_buffer": 16,
    }
    return make_dataset(str(root), kwargs.pop("split", "train"), **{**args, **kwargs})


def _collect(ds) -> list[dict[str, np.ndarray]]:
    return [{key: value.numpy() for key, value in batch.items()} for batch in ds]


def test_eval_returns_every_sample_once_in_order_with_exact_masks(tiny) -> None:
    root, splits = tiny
    ds = make_dataset(
        str(root),
        "val",
        image_size=SIZE,
        batch_size=4,
        training=False,
        num_classes=NUM_CLASSES,
        include_original=True,
    )
    batches = _collect(ds)
    assert [len(b["filename"]) for b in batches] == [4, 3]  # the partial batch is kept
    names = [name.decode() for b in batches for name in b["filename"]]
    assert names == [s.filename for s in splits["val"]]  # shard order, then record order

    got = [(b, i) for b in batches for i in range(len(b["filename"]))]
    for sample, (batch, i) in zip(splits["val"], got, strict=True):
        height, width = sample.mask.shape
        assert (batch["height"][i], batch["width"][i]) == (height, width)
        np.testing.assert_array_equal(batch["mask"][i, :height, :width], sample.mask)
        assert (batch["mask"][i, height:] == 255).all() and (
            batch["mask"][i, :, width:] == 255
        ).all()
        np.testing.assert_array_equal(batch["original_image"][i, :height, :width], sample.image)
        np.testing.assert_array_equal(batch["labels"][i], sample.labels)
        expected_image = resize_image(sample.image, SIZE).numpy()
        np.testing.assert_allclose(batch["image"][i], expected_image, atol=1e-4)

    first = batches[0]
    assert first["image"].dtype == np.float32 and first["image"].shape == (4, SIZE, SIZE, 3)
    assert first["labels"].dtype == np.float32 and first["labels"].shape == (4, NUM_CLASSES)
    assert first["mask"].dtype == np.uint8 and first["original_image"].dtype == np.uint8
    assert first["height"].dtype == np.int32 and first["filename"].dtype == object
    assert ds.cardinality().numpy() == 2
    # A sample whose mask has no background pixel must not be labelled background.
    assert splits["val"][4].labels[0] == 0 and batches[1]["labels"][0][0] == 0


def test_eval_batch_one_and_no_original_image(tiny) -> None:
    root, splits = tiny
    ds = make_dataset(
        str(root), "val", image_size=SIZE, batch_size=1, training=False, num_classes=NUM_CLASSES
    )
    batches = _collect(ds)
    assert len(batches) == len(splits["val"])
    assert set(batches[0]) == {"image", "labels", "mask", "filename", "height", "width"}
    for sample, batch in zip(splits["val"], batches, strict=True):
        np.testing.assert_array_equal(batch["mask"][0], sample.mask)


def test_test_split_has_no_labels(tiny) -> None:
    root, splits = tiny
    ds = make_dataset(
        str(root),
        "test",
        image_size=SIZE,
        batch_size=2,
        training=False,
        num_classes=NUM_CLASSES,
        with_label=False,
    )
    batches = _collect(ds)
    assert sum(len(b["filename"]) for b in batches) == 5
    assert set(batches[0]) == {"image", "filename", "height", "width"}
    with pytest.raises(DataError, match="no segmentation masks"):
        make_dataset(
            str(root), "test", image_size=SIZE, batch_size=2, training=False, num_classes=4
        )


def test_maskless_split_found_by_peeking_without_details(tmp_path: Path) -> None:
    splits = {"test": make_samples(2, with_mask=False), "val": make_samples(2)}
    root = write_dataset(tmp_path / "d", splits, split_details=False, shards=1)
    args = {"image_size": SIZE, "batch_size": 2, "training": False, "num_classes": NUM_CLASSES}
    with pytest.raises(DataError, match="'test'.*no segmentation masks"):
        make_dataset(str(root), "test", **args)
    (batch,) = _collect(make_dataset(str(root), "val", **args))
    np.testing.assert_array_equal(batch["labels"], [s.labels for s in splits["val"]])


def test_grey_and_jpeg_images_become_three_channels(tmp_path: Path) -> None:
    grey = np.arange(20 * 24, dtype=np.uint8).reshape(20, 24)
    mask = np.full((20, 24), 2, np.uint8)
    samples = [Sample("grey_png", grey, mask), Sample("grey_jpeg", grey, mask, "jpeg")]
    root = write_dataset(tmp_path / "g", {"val": samples}, shards=1)
    (batch,) = _collect(
        make_dataset(
            str(root),
            "val",
            image_size=SIZE,
            batch_size=2,
            training=False,
            num_classes=NUM_CLASSES,
            include_original=True,
        )
    )
    assert batch["original_image"].shape == (2, 20, 24, 3)
    np.testing.assert_array_equal(batch["original_image"][0], np.repeat(grey[..., None], 3, -1))
    np.testing.assert_allclose(
        batch["original_image"][1], np.repeat(grey[..., None], 3, -1), atol=8
    )  # JPEG is lossy
    np.testing.assert_array_equal(batch["labels"], [[0, 0, 1, 0]] * 2)


def test_training_elements_shapes_and_labels(tiny) -> None:
    root, splits = tiny
    batches = _collect(_train(root))
    assert len(batches) == 2  # 10 samples, batch 4: the remainder is dropped
    for batch in batches:
        assert set(batch) == {"image", "labels", "view2", "params1", "params2"}
        assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
        assert batch["view2"].shape == (4, 16, 16, 3) and batch["view2"].dtype == np.float32
        assert batch["params1"].shape == (4, 7) and batch["params2"].shape == (4, 7)
        assert batch["labels"].shape == (4, NUM_CLASSES)
        assert batch["image"].min() >= 0 and batch["image"].max() <= 255
        assert (batch["params1"][:, equivariance.CROP_FLAG] == 0).all()
    known = {tuple(s.labels) for s in splits["train"]}
    assert all(tuple(row) in known for b in batches for row in b["labels"])


def test_training_is_deterministic_per_seed(tiny) -> None:
    root, _ = tiny
    first = _collect(_train(root, seed=11))
    again = _collect(_train(root, seed=11))
    other = _collect(_train(root, seed=12))
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    pairs = zip(first, other, strict=True)
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in pairs)
    # Iterating the same dataset again is the next epoch: new order and augmentation.
    ds = _train(root, seed=11)
    epoch1, epoch2 = _collect(ds), _collect(ds)
    pairs = zip(epoch1, epoch2, strict=True)
    assert any(not np.array_equal(a["view2"], b["view2"]) for a, b in pairs)


def test_views_follow_the_equivariance_geometry(tmp_path: Path) -> None:
    # One image repeated: whatever the shuffle, each view must be that image's geometry.
    image = np.random.default_rng(5).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    mask = np.zeros((40, 48), np.uint8)
    samples = [Sample(f"same_{i}", image, mask) for i in range(8)]
    root = write_dataset(tmp_path / "same", {"train": samples})
    canonical = resize_image(image, SIZE)
    batches = _collect(_train(root, augment=NO_JITTER, et=replace(ET, crop_prob=0.5), seed=3))
    params2 = np.concatenate([b["params2"] for b in batches])
    assert params2[:, equivariance.CROP_FLAG].any() and not params2[:, equivariance.CROP_FLAG].all()
    for batch in batches:
        for i in range(4):
            p1, p2 = batch["params1"][i], batch["params2"][i]
            view1 = equivariance.apply_flips(canonical, p1).numpy()
            view2 = equivariance.make_second_view(canonical, p2, 16, 16).numpy()
            np.testing.assert_allclose(batch["image"][i], view1, atol=1e-4)
            np.testing.assert_allclose(batch["view2"][i], view2, atol=1e-4)
            unflipped = equivariance.invert_flips(tf.constant(batch["image"][i]), p1).numpy()
            np.testing.assert_allclose(unflipped, canonical.numpy(), atol=1e-4)


def test_views_get_their_own_colour_jitter(tmp_path: Path) -> None:
    image = np.random.default_rng(6).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    samples = [Sample(f"j_{i}", image, np.zeros((32, 32), np.uint8)) for i in range(4)]
    root = write_dataset(tmp_path / "jit", {"train": samples}, shards=1)
    canonical = resize_image(image, SIZE)
    et = replace(ET, view_size=SIZE, crop_prob=0.0)  # uncropped same-size view 2
    (batch,) = _collect(_train(root, et=et))
    for i in range(4):
        plain1 = equivariance.apply_flips(canonical, batch["params1"][i]).numpy()
        plain2 = equivariance.make_second_view(canonical, batch["params2"][i], 16, SIZE).numpy()
        assert not np.allclose(batch["image"][i], plain1, atol=1.0)
        assert not np.allclose(batch["view2"][i], plain2, atol=1.0)
        # Undo each view's geometry: the two jitters differ from each other.
        back1 = equivariance.invert_flips(
            tf.constant(batch["image"][i]), batch["params1"][i]
        ).numpy()
        back2 = equivariance.invert_flips(
            tf.constant(batch["view2"][i]), batch["params2"][i]
        ).numpy()
        assert not np.allclose(back1, back2, atol=1.0)


def test_training_without_et_keeps_flip_params_only(tiny) -> None:
    root, _ = tiny
    batches = _collect(_train(root, et=EtConfig(enabled=False), batch_size=3))
    assert len(batches) == 3
    assert set(batches[0]) == {"image", "labels", "params1"}
    no_aug = _collect(_train(root, et=None, augment=None))
    assert (np.concatenate([b["params1"] for b in no_aug])[:, :3] == 0).all()


def test_missing_dataset_json(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", {"val": make_samples(2)}, write_json=False)
    with pytest.raises(DataError, match=r"dataset\.json.*vitpcm data convert"):
        make_dataset(
            str(root), "val", image_size=SIZE, batch_size=1, training=False, num_classes=NUM_CLASSES
        )


def test_unknown_split_lists_available(tiny) -> None:
    root, _ = tiny
    with pytest.raises(DataError, match="'trainaug' not found.*test, train, val"):
        _train(root, split="trainaug")


def test_incomplete_split_and_class_mismatch(tmp_path: Path, tiny) -> None:
    root = write_dataset(tmp_path / "d", {"val": make_samples(4)}, shards=2)
    (root / tfrecord.shard_name("val", 1, 2)).unlink()
    with pytest.raises(DataError, match="1 of its 2 shards"):
        make_dataset(
            str(root), "val", image_size=SIZE, batch_size=1, training=False, num_classes=NUM_CLASSES
        )
    with pytest.raises(DataError, match="has 4 classes but 21"):
        _train(tiny[0], num_classes=21)


def test_bad_settings(tiny) -> None:
    root, _ = tiny
    with pytest.raises(ConfigError, match="multiple of 4"):
        _train(root, batch_size=6)
    with pytest.raises(ConfigError, match="patch size"):
        _train(root, image_size=40)
    with pytest.raises(DataError, match="without labels"):
        _train(root, with_label=False)


def test_dataset_from_config_and_throughput(tiny) -> None:
    root, splits = tiny
    cfg = SimpleNamespace(
        data=SimpleNamespace(
            uri=str(root),
            num_classes=NUM_CLASSES,
            image_size=SIZE,
            test_split="train",
            shuffle_buffer=8,
            augment=JITTER,
        ),
        model=SimpleNamespace(patch_size=16),
        train=SimpleNamespace(batch_size=4, seed=1, et=ET),
        eval=SimpleNamespace(batch_size=3),
    )
    train = _collect(dataset_from_config(cfg, "train", training=True))
    again = _collect(dataset_from_config(cfg, "train", training=True))
    np.testing.assert_array_equal(train[0]["view2"], again[0]["view2"])  # seed from train.seed
    assert len(train) == 2 and train[0]["view2"].shape == (4, 16, 16, 3)
    # with_label follows the split: the test split has no masks, val has.
    test = _collect(dataset_from_config(cfg, "test", training=False, batch_size=5))
    assert "labels" not in test[0] and len(test[0]["filename"]) == 5
    assert "mask" in next(iter(dataset_from_config(cfg, "val", training=False)))
    val = dataset_from_config(cfg, "val", training=False, image_size=48)
    assert next(iter(val))["image"].shape == (3, 48, 48, 3)
    assert measure_throughput(val, num_batches=2) > 0
    cfg.data.uri = None
    with pytest.raises(ConfigError, match="data.uri"):
        dataset_from_config(cfg, "val", training=False)


def test_reads_what_the_converter_writes(tmp_path: Path) -> None:
    from vitpcm.data.convert import convert_dataset
    from vitpcm.data.labels import decode_label_png
    from vitpcm.data.synth import make_synthetic

    make_synthetic(str(tmp_path / "src"), train=8, val=3, test=2, size=64, seed=0, progress=False)
    out = str(tmp_path / "tf")
    info = convert_dataset("voc12", str(tmp_path / "src"), out, shards=2, workers=1, progress=False)
    num_classes = info["num_classes"]
    args = {"image_size": SIZE, "batch_size": 2, "training": False, "num_classes": num_classes}
    batches = _collect(make_dataset(out, "val", **args))
    names = [n.decode() for b in batches for n in b["filename"]]
    masks = [b["mask"][i] for b in batches for i in range(len(b["filename"]))]
    labels = np.concatenate([b["labels"] for b in batches])
    assert len(names) == info["splits"]["val"]["num_examples"] == 3
    folder = tmp_path / "src" / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    for name, mask, row in zip(names, masks, labels, strict=True):
        # Palette PNG indices in the source must come back as the same class ids.
        source = decode_label_png((folder / f"{Path(name).stem}.png").read_bytes(), name)
        np.testing.assert_array_equal(mask, source)
        expected = np.zeros(num_classes, np.float32)
        expected[[v for v in np.unique(source) if v != 255]] = 1.0
        np.testing.assert_array_equal(row, expected)
    train_args = {**args, "training": True, "batch_size": 4, "et": ET}
    train = _collect(make_dataset(out, "train", **train_args))
    assert len(train) == 2 and train[0]["view2"].shape == (4, 16, 16, 3)
    test = _collect(make_dataset(out, "test", **{**args, "with_label": False}))
    assert sum(len(b["filename"]) for b in test) == 2

    # The shipped synthetic config drives the same data through dataset_from_config.
    from vitpcm.config import load_config

    cfg = load_config("synthetic", [f"data.uri={out}", "train.batch_size=4"])
    (batch, _) = _collect(dataset_from_config(cfg, cfg.data.train_split, training=True))
    assert batch["image"].shape == (4, cfg.data.image_size, cfg.data.image_size, 3)
    assert batch["view2"].shape == (4, cfg.train.et.view_size, cfg.train.et.view_size, 3)
