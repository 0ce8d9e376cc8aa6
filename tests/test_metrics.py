"""Confusion-matrix metrics checked against values worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vitpcm.metrics import (
    ConfusionMatrix,
    json_safe,
    metrics_from_matrix,
    plot_class_iou,
    plot_confusion_matrix,
    write_metrics_json,
)

# K = 4: class 2 appears only in the prediction, class 3 in neither; two pixels are 255.
GT = np.array(
    [
        [0, 0, 1, 1],
        [0, 255, 1, 1],
        [0, 0, 255, 1],
    ],
    dtype=np.uint8,
)
PRED = np.array(
    [
        [0, 1, 1, 1],
        [0, 2, 1, 0],
        [2, 0, 1, 1],
    ],
    dtype=np.uint8,
)
# Rows = ground truth, columns = prediction, counted over the 10 non-ignored pixels.
EXPECTED = np.array(
    [
        [3, 1, 1, 0],
        [1, 4, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
    ]
)


def test_matrix_counts_by_hand() -> None:
    cm = ConfusionMatrix(4).update(GT, PRED)
    np.testing.assert_array_equal(cm.matrix, EXPECTED)
    assert cm.matrix.dtype == np.int64
    assert cm.num_pixels == 10


def test_metrics_by_hand() -> None:
    m = ConfusionMatrix(4, class_names=["bg", "a", "b", "c"]).update(GT, PRED).compute()
    # IoU0 = 3 / (5 + 4 - 3), IoU1 = 4 / (5 + 5 - 4), IoU2 = 0 / 1, IoU3 undefined (0 / 0).
    assert m["class_iou"][:3] == pytest.approx([0.5, 2 / 3, 0.0])
    assert m["class_iou"][3] is None
    assert m["miou"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    assert m["pixel_accuracy"] == pytest.approx(7 / 10)
    assert m["mean_accuracy"] == pytest.approx((3 / 5 + 4 / 5) / 2)
    assert m["class_accuracy"][:2] == pytest.approx([3 / 5, 4 / 5])
    assert m["class_accuracy"][2:] == [None, None]
    assert m["frequency_weighted_iou"] == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert m["class_names"] == ["bg", "a", "b", "c"]
    assert m["num_classes"] == 4
    assert m["num_pixels"] == 10


def test_update_matches_pixel_loop_on_random_maps() -> None:
    rng = np.random.default_rng(1)
    k = 21
    gt = rng.integers(0, k, size=(37, 53)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, k, size=gt.shape).astype(np.int64)
    expected = np.zeros((k, k), dtype=np.int64)
    for g, p in zip(gt.ravel(), pred.ravel(), strict=True):
        if g != 255:
            expected[g, p] += 1
    np.testing.assert_array_equal(ConfusionMatrix(k).update(gt, pred).matrix, expected)


def test_wide_class_count_uses_a_wide_index() -> None:
    # 300 classes overflow a uint16 pair index; the counts must still be right.
    k = 300
    gt = np.array([[299, 0], [150, 299]], dtype=np.int32)
    pred = np.array([[299, 298], [150, 0]], dtype=np.int32)
    matrix = ConfusionMatrix(k, ignore_index=None).update(gt, pred).matrix
    assert matrix[299, 299] == 1 and matrix[0, 298] == 1 and matrix[150, 150] == 1
    assert matrix[299, 0] == 1 and matrix.sum() == 4


def test_merge_equals_one_matrix_over_both() -> None:
    rng = np.random.default_rng(2)
    maps = [
        (rng.integers(0, 5, size=(20, 30)), rng.integers(0, 5, size=(20, 30))) for _ in range(4)
    ]
    whole = ConfusionMatrix(5)
    for gt, pred in maps:
        whole.update(gt, pred)
    first, second = ConfusionMatrix(5), ConfusionMatrix(5)
    for gt, pred in maps[:2]:
        first.update(gt, pred)
    for gt, pred in maps[2:]:
        second.update(gt, pred)
    merged = first.merge(second)
    np.testing.assert_array_equal(merged.matrix, whole.matrix)
    assert merged.compute() == whole.compute()


def test_merge_rejects_different_class_counts() -> None:
    with pytest.raises(ValueError, match="5-class"):
        ConfusionMatrix(4).merge(ConfusionMatrix(5))


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)"):
        ConfusionMatrix(4).update(GT, PRED.T)


@pytest.mark.parametrize(
    ("gt", "pred", "message"),
    [
        (np.array([[7]]), np.array([[0]]), "ground truth has label value 7"),
        (np.array([[0]]), np.array([[255]]), "prediction has label value 255"),
        (np.array([[0]]), np.array([[-1]]), "prediction has label value -1"),
    ],
)
def test_out_of_range_values_are_rejected(gt, pred, message) -> None:
    with pytest.raises(ValueError, match=message):
        ConfusionMatrix(4).update(gt, pred)


def test_float_maps_are_rejected() -> None:
    with pytest.raises(ValueError, match="integer"):
        ConfusionMatrix(4).update(GT, PRED.astype(np.float32))


def test_fully_ignored_map_counts_nothing() -> None:
    cm = ConfusionMatrix(4).update(np.full((3, 3), 255, np.uint8), np.zeros((3, 3), np.uint8))
    assert cm.num_pixels == 0
    m = cm.compute()
    assert m["miou"] is None and m["pixel_accuracy"] is None
    assert m["class_iou"] == [None] * 4
    json.dumps(m, allow_nan=False)


def test_metrics_from_matrix_rejects_non_square() -> None:
    with pytest.raises(ValueError, match="square"):
        metrics_from_matrix(np.zeros((2, 3)))


def _strict_load(path) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_metrics_json_is_strict_json(tmp_path) -> None:
    m = ConfusionMatrix(4).update(GT, PRED).compute()
    m.update(
        miou_crf=np.float32(0.25),
        best_epoch=np.int64(3),
        extra=[float("nan"), float("inf"), np.nan],
        matrix=np.eye(2, dtype=np.int64),
    )
    path = tmp_path / "out" / "metrics.json"
    write_metrics_json(str(path), m)
    loaded = _strict_load(path)
    assert loaded["miou"] == pytest.approx(m["miou"])
    assert 0.0 <= loaded["miou"] <= 1.0
    assert loaded["class_iou"][3] is None
    assert loaded["pixel_accuracy"] == pytest.approx(0.7)
    assert loaded["miou_crf"] == pytest.approx(0.25)
    assert loaded["best_epoch"] == 3
    assert loaded["extra"] == [None, None, None]
    assert loaded["matrix"] == [[1, 0], [0, 1]]
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left


def test_json_safe_keeps_plain_values() -> None:
    value = {"a": 1, "b": "x", "c": None, "d": [0.5, True]}
    assert json_safe(value) == value


def test_plots_write_png(tmp_path) -> None:
    cm = ConfusionMatrix(4).update(GT, PRED)
    names = ["background", "aeroplane", "bicycle", "bird"]
    matrix_png = tmp_path / "confusion.png"
    iou_png = tmp_path / "class_iou.png"
    plot_confusion_matrix(cm.matrix, names, str(matrix_png))
    plot_class_iou(cm.compute()["class_iou"], names, str(iou_png), sort=True)
    for path in (matrix_png, iou_png):
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert min(image.size) > 100


def test_plot_rejects_wrong_name_count(tmp_path) -> None:
    with pytest.raises(ValueError, match="3 class names for 4"):
        plot_class_iou([0.1, 0.2, 0.3, None], ["a", "b", "c"], str(tmp_path / "x.png"))
