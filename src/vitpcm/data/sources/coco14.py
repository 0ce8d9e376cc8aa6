"""COCO 2014 instance annotations as semantic label maps (80 categories + background).

``vitpcm data download --dataset coco14`` leaves::

    <out>/coco2014/{train2014/, val2014/, annotations/instances_{train,val}2014.json}

The ViT-PCM COCO setting uses one label map per image: the 80 object categories are
numbered 1..80 in ascending category-id order and everything else is background (0).
Where instances overlap, the **first** annotation wins, in the order the annotations
appear in the JSON file (pycocotools keeps that order per image). Polygons, uncompressed
RLE and compressed RLE (crowd regions) are all rasterised by pycocotools.

Images smaller than ``min_size`` pixels on either side, or whose label map would hold
no foreground pixel, are left out of :attr:`CocoMasks.image_ids`, as in the paper.

With ``voc20=True`` only the 20 PASCAL VOC categories are kept, numbered as in VOC
(1..20); the annotations of the other 60 categories are dropped before rasterising, so
their pixels are background and never hide a VOC object.

Each conversion worker gets an annotation file holding only its shard's images.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitpcm.data.sources.base import (
    DatasetFile,
    DatasetSource,
    MaskDecoder,
    Sample,
    SplitPlan,
    logger,
)
from vitpcm.data.sources.voc12 import VOC_CLASSES
from vitpcm.errors import BadSampleError, DataError

if TYPE_CHECKING:
    import numpy as np

# COCO 2014's 80 categories in category-id order (the order `data convert` gives them).
COCO_CLASSES: tuple[str, ...] = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# Published checksums and sizes: the SHA-256 and sizes of TensorFlow Datasets'
# tensorflow_datasets/url_checksums/coco.txt.
FILES = (
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
)


COCO_TO_VOC: dict[str, str] = {
    "airplane": "aeroplane",
    "bicycle": "bicycle",
    "bird": "bird",
    "boat": "boat",
    "bottle": "bottle",
    "bus": "bus",
    "car": "car",
    "cat": "cat",
    "chair": "chair",
    "cow": "cow",
    "dining table": "diningtable",
    "dog": "dog",
    "horse": "horse",
    "motorcycle": "motorbike",
    "person": "person",
    "potted plant": "pottedplant",
    "sheep": "sheep",
    "couch": "sofa",
    "train": "train",
    "tv": "tvmonitor",
}
"""COCO category name -> VOC class name for the 20 categories the datasets share."""


class CocoMasks:
    """Semantic label maps for the images of one COCO instances annotation file.

    Args:
        annotations_json: Path of an ``instances_*.json`` file.
        voc20: Keep only the 20 VOC categories, numbered as in VOC.
        min_size: Images with height or width below this are skipped.

    Attributes:
        image_ids: Ids of the usable images (large enough, some foreground), ascending.
        class_names: Label names by index, ``'background'`` first.
        num_classes: ``len(class_names)``: 81 for COCO, 21 with ``voc20``.
    """

    def __init__(
        self, annotations_json: str | Path, voc20: bool = False, min_size: int = 256
    ) -> None:
        from pycocotools.coco import COCO

        path = Path(annotations_json)
        dataset = _load_annotations(path)
        self._path = str(path)
        self._coco = COCO()
        self._coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            self._coco.createIndex()

        categories = sorted(dataset["categories"], key=lambda c: int(c["id"]))
        if voc20:
            voc_index = {name: i for i, name in enumerate(VOC_CLASSES)}
            self._label_of = {
                int(c["id"]): voc_index[COCO_TO_VOC[c["name"]]]
                for c in categories
                if c["name"] in COCO_TO_VOC
            }
            self.class_names: list[str] = list(VOC_CLASSES)
        else:
            self._label_of = {int(c["id"]): i + 1 for i, c in enumerate(categories)}
            self.class_names = ["background", *(str(c["name"]) for c in categories)]
        self.num_classes = len(self.class_names)
        self._all_ids = {int(c["id"]) for c in categories}
        self.image_ids: list[int] = [
            image_id for image_id in sorted(self._coco.imgs) if self._usable(image_id, min_size)
        ]

    def file_name(self, image_id: int) -> str:
        """The image's file name as given in the annotations (e.g. ``COCO_val2014_...jpg``)."""
        return str(self._coco.imgs[image_id]["file_name"])

    def mask(self, image_id: int) -> np.ndarray:
        """The ``(H, W)`` uint8 label map of one image (first annotation wins on overlap)."""
        info = self._coco.imgs[image_id]
        height, width = int(info["height"]), int(info["width"])
        import numpy as np

        label = np.zeros((height, width), dtype=np.uint8)
        for annotation in self._kept_annotations(image_id):
            instance = self._instance_mask(annotation)
            if instance.shape != label.shape:
                raise BadSampleError(
                    self._where(image_id),
                    f"annotation {annotation.get('id')} has a {instance.shape[1]}x"
                    f"{instance.shape[0]} mask but the image is {width}x{height}; "
                    "the annotation file is inconsistent",
                )
            # Pixels already labelled belong to an earlier annotation, which wins.
            label[(instance > 0) & (label == 0)] = self._label_of[int(annotation["category_id"])]
        return label

    def _where(self, image_id: int) -> str:
        return f"{self._path} image {image_id} ({self._coco.imgs[image_id].get('file_name')})"

    def _kept_annotations(self, image_id: int) -> list[dict[str, Any]]:
        kept = []
        for annotation in self._coco.imgToAnns.get(image_id, []):
            category = int(annotation["category_id"])
            if category not in self._all_ids:
                raise BadSampleError(
                    self._where(image_id),
                    f"annotation {annotation.get('id')} has unknown category_id {category}",
                )
            if category in self._label_of:
                kept.append(annotation)
        return kept

    def _instance_mask(self, annotation: dict[str, Any]) -> np.ndarray:
        try:
            return self._coco.annToMask(annotation)
        except Exception as exc:  # pycocotools raises bare errors on malformed shapes
            raise BadSampleError(
                self._where(int(annotation["image_id"])),
                f"cannot rasterise annotation {annotation.get('id')} ({exc})",
            ) from exc

    def _usable(self, image_id: int, min_size: int) -> bool:
        from pycocotools import mask as mask_utils

        info = self._coco.imgs[image_id]
        if min(int(info["height"]), int(info["width"])) < min_size:
            return False
        # Any kept annotation covering a pixel gives the label map foreground, because
        # first-wins only chooses *which* kept class a pixel gets. Measuring the RLE area
        # avoids rasterising full masks for every image up front.
        for annotation in self._kept_annotations(image_id):
            try:
                rle = self._coco.annToRLE(annotation)
            except Exception as exc:
                raise BadSampleError(
                    self._where(image_id),
                    f"cannot rasterise annotation {annotation.get('id')} ({exc})",
                ) from exc
            if int(mask_utils.area(rle)) > 0:
                return True
        return False


