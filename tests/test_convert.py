"""`vitpcm data convert`: VOC layout / COCO -> sharded TFRecords + dataset.json."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitpcm.data import shards, tfrecord
from vitpcm.data.convert import convert_dataset
from vitpcm.data.imageinfo import image_info
from vitpcm.data.labels import encode_palette_png
from vitpcm.data.manifest import read_dataset_info
from vitpcm.errors import BadSampleError, DataError

# id -> (height, width); "c" is stored as a PNG image, "f" only has an SBD (Aug) mask.
SIZES = {
    "a": (20, 24),
    "b": (22, 27),
    "c": (24, 30),
    "d": (26, 33),
    "e": (28, 36),
    "f": (30, 39),
    "t1": (21, 25),
    "t2": (23, 29),
}
LISTS = {
    "train": ["a", "b", "c"],
    "val": ["d", "e"],
    "trainval": ["a", "b", "c", "d", "e"],
    "trainaug": ["a", "b", "c", "d", "e", "f"],
    "test": ["t1", "t2"],
}


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _random_label(rng: np.random.Generator, shape: tuple[int, int], top: int = 21) -> np.ndarray:
    values = np.append(np.arange(top), 255).astype(np.uint8)
    return rng.choice(values, size=shape).astype(np.uint8)


def make_voc(root: Path) -> Path:
    """A tiny VOC download: palette masks, L-mode SBD masks, a mask-less test split."""
    rng = np.random.default_rng(0)
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug"):
        (voc / folder).mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    for name, shape in SIZES.items():
        pixels = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
        if name == "c":
            (voc / "JPEGImages" / f"{name}.png").write_bytes(_png(pixels))
        else:
            (voc / "JPEGImages" / f"{name}.jpg").write_bytes(_jpeg(pixels))
        if name.startswith("t"):
            continue
        if name != "f":
            label = _random_label(rng, shape)
            (voc / "SegmentationClass" / f"{name}.png").write_bytes(encode_palette_png(label))
        if name in ("a", "f"):  # SBD has its own masks for some images
            aug = _random_label(rng, shape)
            (voc / "SegmentationClassAug" / f"{name}.png").write_bytes(_png(aug))
    for split, ids in LISTS.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return voc


def _label_of(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.uint8)


def read_split(out: Path, split: str, with_label: bool = True) -> list[dict]:
    """Every record of a split, parsed with the reader's schema, in shard order."""
    import tensorflow as tf

    files = sorted(str(p) for p in out.glob(tfrecord.shard_pattern(split)))
    records = []
    for serialized in tf.data.TFRecordDataset(files):
        raw = tf.train.Example.FromString(serialized.numpy())
        features = tfrecord.parse_example(serialized, with_label=with_label)
        record = {k: v.numpy() for k, v in features.items()}
        record["raw_keys"] = set(raw.features.feature.keys())
        if with_label:
            mask = tf.io.decode_png(features[tfrecord.LABEL_ENCODED], channels=1)
            record["mask"] = mask.numpy()[..., 0]
        records.append(record)
    return records


@pytest.fixture()
def voc(tmp_path: Path) -> Path:
    make_voc(tmp_path / "src")
    return tmp_path / "src"


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))


