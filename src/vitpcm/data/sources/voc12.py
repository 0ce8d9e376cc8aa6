"""PASCAL VOC 2012 with SBD's augmented masks (trainaug), and any folder in its layout.

``vitpcm data download --dataset voc12`` leaves::

    <out>/VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, SegmentationClassAug,
                             ImageSets/Segmentation/{train,val,trainval,test,trainaug}.txt}

A ``classes.txt`` beside ``JPEGImages`` (one name per line, background first), as
``vitpcm data synth`` writes, replaces the VOC class names.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from vitpcm.data.sources.base import (
    DatasetFile,
    DatasetSource,
    MaskDecoder,
    Sample,
    SplitPlan,
    logger,
    write_text_atomic,
)
from vitpcm.errors import ArchiveError, DataError

_VOC = "VOCdevkit/VOC2012"
_SEG_SETS = f"{_VOC}/ImageSets/Segmentation"
_IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
"""The 21 PASCAL VOC 2012 segmentation classes in label order, background first."""

# Published checksums and sizes: the SHA-256 and sizes of TensorFlow Datasets'
# tensorflow_datasets/url_checksums/voc.txt (the trainval tar's MD5 there agrees with the
# 6cd6e144f989b92b3379bac3b3de84fd of torchvision's torchvision/datasets/voc.py).
# SegmentationClassAug.zip and trainaug.txt (community mirrors of SBD-derived files) have no
# published checksum that we could find: their SHA-256 is recorded on first download and
# shown, and `checksums=` pins them.
FILES = (
    DatasetFile(
        "VOCtrainval_11-May-2012.tar",
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
        "sha256:e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb",
        1_999_639_040,
        "merge",
        ".",
        (
            f"{_VOC}/JPEGImages",
            f"{_VOC}/SegmentationClass",
            f"{_SEG_SETS}/train.txt",
            f"{_SEG_SETS}/val.txt",
            f"{_SEG_SETS}/trainval.txt",
        ),
    ),
    # Mirror: the official test archive sits behind the evaluation server's login.
    DatasetFile(
        "VOC2012test.tar",
        "http://pjreddie.com/media/files/VOC2012test.tar",
        "sha256:f08582b1935816c5eab3bbb1eb6d06201a789eaa173cdf1cf400c26f0cac2fb3",
        1_850_626_560,
        "merge",
        ".",
        (f"{_SEG_SETS}/test.txt",),
    ),
    # Mirror: the SBD masks as single-channel PNGs, as commonly shared for DeepLab.
    DatasetFile(
        "SegmentationClassAug.zip",
        "https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1",
        None,
        None,
        "sbd",
        _VOC,
        (f"{_VOC}/SegmentationClassAug",),
    ),
    # Mirror: the 10,582-image trainaug id list (a gist pinned to one revision).
    DatasetFile(
        "trainaug.txt",
        "https://gist.githubusercontent.com/sun11/2dbda6b31acc7c6292d14a872d0c90b7/raw/"
        "5f5a5270089239ef2f6b65b1cc55208355b5acca/trainaug.txt",
        None,
        None,
        "trainaug",
        _SEG_SETS,
        (f"{_SEG_SETS}/trainaug.txt",),
    ),
)


class VocLayout(DatasetSource):
    """A dataset in the VOC layout: ``JPEGImages``, ``SegmentationClass*``, split lists."""

    splits = ("train", "val", "trainval", "trainaug", "test")

    def find_root(self, src: Path) -> Path:
        for candidate in (src / "VOCdevkit" / "VOC2012", src / "VOC2012", src):
            if (candidate / "ImageSets" / "Segmentation").is_dir():
                return candidate
        raise DataError(
            f"{src} holds no VOC layout (VOCdevkit/VOC2012/ImageSets/Segmentation); pass the "
            "folder made by `vitpcm data download --dataset voc12` or `vitpcm data synth`"
        )

    def layout_class_names(self, root: Path) -> list[str]:
        """``classes.txt``'s names when the folder has one, else :attr:`class_names`."""
        names_file = root / "classes.txt"
        if not names_file.is_file():
            return list(self.class_names)
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(names) < 2:
            raise DataError(f"{names_file} lists {len(names)} class names; it needs at least 2")
        return names

    def plan(self, root: Path, splits: Sequence[str]) -> tuple[list[SplitPlan], list[str]]:
        lists = root / "ImageSets" / "Segmentation"
        plans = []
        for split in splits:
            list_file = lists / f"{split}.txt"
            if not list_file.is_file():
                logger.info("split %s skipped: %s not found", split, list_file)
                continue
            ids = _read_ids(list_file)
            if not ids:
                self.empty_split(split, list_file)
                continue
            # trainaug: SBD masks, with the VOC ones where SBD has none.
            folders = ("SegmentationClassAug", "SegmentationClass")
            masks = [
                _first_existing(root, i, folders if split == "trainaug" else folders[1:])
                for i in ids
            ]
            # The real VOC test set has no public masks; the synthetic one has them.
            has_masks = split != "test" or all(os.path.exists(m) for m in masks)
            samples = [
                Sample(_image(root, i), m if has_masks else None)
                for i, m in zip(ids, masks, strict=True)
            ]
            plans.append(SplitPlan(split, samples, MaskDecoder() if has_masks else None))
        return plans, self.layout_class_names(root)


