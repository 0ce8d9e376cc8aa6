"""COCO instances -> label maps, checked against masks worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from vitpcm.data.sources.coco14 import CocoMasks
from vitpcm.errors import BadSampleError, DataError

# Categories deliberately listed out of id order, with non-contiguous ids.
CATEGORIES = [
    {"id": 18, "name": "dog"},
    {"id": 1, "name": "person"},
    {"id": 72, "name": "tv"},
    {"id": 5, "name": "airplane"},
    {"id": 15, "name": "bench"},
    {"id": 63, "name": "couch"},
]
# Ascending id order: person 1, airplane 5, bench 15, dog 18, couch 63, tv 72.
FULL = {"person": 1, "airplane": 2, "bench": 3, "dog": 4, "couch": 5, "tv": 6}
VOC = {"person": 15, "airplane": 1, "dog": 12, "couch": 18, "tv": 20}

H, W = 260, 300  # image 1


def _rect(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
    """Polygon of a rectangle; pycocotools fills rows y0..y1-1 and columns x0..x1-1."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _ann(ann_id: int, image_id: int, category_id: int, segmentation, iscrowd: int = 0) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "iscrowd": iscrowd,
        "segmentation": segmentation,
    }


def _person_block() -> np.ndarray:
    block = np.zeros((H, W), dtype=np.uint8)
    block[40:80, 30:120] = 1
    return block


def _annotations() -> dict:
    crowd = mask_utils.encode(np.asfortranarray(_person_block()))
    crowd["counts"] = crowd["counts"].decode("ascii")  # JSON holds the compressed string
    # Uncompressed RLE, column-major runs: rows 200..209 of columns 250 and 251.
    first = 250 * H + 200
    plane_counts = [first, 10, H - 10, 10, H * W - (first + 10 + H - 10 + 10)]
    annotations = [
        # Listed first, so it wins overlaps, although its id is the largest.
        _ann(90, 1, 15, _rect(0, 0, 20, 10)),
        _ann(91, 1, 18, _rect(10, 20, 50, 60)),
        _ann(10, 1, 1, crowd, iscrowd=1),
        _ann(11, 1, 5, {"counts": plane_counts, "size": [H, W]}, iscrowd=1),
        _ann(12, 1, 18, _rect(5, 5, 15, 30)),
        # Tiny image: skipped even though annotated.
        _ann(20, 2, 72, _rect(0, 0, 50, 50)),
        # Only a non-VOC category: kept with 80 classes, no foreground with voc20.
        _ann(40, 4, 15, _rect(100, 100, 103, 102)),
        # A polygon covering no pixel.
        _ann(50, 5, 63, [[7, 7, 7, 7, 7, 7]]),
        _ann(60, 6, 63, _rect(0, 250, 4, 256)),
        _ann(61, 6, 72, _rect(2, 254, 300, 256)),
    ]
    images = [
        {"id": 1, "file_name": "COCO_val2014_000000000001.jpg", "height": H, "width": W},
        {"id": 2, "file_name": "tiny.jpg", "height": 200, "width": 400},
        {"id": 3, "file_name": "empty.jpg", "height": 256, "width": 256},
        {"id": 4, "file_name": "bench.jpg", "height": 256, "width": 256},
        {"id": 5, "file_name": "degenerate.jpg", "height": 256, "width": 256},
        {"id": 6, "file_name": "edge.jpg", "height": 256, "width": 300},
    ]
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


@pytest.fixture
def instances(tmp_path):
    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps(_annotations()))
    return path


def _expected_image1(ids: dict[str, int], with_bench: bool) -> np.ndarray:
    """The label map of image 1, painted in reverse file order so earlier ones end on top."""
    label = np.zeros((H, W), dtype=np.uint8)
    label[5:30, 5:15] = ids["dog"]  # annotation 12
    label[200:210, 250:252] = ids["airplane"]  # annotation 11 (uncompressed RLE)
    label[40:80, 30:120] = ids["person"]  # annotation 10 (crowd, compressed RLE)
    label[20:60, 10:50] = ids["dog"]  # annotation 91
    if with_bench:
        label[0:10, 0:20] = ids["bench"]  # annotation 90
    return label


def test_full_mapping_and_class_names(instances):
    coco = CocoMasks(instances)
    assert coco.num_classes == 7
    assert coco.class_names == ["background", "person", "airplane", "bench", "dog", "couch", "tv"]


def test_filtered_image_ids(instances):
    # 2 too small, 3 without annotations, 5 with an empty polygon.
    assert CocoMasks(instances).image_ids == [1, 4, 6]
    assert CocoMasks(instances, voc20=True).image_ids == [1, 6]
    assert CocoMasks(instances, min_size=100).image_ids == [1, 2, 4, 6]


def test_mask_first_annotation_wins(instances):
    coco = CocoMasks(instances)
    mask = coco.mask(1)
    assert mask.dtype == np.uint8
    assert mask.shape == (H, W)
    expected = _expected_image1(FULL, with_bench=True)
    np.testing.assert_array_equal(mask, expected)
    # Spot checks of the overlaps: dog (first) over person (crowd), bench over both dogs.
    assert mask[45, 35] == FULL["dog"]
    assert mask[45, 60] == FULL["person"]
    assert mask[7, 7] == FULL["bench"]
    assert mask[25, 7] == FULL["dog"]


def test_mask_small_and_edge_instances(instances):
    coco = CocoMasks(instances)
    expected = np.zeros((256, 256), dtype=np.uint8)
    expected[100:102, 100:103] = FULL["bench"]
    np.testing.assert_array_equal(coco.mask(4), expected)
    edge = np.zeros((256, 300), dtype=np.uint8)
    edge[254:256, 2:300] = FULL["tv"]
    edge[250:256, 0:4] = FULL["couch"]
    np.testing.assert_array_equal(coco.mask(6), edge)


def test_voc20_mapping(instances):
    coco = CocoMasks(instances, voc20=True)
    assert coco.num_classes == 21
    assert coco.class_names[1] == "aeroplane"
    assert coco.class_names[18] == "sofa"
    # The bench annotation is dropped, so the dog beneath it shows through.
    np.testing.assert_array_equal(coco.mask(1), _expected_image1(VOC, with_bench=False))
    assert set(np.unique(coco.mask(6)).tolist()) == {0, VOC["couch"], VOC["tv"]}


def test_file_name(instances):
    assert CocoMasks(instances).file_name(1) == "COCO_val2014_000000000001.jpg"


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        CocoMasks(tmp_path / "nope.json")


def test_not_an_instances_file(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="no categories"):
        CocoMasks(path)
    path.write_text("{broken")
    with pytest.raises(DataError, match="cannot read COCO annotations"):
        CocoMasks(path)


def test_unknown_category(tmp_path):
    data = _annotations()
    data["annotations"][0]["category_id"] = 999
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BadSampleError, match="unknown category_id 999"):
        CocoMasks(path)