def test_voc_every_image_and_mask_round_trips(voc: Path, tmp_path: Path) -> None:
    out = tmp_path / "records"
    info = convert_dataset("voc12", voc, out, shards=2, workers=1, progress=False)
    root = voc / "VOCdevkit" / "VOC2012"

    assert info == read_dataset_info(out)
    assert info["num_classes"] == 21 and info["class_names"][15] == "person"
    assert info["format_version"] == 1 and info["skipped"] == []
    assert set(info["splits"]) == set(LISTS)
    for split, ids in LISTS.items():
        entry = info["splits"][split]
        assert entry["num_examples"] == len(ids)
        assert entry["files"] == [tfrecord.shard_name(split, i, 2) for i in range(2)]
        assert all((out / name).is_file() for name in entry["files"])
        has_masks = split != "test"
        assert entry["has_masks"] is has_masks
        records = read_split(out, split, with_label=has_masks)
        assert [r[tfrecord.IMAGE_FILENAME].decode() for r in records] == [
            f"{i}.png" if i == "c" else f"{i}.jpg" for i in ids
        ]
        for image_id, record in zip(ids, records, strict=True):
            image_file = next((root / "JPEGImages").glob(f"{image_id}.*"))
            assert record[tfrecord.IMAGE_ENCODED] == image_file.read_bytes()
            assert record[tfrecord.IMAGE_FORMAT] == (b"png" if image_id == "c" else b"jpeg")
            height, width = SIZES[image_id]
            assert (record[tfrecord.IMAGE_HEIGHT], record[tfrecord.IMAGE_WIDTH]) == (height, width)
            assert record[tfrecord.IMAGE_CHANNELS] == 3
            if not has_masks:
                assert tfrecord.LABEL_ENCODED not in record["raw_keys"]
                continue
            aug = root / "SegmentationClassAug" / f"{image_id}.png"
            source = aug if split == "trainaug" and aug.exists() else None
            source = source or root / "SegmentationClass" / f"{image_id}.png"
            np.testing.assert_array_equal(record["mask"], _label_of(source))
            if source.parent.name == "SegmentationClassAug":  # already an L PNG: kept as is
                assert record[tfrecord.LABEL_ENCODED] == source.read_bytes()
            else:  # palette PNG: re-encoded single-channel, since TF decodes palettes to colours
                assert Image.open(io.BytesIO(record[tfrecord.LABEL_ENCODED])).mode == "L"


