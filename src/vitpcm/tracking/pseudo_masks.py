"""Reading a test step's pseudo masks back for the run page: scores, best and worst images.

The test step (:func:`vitpcm.infer.run_test`) writes one PNG per image in
``pseudo_masks/`` (BPM) and ``pseudo_masks_crf/`` (after the CRF), at each label's original
resolution. :func:`score_pseudo_masks` reads them with the ground truth and images from the
converted TFRecords and gives the confusion matrices before and after the CRF and the
images whose BPM scores highest and lowest (per-image mIoU over the classes in the ground
truth or the prediction), for the overlays. :func:`mask_sample` picks a few PNGs to log.
"""

from __future__ import annotations

import heapq
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BPM_DIR = "pseudo_masks"
CRF_DIR = "pseudo_masks_crf"


@dataclass
class PseudoMaskScores:
    """What :func:`score_pseudo_masks` found.

    Attributes:
        confusion_bpm: K x K pixel counts (rows ground truth) of the BPM.
        confusion_crf: the same after the CRF (``None`` without CRF masks).
        best: overlay samples (``name``, ``image``, ``ground_truth``, ``bpm``, ``crf``,
            ``miou``) of the highest per-image BPM mIoU, best first.
        worst: the lowest, worst first.
        per_image: ``(name, BPM mIoU)`` of every scored image, in file order.
    """

    confusion_bpm: np.ndarray
    confusion_crf: np.ndarray | None
    best: list[dict[str, Any]] = field(default_factory=list)
    worst: list[dict[str, Any]] = field(default_factory=list)
    per_image: list[tuple[str, float]] = field(default_factory=list)


def _confusion(gt: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    valid = gt < k  # 255 = ignore
    index = gt[valid].astype(np.int64) * k + np.minimum(pred[valid], k - 1).astype(np.int64)
    return np.bincount(index, minlength=k * k).reshape(k, k)


def image_miou(matrix: np.ndarray) -> float:
    """Mean IoU over the classes that occur in the ground truth or the prediction."""
    inter = np.diag(matrix).astype(np.float64)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else 1.0


def score_pseudo_masks(
    data_dir: str | os.PathLike[str],
    split: str,
    test_dir: str | os.PathLike[str],
    num_classes: int,
    count: int = 4,
) -> PseudoMaskScores | None:
    """Score the test step's pseudo masks of ``split`` against the TFRecords' ground truth.

    Args:
        data_dir: local TFRecord folder (images and masks).
        split: the split the test step ran on.
        test_dir: the test step's output folder.
        num_classes: K.
        count: how many best and worst images to keep.

    Returns:
        The scores, or None when the split has no masks or no pseudo mask was found.
    """
    import tensorflow as tf

    from vitpcm.data import tfrecord
    from vitpcm.data.labels import decode_label_png
    from vitpcm.data.reader import read_split_info

    info = read_split_info(str(data_dir), split)
    test = Path(test_dir)
    k = num_classes
    bpm_total = np.zeros((k, k), np.int64)
    crf_total = np.zeros((k, k), np.int64)
    crf_seen = False
    # Heaps of (key, order, example): the best keep the highest mIoU, the worst the lowest.
    best: list[tuple[float, int, dict[str, Any]]] = []
    worst: list[tuple[float, int, dict[str, Any]]] = []
    per_image: list[tuple[str, float]] = []
    for order, serialized in enumerate(tf.data.TFRecordDataset(list(info.files))):
        example = tfrecord.decode_example(serialized.numpy())
        if tfrecord.LABEL_ENCODED not in example:
            return None
        name = example[tfrecord.IMAGE_FILENAME].decode("utf-8")
        stem = os.path.splitext(os.path.basename(name))[0]
        bpm_path = test / BPM_DIR / f"{stem}.png"
        if not bpm_path.is_file():
            continue
        gt = decode_label_png(example[tfrecord.LABEL_ENCODED], name)
        bpm = decode_label_png(bpm_path.read_bytes(), str(bpm_path))
        matrix = _confusion(gt, bpm, k)
        bpm_total += matrix
        sample: dict[str, Any] = {"name": stem, "ground_truth": gt, "bpm": bpm}
        crf_path = test / CRF_DIR / f"{stem}.png"
        if crf_path.is_file():
            sample["crf"] = decode_label_png(crf_path.read_bytes(), str(crf_path))
            crf_total += _confusion(gt, sample["crf"], k)
            crf_seen = True
        score = image_miou(matrix)
        sample["miou"] = score
        sample["encoded"] = example[tfrecord.IMAGE_ENCODED]
        per_image.append((stem, score))
        for heap, key in ((best, score), (worst, -score)):
            entry = (key, -order, sample)
            if len(heap) < count:
                heapq.heappush(heap, entry)
            elif entry[:2] > heap[0][:2]:
                heapq.heapreplace(heap, entry)
    if not per_image:
        return None
    return PseudoMaskScores(
        confusion_bpm=bpm_total,
        confusion_crf=crf_total if crf_seen else None,
        best=[_with_image(e[2]) for e in sorted(best, key=lambda e: e[:2], reverse=True)],
        worst=[_with_image(e[2]) for e in sorted(worst, key=lambda e: e[:2], reverse=True)],
        per_image=per_image,
    )


def _with_image(sample: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image

    out = {key: value for key, value in sample.items() if key != "encoded"}
    out["image"] = np.asarray(Image.open(io.BytesIO(sample["encoded"])).convert("RGB"))
    out["name"] = f"{sample['name']} (mIoU {sample['miou']:.2f})"
    return out


def mask_sample(test_dir: str | os.PathLike[str], count: int = 8) -> list[Path]:
    """The first ``count`` BPM PNGs (by name) and their CRF twins, as relative paths."""
    test = Path(test_dir)
    names = sorted(p.name for p in (test / BPM_DIR).glob("*.png"))[:count]
    chosen = [Path(BPM_DIR) / n for n in names]
    chosen += [Path(CRF_DIR) / n for n in names if (test / CRF_DIR / n).is_file()]
    return chosen
