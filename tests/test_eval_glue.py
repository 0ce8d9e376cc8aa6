"""``vitpcm eval`` and ``vitpcm test`` scored against a stub model whose masks are known.

The stub ignores the image: background on the left half of the patch grid, every object class
``k`` scored ``k`` on the right half. After the label merge the left half is background; on
the right half every present object class reaches (almost) 1, and the label merge's ``eps``
leaves the highest present class on top (an image with none stays background). Bilinear
upsampling moves the boundary by a known amount, so each pseudo mask, the confusion matrix and
the mIoU are worked out here from the ground-truth PNGs alone.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from helpers.tiny import make_tiny_dataset, tiny_config

GRID = 8  # 64 px images, 8 px patches (helpers.tiny)
IGNORE = 255
MERGE_EPS = 1e-5  # vitpcm.model.label_merge.DEFAULT_EPS: the tie-breaker between classes


@keras.saving.register_keras_serializable(package="vitpcm_tests")
class FixedMaps(keras.layers.Layer):
    """Per-patch class scores that depend on nothing but the patch's column."""

    def __init__(self, num_classes: int, patch_size: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.patch_size = patch_size
        maps = np.zeros((GRID, GRID, num_classes), "float32")
        maps[:, : GRID // 2, 0] = 1.0
        maps[:, GRID // 2 :, 1:] = np.arange(1, num_classes, dtype="float32")
        self.maps = maps

    def call(self, images: object) -> dict[str, object]:
        patch_probs = images[:, :GRID, :GRID, :1] * 0.0 + self.maps
        return {
            "patch_probs": patch_probs,
            "class_probs": keras.ops.max(patch_probs, axis=(1, 2)),
        }

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "num_classes": self.num_classes,
                "patch_size": self.patch_size}  # fmt: skip


def _expected_mask(gt: np.ndarray) -> np.ndarray:
    """The stub's baseline pseudo mask for a ground-truth mask, worked out by hand."""
    height, width = gt.shape
    present = sorted(int(c) for c in np.unique(gt) if c not in (0, IGNORE))
    if not present:
        return np.zeros_like(gt)
    # Right half after the merge: k / (k + eps) per present class, renormalised; left: 1 for
    # background. Bilinear (half-pixel centres): the right cells' weight at each column.
    scores = np.array([k / (k + MERGE_EPS) for k in present])
    right = scores.max() / scores.sum()
    column = (np.arange(width) + 0.5) * GRID / width - 0.5
    weight = np.clip(column - (GRID // 2 - 1), 0.0, 1.0)
    margin = weight * right - (1.0 - weight)
    assert np.abs(margin).min() > 1e-3  # no pixel near a tie
    row = np.where(margin > 0, present[-1], 0)
    return np.broadcast_to(row, (height, width)).astype(gt.dtype)


def _confusion(pairs: list[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    matrix = np.zeros((k, k), np.int64)
    for gt, pred in pairs:
        keep = gt != IGNORE
        np.add.at(matrix, (gt[keep].astype(int), pred[keep].astype(int)), 1)
    return matrix


def _miou(matrix: np.ndarray) -> float:
    tp = np.diag(matrix).astype(float)
    union = matrix.sum(0) + matrix.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("glue")
    data = make_tiny_dataset(root, train=1, val=5, test=0)
    # Batches of 2: the last of the 5 images comes in a partial batch.
    cfg = tiny_config("eval.batch_size=2", "crf.workers=1")
    stub = FixedMaps(cfg.data.num_classes, cfg.model.patch_size, name="backbone")
    images = keras.Input((cfg.data.image_size, cfg.data.image_size, 3))
    model_path = root / "stub.keras"
    keras.Model(images, stub(images)).save(model_path)
    voc = root / "raw" / "VOCdevkit" / "VOC2012"
    stems = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    gts = {s: np.array(Image.open(voc / "SegmentationClass" / f"{s}.png")) for s in stems}
    expected = {s: _expected_mask(gt) for s, gt in gts.items()}
    matrix = _confusion([(gts[s], expected[s]) for s in stems], cfg.data.num_classes)
    # The stub's masks are neither all right nor all wrong, and more than one class is hit.
    assert 0.0 < _miou(matrix) < 1.0 and (np.diag(matrix) > 0).sum() > 1
    return {"cfg": cfg, "data": str(data), "model": str(model_path), "expected": expected,
            "matrix": matrix}  # fmt: skip


def test_eval_scores_the_known_masks(case: dict, tmp_path: Path) -> None:
    from vitpcm.eval import run_eval

    out = tmp_path / "eval"
    metrics = run_eval(case["cfg"], case["model"], data_uri=case["data"], out_dir=str(out),
                       split="val", progress=False)  # fmt: skip
    np.testing.assert_array_equal(np.load(out / "confusion_matrix.npy"), case["matrix"])
    assert metrics["num_images"] == len(case["expected"])
    assert metrics["miou"] == pytest.approx(_miou(case["matrix"]), rel=1e-12)
    matrix = case["matrix"]
    assert metrics["pixel_accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum(), rel=1e-12)


def test_test_writes_the_known_masks_and_scores_them(case: dict, tmp_path: Path) -> None:
    from vitpcm.infer import run_test

    out = tmp_path / "test"
    metrics = run_test(case["cfg"], case["model"], data_uri=case["data"], out_dir=str(out),
                       split="val", progress=False)  # fmt: skip
    for stem, expected in case["expected"].items():
        written = np.array(Image.open(out / "pseudo_masks" / f"{stem}.png"))
        np.testing.assert_array_equal(written, expected, err_msg=stem)
    assert metrics["num_images"] == len(case["expected"])
    assert metrics["miou"] == pytest.approx(_miou(case["matrix"]), rel=1e-12)