def test_worker_count_does_not_change_a_byte(voc: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    convert_dataset("voc12", voc, one, shards=3, workers=1, progress=False)
    convert_dataset("voc12", voc, two, shards=3, workers=2, progress=False)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    # dataset.json and the ownership marker, plus the shards (capped at the split size)
    assert len(names) == 2 + sum(min(3, len(ids)) for ids in LISTS.values())
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _flip_png_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[data.index(b"IDAT") + 8] ^= 0xFF
    path.write_bytes(bytes(data))


def _resize_mask(path: Path) -> None:
    path.write_bytes(encode_palette_png(np.zeros((5, 7), np.uint8)))


def _bad_value(path: Path) -> None:
    label = _label_of(path).copy()
    label[0, 0] = 30
    path.write_bytes(encode_palette_png(label))


BAD_SAMPLES = {
    "truncated jpeg": ("JPEGImages/b.jpg", _truncate, "truncated"),
    "not an image": ("JPEGImages/b.jpg", lambda p: p.write_bytes(b"garbage"), "not a JPEG"),
    "png image crc": ("JPEGImages/c.png", _flip_png_byte, "CRC"),
    "truncated mask": ("SegmentationClass/b.png", _truncate, "cannot decode"),
    "size mismatch": ("SegmentationClass/b.png", _resize_mask, "7x5"),
    "label out of range": ("SegmentationClass/b.png", _bad_value, "30"),
    "missing image": ("JPEGImages/b.jpg", Path.unlink, "missing"),
    "missing mask": ("SegmentationClass/b.png", Path.unlink, "missing"),
}


@pytest.mark.parametrize("kind", list(BAD_SAMPLES))
def test_bad_sample_stops_or_is_skipped(kind: str, voc: Path, tmp_path: Path) -> None:
    relative, damage, words = BAD_SAMPLES[kind]
    bad = voc / "VOCdevkit" / "VOC2012" / relative
    damage(bad)
    out = tmp_path / "records"

    with pytest.raises(BadSampleError) as caught:
        convert_dataset("voc12", voc, out, splits=["train"], workers=1, progress=False)
    assert caught.value.path == str(bad)
    assert words in caught.value.reason and str(bad) in str(caught.value)
    assert _siblings(out) == []  # nothing left, not even the temporary folder

    info = convert_dataset(
        "voc12", voc, out, splits=["train"], workers=1, skip_bad=True, progress=False
    )
    assert info["splits"]["train"]["num_examples"] == 2
    assert [(s["split"], s["file"]) for s in info["skipped"]] == [("train", str(bad))]
    assert words in info["skipped"][0]["reason"]
    assert len(read_split(out, "train")) == 2
    assert read_dataset_info(out)["skipped"] == info["skipped"]


def test_bad_sample_in_a_worker_process_stops_the_run(voc: Path, tmp_path: Path) -> None:
    bad = voc / "VOCdevkit" / "VOC2012" / "JPEGImages" / "e.jpg"
    _truncate(bad)
    out = tmp_path / "records"
    with pytest.raises(BadSampleError) as caught:
        convert_dataset("voc12", voc, out, shards=2, workers=2, progress=False)
    assert caught.value.path == str(bad)
    assert _siblings(out) == []


def test_interrupted_conversion_leaves_the_old_output_untouched(
    voc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "records"
    convert_dataset("voc12", voc, out, splits=["val"], workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    real = shards.encode_sample

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "encode_sample", failing)
    with pytest.raises(RuntimeError, match="killed"):
        convert_dataset("voc12", voc, out, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _siblings(out) == ["records"]

    fresh = tmp_path / "fresh"
    calls.clear()
    with pytest.raises(RuntimeError, match="killed"):
        convert_dataset("voc12", voc, fresh, workers=1, progress=False)
    assert _siblings(fresh) == []


def test_source_may_be_the_voc2012_folder_and_splits_may_be_absent(
    voc: Path, tmp_path: Path
) -> None:
    root = voc / "VOCdevkit" / "VOC2012"
    for split in ("trainaug", "test", "trainval"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").unlink()
    info = convert_dataset("voc12", root, tmp_path / "out", workers=1, progress=False)
    assert set(info["splits"]) == {"train", "val"}
    assert info["splits"]["train"]["num_shards"] == 1  # ~1 shard per 1000 images

    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").unlink()
    with pytest.raises(DataError, match="no split list"):
        convert_dataset("voc12", root, tmp_path / "none", workers=1, progress=False)
    assert not (tmp_path / "none").exists()


def test_synthetic_layout_uses_its_class_names(tmp_path: Path) -> None:
    from vitpcm.data.synth import make_synthetic

    make_synthetic(tmp_path / "synth", train=4, val=2, test=2, size=32, progress=False)
    info = convert_dataset("voc12", tmp_path / "synth", tmp_path / "out", progress=False)
    assert info["num_classes"] == 6 and info["class_names"][0] == "background"
    assert set(info["splits"]) == {"train", "val", "trainval", "test"}
    assert info["splits"]["test"]["has_masks"] is True  # synthetic test images are scored
    masks = [r["mask"] for r in read_split(tmp_path / "out", "test")]
    assert len(masks) == 2 and all(m.shape == (32, 32) and m.max() < 6 for m in masks)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": "imagenet"}, "unknown dataset"),
        ({"shards": 0}, "--shards"),
        ({"workers": 0}, "--workers"),
        ({"splits": ["bogus"]}, "unknown split"),
        ({"src": "missing"}, "not a folder"),
        ({"src": "s3://bucket/voc"}, "local folder"),
        ({"dataset": "coco14"}, "no COCO 2014 layout"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str, voc: Path, tmp_path: Path) -> None:
    args = {"dataset": "voc12", "src": voc, "out": tmp_path / "out", "progress": False}
    if kwargs.get("src") == "missing":
        kwargs = {"src": tmp_path / "missing"}
    args.update(kwargs)
    with pytest.raises(DataError, match=match):
        convert_dataset(**args)


def test_s3_output_without_credentials_fails_before_any_work(
    voc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vitpcm.errors import StorageError

    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.setattr(shards, "encode_sample", pytest.fail)
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID"):
        convert_dataset("voc12", voc, "s3://bucket/out", workers=1, progress=False)


def test_read_dataset_info_explains_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no dataset.json in .*interrupted conversion"):
        read_dataset_info(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_dataset_info(tmp_path)


# --- COCO ------------------------------------------------------------------------------------


def _polygon(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def make_coco(root: Path) -> Path:
    """coco2014/ with a val split: two usable images, one too small, one unannotated."""
    coco = root / "coco2014"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2014").mkdir()
    rng = np.random.default_rng(1)
    images = [(10, 256, 300), (11, 260, 256), (12, 100, 120), (13, 256, 256)]
    for image_id, height, width in images:
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        (coco / "val2014" / f"COCO_val2014_{image_id:012d}.jpg").write_bytes(_jpeg(pixels))
    annotations = [
        (1, 10, 5, _polygon(10, 20, 120, 200)),
        (2, 11, 9, _polygon(0, 0, 100, 100)),
        (3, 11, 1, _polygon(50, 50, 200, 180)),  # overlaps the first: that one wins
        (4, 12, 1, _polygon(0, 0, 50, 50)),
    ]
    data = {
        "images": [
            {"id": i, "height": h, "width": w, "file_name": f"COCO_val2014_{i:012d}.jpg"}
            for i, h, w in images
        ],
        "annotations": [
            {
                "id": a,
                "image_id": i,
                "category_id": c,
                "segmentation": s,
                "iscrowd": 0,
                "area": 1.0,
                "bbox": [0, 0, 1, 1],
            }
            for a, i, c, s in annotations
        ],
        "categories": [
            {"id": 1, "name": "cat"},
            {"id": 5, "name": "dog"},
            {"id": 9, "name": "owl"},
        ],
    }
    (coco / "annotations" / "instances_val2014.json").write_text(json.dumps(data))
    return coco


def test_coco_masks_round_trip_through_worker_processes(tmp_path: Path) -> None:
    from vitpcm.data.sources.coco14 import CocoMasks

    coco = make_coco(tmp_path / "src")
    out = tmp_path / "records"
    info = convert_dataset("coco14", tmp_path / "src", out, shards=2, workers=2, progress=False)
    assert info["name"] == "coco14"
    assert info["class_names"] == ["background", "cat", "dog", "owl"]
    assert info["num_classes"] == 4
    assert set(info["splits"]) == {"val"}  # no train annotations: split skipped
    assert info["splits"]["val"]["num_examples"] == 2  # small and unannotated images left out

    expected = CocoMasks(coco / "annotations" / "instances_val2014.json")
    records = read_split(out, "val")
    assert [r[tfrecord.IMAGE_FILENAME].decode() for r in records] == [
        expected.file_name(i) for i in (10, 11)
    ]
    for image_id, record in zip((10, 11), records, strict=True):
        source = coco / "val2014" / expected.file_name(image_id)
        assert record[tfrecord.IMAGE_ENCODED] == source.read_bytes()
        np.testing.assert_array_equal(record["mask"], expected.mask(image_id))
    assert set(np.unique(records[1]["mask"])) == {0, 1, 3}


# --- headers and framing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "fmt", "channels", "extra"),
    [
        ("RGB", "JPEG", 3, {}),
        ("RGB", "JPEG", 3, {"progressive": True}),
        ("L", "JPEG", 1, {}),
        ("RGB", "PNG", 3, {}),
        ("RGBA", "PNG", 4, {}),
        ("L", "PNG", 1, {}),
        ("P", "PNG", 3, {}),
    ],
)
def test_image_info_reads_the_header(mode: str, fmt: str, channels: int, extra: dict) -> None:
    buffer = io.BytesIO()
    Image.new(mode, (37, 19)).save(buffer, format=fmt, **extra)
    info = image_info(buffer.getvalue(), "x")
    assert (info.format, info.height, info.width, info.channels) == (fmt.lower(), 19, 37, channels)


def test_image_info_rejects_damaged_files() -> None:
    jpeg = _jpeg(np.zeros((8, 8, 3), np.uint8))
    png = _png(np.zeros((8, 8), np.uint8))
    assert image_info(jpeg + b"\x00\x00", "padded").height == 8
    for data, words in [
        (b"", "empty"),
        (b"GIF89a....", "not a JPEG or PNG"),
        (jpeg[:-2], "truncated"),
        (b"\xff\xd8\xff\xd9", "no readable frame header"),
        (png[:-12], "truncated"),
        (png[:20] + bytes([png[20] ^ 1]) + png[21:], "CRC"),
    ]:
        with pytest.raises(BadSampleError, match=words):
            image_info(data, "x")


@pytest.mark.parametrize("colours", [256, 16])
def test_palette_masks_are_stored_as_single_channel_indices(colours: int) -> None:
    label = np.array([[0, 1, 2, 15], [255, 3, 0, 7]], dtype=np.uint8)
    image = Image.fromarray(label)  # L; putpalette makes it P
    image.putpalette(bytes(i % 256 for i in range(3 * colours)))  # 16: PIL writes 4-bit
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    stored = shards._stored_mask(buffer.getvalue(), label, "m.png")
    decoded = Image.open(io.BytesIO(stored))
    assert decoded.mode == "L"
    np.testing.assert_array_equal(np.asarray(decoded), label)
    grey = _png(label)
    assert shards._stored_mask(grey, label, "m.png") == grey  # already grey: kept as is


def test_encoded_example_equals_the_tensorflow_encoding() -> None:
    import tensorflow as tf

    def as_bytes(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def as_int(value: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    args = {"image": b"\xff\xd8img", "filename": "x.jpg", "image_format": "jpeg"}
    args.update(height=300, width=2**40, channels=3)
    for label in (None, b"\x89PNGmask"):
        feature = {
            "image/encoded": as_bytes(args["image"]),
            "image/filename": as_bytes(b"x.jpg"),
            "image/format": as_bytes(b"jpeg"),
            "image/height": as_int(300),
            "image/width": as_int(2**40),
            "image/channels": as_int(3),
        }
        if label is not None:
            feature["image/segmentation/class/encoded"] = as_bytes(label)
            feature["image/segmentation/class/format"] = as_bytes(b"png")
        theirs = tf.train.Example(features=tf.train.Features(feature=feature))
        ours = tf.train.Example.FromString(tfrecord.encode_example(**args, label=label))
        assert ours == theirs


def test_crc32c_matches_the_standard() -> None:
    assert tfrecord._crc32c(b"123456789") == 0xE3069283


def test_workers_fork_without_tensorflow_and_write_the_same_bytes(
    voc: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    one, two = tmp_path / "one", tmp_path / "two"
    convert_dataset("voc12", voc, one, shards=3, workers=1, progress=False)
    # A fresh interpreter, as `vitpcm data convert` runs: no TensorFlow, so workers fork.
    script = (
        "import sys; from vitpcm.data import convert, shards\n"
        "print(shards._pool_context().get_start_method())\n"
        f"convert.convert_dataset('voc12', {str(voc)!r}, {str(two)!r}, shards=3, workers=2,"
        " progress=False)\n"
        "print('tensorflow' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    # TensorFlow is loaded only after the workers forked: the parent reads each finished
    # shard back through the reader's decoder (vitpcm.data.verify).
    assert done.stdout.split() == ["fork", "True"]
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_workers_spawn_once_tensorflow_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorflow", sys.modules.get("tensorflow", object()))
    assert shards._pool_context().get_start_method() == "spawn"


def test_progress_reports_are_batched_and_complete() -> None:
    sent: list[int] = []
    report = shards._BatchedReport(sent.append, every=4)
    for _ in range(10):
        report(1)
    report.flush()
    report.flush()  # nothing pending: nothing sent
    assert sent == [4, 4, 2]


@pytest.mark.parametrize(
    ("values", "bad"),
    [
        ([0, 1, 20], None),
        ([0, 255, 3], None),
        ([255, 255], None),
        ([0, 21], "21"),
        ([0, 255, 30], "30"),
        ([254, 255], "254"),
    ],
)
def test_label_values_check(values: list[int], bad: str | None) -> None:
    label = np.array(values, dtype=np.uint8).reshape(1, -1)
    if bad is None:
        shards._check_values(label, 21, "mask.png")
        return
    with pytest.raises(BadSampleError, match=bad):
        shards._check_values(label, 21, "mask.png")
