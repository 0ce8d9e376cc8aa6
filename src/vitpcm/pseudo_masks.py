"""Pseudo masks of a split in worker processes: merge, upsample, arg-max, CRF, PNG bytes.

``vitpcm test`` runs the network in the main process, one batch at a time, and hands each
image's patch probabilities (a small G x G x K grid) to a pool of worker processes, which do
everything per image that scales with its pixels: the label merge, the bilinear upsampling to
the image's own size, the arg-max, the ``probs/<id>.npz`` and ``pseudo_masks/<id>.png`` bytes
and, with ``--crf``, the dense CRF over the present classes and its PNG. The main process only
writes the bytes and updates the confusion matrices, so the next batch's forward runs while
the workers finish the previous ones (at most ``max_in_flight`` images wait).

NumPy only (no TensorFlow in the workers): :func:`label_merge` and :func:`resize_bilinear`
compute what :func:`vitpcm.model.label_merge.label_merge` and ``tf.image.resize(...,
"bilinear")`` compute, in the same float32 order of operations
(``tests/test_pseudo_masks.py`` compares them).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vitpcm.parallel import ordered_map, resolve_workers

if TYPE_CHECKING:
    from vitpcm.config import CrfConfig

# vitpcm.model.label_merge.DEFAULT_EPS (that module imports TensorFlow).
MERGE_EPS = 1e-5


@dataclass
class Task:
    """One image for the workers."""

    stem: str
    patch_probs: np.ndarray  # (G_h, G_w, K) float32
    labels: np.ndarray  # (K,) multi-hot: the merge's (and the CRF's) present classes
    height: int
    width: int
    image: np.ndarray | None = None  # (H, W, 3) uint8, for the CRF
    crf_params: CrfConfig | None = None  # the crf config section; None: no CRF


@dataclass
class Result:
    """What the main process writes for one image."""

    stem: str
    npz: bytes
    png: bytes
    prediction: np.ndarray  # (H, W) uint8
    crf_png: bytes | None = None
    crf_labels: np.ndarray | None = None


def label_merge(patch_probs: np.ndarray, labels: np.ndarray, eps: float = MERGE_EPS) -> np.ndarray:
    """The label merge of one (H, W, K) class map: float32 (H, W, K), a distribution per cell."""
    maps = np.asarray(patch_probs, np.float32)
    present_labels = np.asarray(labels, np.float32)
    masked = maps * present_labels
    peak = masked.max(axis=(0, 1), keepdims=True)
    denominator = peak + np.float32(eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        normalised = np.where(denominator != 0, masked / denominator, np.float32(0))
    total = normalised.sum(axis=-1, keepdims=True, dtype=np.float32)
    present = (present_labels > 0).astype(np.float32)
    uniform = present if present.sum() > 0 else np.ones_like(present)
    uniform = uniform / uniform.sum(dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        merged = np.where(total > 0, normalised / total, np.broadcast_to(uniform, maps.shape))
    return merged.astype(np.float32)


def _axis(out: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # TensorFlow's half-pixel bilinear: in = (o + 0.5) * scale - 0.5, in float32.
    scale = np.float32(size / out)
    coord = (np.arange(out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    low = np.floor(coord)
    lower = np.maximum(low, 0).astype(np.int64)
    upper = np.minimum(np.ceil(coord), size - 1).astype(np.int64)
    return lower, upper, (coord - low).astype(np.float32)


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """``tf.image.resize(x, (height, width), "bilinear")`` of one (h, w, C) array, float32."""
    x = np.asarray(x, np.float32)
    top_i, bottom_i, y_lerp = _axis(height, x.shape[0])
    left_i, right_i, x_lerp = _axis(width, x.shape[1])
    x_lerp = x_lerp[None, :, None]
    rows_top, rows_bottom = x[top_i], x[bottom_i]
    top = rows_top[:, left_i] + (rows_top[:, right_i] - rows_top[:, left_i]) * x_lerp
    bottom = rows_bottom[:, left_i] + (rows_bottom[:, right_i] - rows_bottom[:, left_i]) * x_lerp
    return top + (bottom - top) * y_lerp[:, None, None]


def _npz_bytes(probs: np.ndarray, classes: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probs=probs.astype(np.float16), classes=classes.astype(np.int16))
    return buffer.getvalue()


def finish(task: Task) -> Result:
    """Everything per image after the network: merge, upsample, arg-max, CRF, file bytes."""
    from vitpcm.crf import crf_present_classes
    from vitpcm.data.labels import encode_palette_png

    merged = resize_bilinear(label_merge(task.patch_probs, task.labels), task.height, task.width)
    prediction = merged.argmax(axis=-1).astype(np.uint8)
    present = np.flatnonzero(task.labels > 0)
    result = Result(
        task.stem,
        _npz_bytes(merged[..., present], present),
        encode_palette_png(prediction),
        prediction,
    )
    if task.crf_params is not None:
        labels = crf_present_classes(task.image, merged, task.labels, task.crf_params)
        result.crf_labels = labels
        result.crf_png = encode_palette_png(labels.astype(np.uint8))
    return result


def finish_map(
    tasks: Iterable[Task], workers: int = 0, max_in_flight: int | None = None
) -> Iterator[Result]:
    """:func:`finish` over ``tasks`` in a process pool, results in input order.

    Tasks are pulled lazily, at most ``max_in_flight`` (default ``2 * workers``) beyond the
    results already yielded, so a split never sits in memory; the caller's generator (the
    network's forward) runs while the workers are busy.

    Args:
        tasks: The images, e.g. a generator over the network's batches.
        workers: Processes; 0 uses all cores; 1 runs in this process.
        max_in_flight: Bound on tasks submitted but not yet yielded.
    """
    return ordered_map(finish, tasks, resolve_workers(workers), max_in_flight)