def _load_annotations(path: Path) -> dict[str, Any]:
    try:
        dataset = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise DataError(
            f"COCO annotations {path} not found; run `vitpcm data download --dataset coco14` "
            "or pass the folder that holds annotations/"
        ) from exc
    except (OSError, ValueError) as exc:
        raise DataError(
            f"cannot read COCO annotations {path} ({exc}); download the file again"
        ) from exc
    missing = [
        key
        for key in ("images", "annotations", "categories")
        if not isinstance(dataset, dict) or key not in dataset
    ]
    if missing:
        raise DataError(
            f"{path} is not a COCO instances file (no {', '.join(missing)}); "
            "use annotations/instances_<split>2014.json"
        )
    return dataset


class CocoAnnotationMasks(MaskDecoder):
    """Label maps rasterised from an instances file; ``Sample.mask`` is the image id."""

    def __init__(self, annotations: str) -> None:
        self.annotations = annotations
        self._masks: CocoMasks | None = None  # built where it decodes: in the worker

    def for_shards(
        self, shards: Sequence[Sequence[Sample]], staging: Path, split: str
    ) -> list[MaskDecoder]:
        """Decoders over files holding only each shard's images and annotations."""
        data = json.loads(Path(self.annotations).read_bytes())
        images = {int(img["id"]): img for img in data["images"]}
        by_image: dict[int, list[Any]] = {}
        for annotation in data["annotations"]:
            by_image.setdefault(int(annotation["image_id"]), []).append(annotation)
        decoders: list[MaskDecoder] = []
        for index, samples in enumerate(shards):
            ids = [int(s.mask) for s in samples if s.mask is not None]
            subset = {
                "images": [images[i] for i in ids],
                "annotations": [a for i in ids for a in by_image.get(i, [])],
                "categories": data["categories"],
            }
            path = staging / f"{split}-{index:05d}.json"
            path.write_text(json.dumps(subset))
            decoders.append(CocoAnnotationMasks(str(path)))
        return decoders

    def name(self, sample: Sample) -> str:
        return f"{sample.image} (annotations)"

    def decode(self, sample: Sample) -> tuple[Any, bytes | None]:
        if self._masks is None:
            self._masks = CocoMasks(self.annotations)
        return self._masks.mask(int(sample.mask or -1)), None


class Coco14(DatasetSource):
    """COCO 2014 train/val."""

    name = "coco14"
    files = FILES
    splits = ("train", "val")
    class_names = COCO_CLASSES
    config = "coco14_vit_b16"

    def find_root(self, src: Path) -> Path:
        for candidate in (src / "coco2014", src):
            if (candidate / "annotations").is_dir():
                return candidate
        raise DataError(
            f"{src} holds no COCO 2014 layout (coco2014/annotations/); pass the folder made "
            "by `vitpcm data download --dataset coco14`"
        )

    def plan(self, root: Path, splits: Sequence[str]) -> tuple[list[SplitPlan], list[str]]:
        plans, names = [], []
        for split in splits:
            annotations = root / "annotations" / f"instances_{split}2014.json"
            if not annotations.is_file():
                logger.info("split %s skipped: %s not found", split, annotations)
                continue
            logger.info("reading %s", annotations)
            masks = CocoMasks(annotations)
            names = list(masks.class_names)
            images = root / f"{split}2014"
            samples = [Sample(str(images / masks.file_name(i)), str(i)) for i in masks.image_ids]
            del masks  # the full annotation index is large; workers get per-shard subsets
            if not samples:
                self.empty_split(split, annotations)
                continue
            plans.append(SplitPlan(split, samples, CocoAnnotationMasks(str(annotations))))
        return plans, names


SOURCE = Coco14()
