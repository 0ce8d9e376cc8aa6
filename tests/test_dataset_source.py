"""A new dataset is one source module: a toy source defined here goes download -> convert -> read.

The toy dataset has its own files (an image zip and a JSON split list, served over real
HTTP with their checksums "published" in the source), its own install step for the split
list, its own class names and its own mask format (RGB colour-coded PNGs, decoded through
a colour table), none of which the download, convert or reader modules know about.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from PIL import Image

from vitpcm.data.convert import convert_dataset
from vitpcm.data.download import download_dataset
from vitpcm.data.reader import make_dataset
from vitpcm.data.sources import (
    DatasetFile,
    DatasetSource,
    MaskDecoder,
    Sample,
    SplitPlan,
    dataset_names,
    get_source,
    register,
)
from vitpcm.data.sources import base as sources_base
from vitpcm.data.sources.base import read_sample_file
from vitpcm.errors import BadSampleError, DataError

if TYPE_CHECKING:
    from helpers.http_server import LocalHTTPServer

pytest_plugins = ("helpers.http_server",)

# Colour of each label in the toy's mask PNGs (255: the ignore label, drawn white).
COLOURS = {(0, 0, 0): 0, (255, 0, 0): 1, (0, 0, 255): 2, (255, 255, 255): 255}
SPLITS = {"train": [f"t{i}" for i in range(5)], "val": ["v0", "v1", "v2"]}
SIZES = {"t0": (24, 16), "t3": (17, 31)}  # (height, width); the others are 20 x 28


class ColourMasks(MaskDecoder):
    """The toy's masks: RGB PNGs whose colours stand for labels (``COLOURS``)."""

    def decode(self, sample: Sample) -> tuple[Any, bytes | None]:
        rgb = np.asarray(Image.open(io.BytesIO(read_sample_file(self.name(sample)))).convert("RGB"))
        label = np.full(rgb.shape[:2], 254, np.uint8)
        for colour, value in COLOURS.items():
            label[(rgb == colour).all(axis=-1)] = value
        if (label == 254).any():
            raise BadSampleError(self.name(sample), "colour outside the toy's colour table")
        return label, None  # the RGB file itself is not a label PNG: store the labels


class Toy(DatasetSource):
    """A toy dataset: ``toy/images/<id>.png``, ``toy/masks/<id>.png``, ``toy/splits/*.txt``."""

    name = "toy"
    splits = ("train", "val")
    class_names = ("background", "circle", "cross")
    config = "toy"

    def install(
        self, spec: DatasetFile, path: Path, root: Path, progress: bool, limits: Any
    ) -> None:
        if spec.install != "split-lists":
            return super().install(spec, path, root, progress, limits)
        for split, ids in json.loads(path.read_text()).items():
            target = root / spec.dest / f"{split}.txt"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(f"{i}\n" for i in ids))
        return None

    def find_root(self, src: Path) -> Path:
        if not (src / "toy" / "splits").is_dir():
            raise DataError(f"{src} holds no toy layout")
        return src / "toy"

    def plan(self, root: Path, splits: Sequence[str]) -> tuple[list[SplitPlan], list[str]]:
        plans = []
        for split in splits:
            ids = (root / "splits" / f"{split}.txt").read_text().split()
            samples = [
                Sample(str(root / "images" / f"{i}.png"), str(root / "masks" / f"{i}.png"))
                for i in ids
            ]
            plans.append(SplitPlan(split, samples, ColourMasks()))
        return plans, list(self.class_names)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _toy_files(www: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write the toy's two official files; returns each image id's (image, label map)."""
    rng = np.random.default_rng(7)
    samples, members = {}, {}
    palette = np.array(list(COLOURS), np.uint8)
    values = np.array(list(COLOURS.values()), np.uint8)
    for image_id in [i for ids in SPLITS.values() for i in ids]:
        height, width = SIZES.get(image_id, (20, 28))
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        which = rng.integers(0, len(COLOURS), (height, width))
        samples[image_id] = (image, values[which])
        members[f"images/{image_id}.png"] = _png(image)
        members[f"masks/{image_id}.png"] = _png(palette[which])
    with zipfile.ZipFile(www / "toy-images.zip", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    (www / "toy-splits.json").write_text(json.dumps(SPLITS))
    return samples


def _published(path: Path) -> tuple[str, int]:
    return f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}", path.stat().st_size


@pytest.fixture()
def toy(http_server: LocalHTTPServer) -> Iterator[tuple[Toy, dict]]:
    samples = _toy_files(http_server.root)
    source = Toy()
    images, lists = (http_server.root / n for n in ("toy-images.zip", "toy-splits.json"))
    source.files = (
        DatasetFile(
            images.name,
            http_server.url(images.name),
            *_published(images),
            "merge",
            "toy",
            ("toy/images", "toy/masks"),
        ),
        DatasetFile(
            lists.name,
            http_server.url(lists.name),
            *_published(lists),
            "split-lists",
            "toy/splits",
            ("toy/splits/train.txt", "toy/splits/val.txt"),
        ),
    )
    assert register(source) is source
    yield source, samples
    del sources_base._SOURCES[source.name]  # leave the registry as the other tests expect it


def test_a_registered_source_goes_download_convert_read(
    toy: tuple[Toy, dict], tmp_path: Path
) -> None:
    source, samples = toy
    assert "toy" in dataset_names() and get_source("toy") is source

    raw = download_dataset("toy", tmp_path / "raw", progress=False)
    out = tmp_path / "records"
    info = convert_dataset("toy", raw, out, shards=2, workers=2, progress=False)
    assert info["name"] == "toy"
    assert info["class_names"] == ["background", "circle", "cross"]
    assert {k: v["num_examples"] for k, v in info["splits"].items()} == {"train": 5, "val": 3}

    for split, ids in SPLITS.items():
        ds = make_dataset(
            str(out),
            split,
            image_size=16,
            batch_size=2,
            training=False,
            num_classes=3,
            include_original=True,
            patch_size=16,
        )
        read = {}
        for batch in ds:
            for j, name in enumerate(batch["filename"].numpy()):
                height, width = int(batch["height"][j]), int(batch["width"][j])
                read[Path(name.decode()).stem] = (
                    batch["original_image"][j, :height, :width].numpy(),
                    batch["mask"][j, :height, :width].numpy(),
                    batch["labels"][j].numpy(),
                )
        assert list(read) == ids  # every sample once, in list order
        for image_id, (image, mask, labels) in read.items():
            want_image, want_mask = samples[image_id]
            np.testing.assert_array_equal(image, want_image)
            np.testing.assert_array_equal(mask, want_mask)
            present = [float(c in want_mask) for c in range(3)]
            np.testing.assert_array_equal(labels, present)


def test_a_mask_the_source_cannot_decode_is_named(toy: tuple[Toy, dict], tmp_path: Path) -> None:
    raw = download_dataset("toy", tmp_path / "raw", progress=False)
    bad = raw / "toy" / "masks" / "v1.png"
    bad.write_bytes(_png(np.full((20, 28, 3), 9, np.uint8)))
    with pytest.raises(BadSampleError) as caught:
        convert_dataset("toy", raw, tmp_path / "records", workers=1, progress=False)
    assert caught.value.path == str(bad)
    assert not (tmp_path / "records").exists()
