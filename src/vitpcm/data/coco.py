"""COCO instance annotations turned into semantic label maps.

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
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from vitpcm.data.labels import VOC_CLASSES
from vitpcm.errors import BadSampleError, DataError

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