class Voc12(VocLayout):
    """PASCAL VOC 2012 + SBD trainaug."""

    name = "voc12"
    files = FILES
    class_names = VOC_CLASSES
    config = "voc12_vit_s16"

    def install(
        self, spec: DatasetFile, path: Path, root: Path, progress: bool, limits: Any
    ) -> None:
        if spec.install == "sbd":
            _install_sbd(path, root / spec.dest, progress, limits)
        elif spec.install == "trainaug":
            ids = normalise_id_list(path.read_bytes(), path)
            write_text_atomic(root / spec.dest / "trainaug.txt", "\n".join(ids) + "\n")
        else:
            super().install(spec, path, root, progress, limits)


SOURCE = Voc12()


def _read_ids(list_file: Path) -> list[str]:
    """Image ids of a split list; accepts plain ids or DeepLab-style ``/JPEGImages/x.jpg`` lines."""
    ids = []
    for line in list_file.read_text().splitlines():
        token = line.split()[0] if line.strip() else ""
        if token and not token.startswith("#"):
            ids.append(Path(token).stem)
    return ids


def _image(root: Path, image_id: str) -> str:
    jpeg = root / "JPEGImages" / f"{image_id}.jpg"
    if not jpeg.exists():
        for other in (".jpeg", ".png"):
            alternative = jpeg.with_suffix(other)
            if alternative.exists():
                return str(alternative)
    return str(jpeg)


def _first_existing(root: Path, image_id: str, folders: Sequence[str]) -> str:
    paths = [root / folder / f"{image_id}.png" for folder in folders]
    return str(next((p for p in paths if p.exists()), paths[0]))


def _install_sbd(archive: Path, voc_dir: Path, progress: bool, limits: Any) -> None:
    """Move the zip's ``SegmentationClassAug/`` folder to ``VOC2012/SegmentationClassAug``."""
    from vitpcm.data.archives import staging_dir, unpack

    with staging_dir(voc_dir, "sbd") as staging:
        unpack(archive, staging, progress=progress, limits=limits)
        candidates = [staging / "SegmentationClassAug"]
        candidates += sorted(staging.glob("*/SegmentationClassAug"))
        found = next((c for c in candidates if c.is_dir()), None)
        if found is None:
            raise ArchiveError(
                f"{archive} has no SegmentationClassAug/ folder: is it the right file? (try "
                "--mirror)"
            )
        target = voc_dir / "SegmentationClassAug"
        if target.exists():
            shutil.rmtree(target)
        os.replace(found, target)


def normalise_id_list(data: bytes, source: str | Path) -> list[str]:
    """Image ids from a trainaug-style list, in order, without duplicates.

    Accepts plain ids (``2007_000032``) and the DeepLab pair format
    (``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``).

    Raises:
        DataError: Naming the line, when a line is neither (e.g. an HTML page was served).
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{source} is not a text list of image ids: {err}") from err
    ids: list[str] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        stem = PurePosixPath(line.split()[0].replace("\\", "/")).stem
        if not _IMAGE_ID.fullmatch(stem):
            raise DataError(
                f"{source} line {lineno} is neither an image id nor a '/JPEGImages/<id>.jpg "
                f"...' pair: {line[:80]!r}; is it the right file?"
            )
        if stem not in seen:
            seen.add(stem)
            ids.append(stem)
    if not ids:
        raise DataError(f"{source} lists no image ids: is it the right file?")
    return ids
