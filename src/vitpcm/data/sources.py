"""The official files of each dataset and how each becomes part of the standard layout.

Where each file comes from, its published checksum and size (with their sources), and what
it must provide once installed; :mod:`vitpcm.data.download` fetches and installs them.
"""

from __future__ import annotations

from dataclasses import dataclass

_VOC = "VOCdevkit/VOC2012"
_SEG_SETS = f"{_VOC}/ImageSets/Segmentation"


@dataclass(frozen=True)
class DatasetFile:
    """One file of a dataset and how it is unpacked.

    Attributes:
        name: The official file name (also the name under a ``--mirror``).
        url: Default download URL.
        checksum: Published ``sha256:HEX`` or ``md5:HEX``, or None when no public value is
            known (then the file's SHA-256 is recorded on first download, not verified).
        size: Published size in bytes, or None.
        install: How the file becomes part of the layout: ``merge`` (unpack into ``dest``),
            ``sbd`` (move ``SegmentationClassAug/`` under VOC2012) or ``trainaug`` (normalise
            the id list into ImageSets/Segmentation/trainaug.txt).
        dest: Folder (relative to ``out``) that ``merge`` unpacks into.
        provides: Paths (relative to ``out``) that must exist once the file is installed.
    """

    name: str
    url: str
    checksum: str | None
    size: int | None
    install: str
    dest: str
    provides: tuple[str, ...]


# Published checksums and sizes. VOC: the SHA-256 and sizes of TensorFlow Datasets'
# tensorflow_datasets/url_checksums/voc.txt (the trainval tar's MD5 there agrees with the
# 6cd6e144f989b92b3379bac3b3de84fd of torchvision's torchvision/datasets/voc.py). COCO: the
# SHA-256 and sizes of TensorFlow Datasets' tensorflow_datasets/url_checksums/coco.txt.
# SegmentationClassAug.zip and trainaug.txt (community mirrors of SBD-derived files) have no
# published checksum that we could find: their SHA-256 is recorded on first download and
# shown, and `checksums=` pins them.
DATASET_FILES: dict[str, tuple[DatasetFile, ...]] = {
    "voc12": (
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
    ),
    "coco14": (
        DatasetFile(
            "train2014.zip",
            "http://images.cocodataset.org/zips/train2014.zip",
            "sha256:ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775",
            13_510_573_713,
            "merge",
            "coco2014",
            ("coco2014/train2014",),
        ),
        DatasetFile(
            "val2014.zip",
            "http://images.cocodataset.org/zips/val2014.zip",
            "sha256:fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0",
            6_645_013_297,
            "merge",
            "coco2014",
            ("coco2014/val2014",),
        ),
        DatasetFile(
            "annotations_trainval2014.zip",
            "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
            "sha256:031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009",
            252_872_794,
            "merge",
            "coco2014",
            (
                "coco2014/annotations/instances_train2014.json",
                "coco2014/annotations/instances_val2014.json",
            ),
        ),
    ),
}
