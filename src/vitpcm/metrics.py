"""Segmentation metrics from a confusion matrix, the ``metrics.json`` writer and two plots.

The paper reports mean intersection-over-union (mIoU) over the K classes of the label
maps, with label 255 (VOC object boundaries) ignored, at the label's original resolution.
Everything here derives from one K x K confusion matrix (rows = ground truth, columns =
prediction), so per-image matrices from parallel workers can simply be added up.

mIoU convention (the standard VOC one): the IoU of a class is ``TP / (TP + FP + FN)``; a
class that never occurs in the ground truth *nor* in the prediction has an undefined IoU
(0 / 0) and is left out of the mean, so mIoU is the mean over the classes that appear in
the ground truth or in the prediction. A class predicted but absent from the ground truth
counts with IoU 0. Undefined values are ``None`` in the returned dict and in JSON.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vitpcm import storage

# The scalar metrics of a confusion matrix (metrics_from_matrix), in the order reports show
# them. `vitpcm test --crf` adds each as `<name>_crf`; MLflow and the KFP Metrics artifact
# log these, so a new scalar metric is one entry here and its line in metrics_from_matrix.
SCALAR_METRICS = ("miou", "pixel_accuracy", "mean_accuracy", "frequency_weighted_iou")
# Each with its CRF twin: what a `metrics.json` may report (eval: the first of each pair).
REPORTED_METRICS = tuple(n for base in SCALAR_METRICS for n in (base, f"{base}_crf"))


class ConfusionMatrix:
    """Accumulates a K x K pixel confusion matrix over label maps.

    Args:
        num_classes: K, the number of classes (background included).
        ignore_index: ground-truth value whose pixels are not counted (VOC: 255).
        class_names: optional K names, carried into :meth:`compute`.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = 255,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} names but num_classes is {num_classes}"
            )
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self._matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    @property
    def matrix(self) -> np.ndarray:
        """A copy of the int64 K x K counts; rows are ground truth, columns prediction."""
        return self._matrix.copy()

    @property
    def num_pixels(self) -> int:
        """How many (non-ignored) pixels have been counted."""
        return int(self._matrix.sum())

    def reset(self) -> None:
        """Forget every count."""
        self._matrix[:] = 0

    def update(self, gt: np.ndarray, pred: np.ndarray) -> ConfusionMatrix:
        """Count one ground-truth / prediction pair of label maps.

        Args:
            gt: (H, W) integer ground truth in ``0..K-1`` or ``ignore_index``.
            pred: (H, W) integer prediction in ``0..K-1``, same shape as ``gt``.

        Returns:
            ``self``, so calls can be chained.

        Raises:
            ValueError: the shapes differ, an array is not integer, or a value is outside
                ``0..K-1`` (``ignore_index`` allowed in ``gt`` only).
        """
        gt = np.asarray(gt)
        pred = np.asarray(pred)
        if gt.shape != pred.shape:
            raise ValueError(
                f"ground truth shape {gt.shape} and prediction shape {pred.shape} differ; "
                "resize the prediction to the label's original size before scoring"
            )
        for name, arr in (("ground truth", gt), ("prediction", pred)):
            if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
                raise ValueError(f"{name} must be an integer label map, got dtype {arr.dtype}")
        k = self.num_classes
        gt = gt.ravel()
        pred = pred.ravel()
        if self.ignore_index is not None:
            valid = gt != self.ignore_index
            if not valid.all():
                gt = gt[valid]
                pred = pred[valid]
        if gt.size == 0:
            return self
        _check_range("ground truth", gt, k, self.ignore_index)
        _check_range("prediction", pred, k, None)
        # One bincount over the flat pair index gt*K + pred is the cheapest way to fill the
        # whole matrix; a narrow index dtype halves the memory traffic for VOC-sized K.
        index_dtype = np.uint16 if k * k <= np.iinfo(np.uint16).max else np.int64
        index = gt.astype(index_dtype) * index_dtype(k)
        index += pred.astype(index_dtype)
        counts = np.bincount(index, minlength=k * k)
        self._matrix += counts.reshape(k, k)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts into this one (e.g. from another worker).

        Returns:
            ``self``.

        Raises:
            ValueError: the class counts or ignore labels differ.
        """
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) "
                f"into a {self.num_classes}-class one (ignore {self.ignore_index})"
            )
        self._matrix += other._matrix
        return self

    def compute(self) -> dict[str, Any]:
        """All metrics as a JSON-safe dict (see :func:`metrics_from_matrix`)."""
        return metrics_from_matrix(self._matrix, self.class_names)


def _check_range(name: str, values: np.ndarray, k: int, ignore_index: int | None) -> None:
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= k:
        bad = low if low < 0 else high
        allowed = f"0..{k - 1}" + (f" and {ignore_index}" if ignore_index is not None else "")
        raise ValueError(f"{name} has label value {bad}; expected {allowed}")


def _nullable(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values.tolist()]


def metrics_from_matrix(
    matrix: np.ndarray, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Segmentation metrics of a K x K confusion matrix (rows = ground truth).

    Returns:
        A dict with ``miou`` (mean IoU over the classes present in the ground truth or the
        prediction), ``pixel_accuracy``, ``mean_accuracy`` (mean recall over the classes
        present in the ground truth), ``frequency_weighted_iou``, ``class_iou`` and
        ``class_accuracy`` (lists of K values, ``None`` where undefined), ``num_classes``,
        ``num_pixels`` and, when given, ``class_names``. Scalars are ``None`` when nothing
        has been counted. Every value is a plain Python number, ``None``, or a list of them.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {matrix.shape}")
    k = matrix.shape[0]
    tp = np.diag(matrix).astype(np.float64)
    gt_count = matrix.sum(axis=1).astype(np.float64)
    pred_count = matrix.sum(axis=0).astype(np.float64)
    union = gt_count + pred_count - tp
    total = float(gt_count.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        accuracy = np.where(gt_count > 0, tp / gt_count, np.nan)
    present = union > 0
    in_gt = gt_count > 0
    result: dict[str, Any] = {
        "miou": float(iou[present].mean()) if present.any() else None,
        "pixel_accuracy": float(tp.sum() / total) if total else None,
        "mean_accuracy": float(accuracy[in_gt].mean()) if in_gt.any() else None,
        # Classes in the ground truth always have a defined IoU, so no NaN reaches the sum.
        "frequency_weighted_iou": (
            float((gt_count[in_gt] / total * iou[in_gt]).sum()) if total else None
        ),
        "class_iou": _nullable(iou),
        "class_accuracy": _nullable(accuracy),
        "num_classes": int(k),
        "num_pixels": int(total),
    }
    if class_names is not None:
        if len(class_names) != k:
            raise ValueError(f"{len(class_names)} class names for a {k}-class matrix")
        result["class_names"] = [str(n) for n in class_names]
    return result


def json_safe(value: Any) -> Any:
    """``value`` with numpy types turned into Python ones and NaN/inf into ``None``."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics_json(uri: str | os.PathLike[str], metrics: Mapping[str, Any]) -> None:
    """Write ``metrics`` as strict JSON (no NaN) to a local path or ``s3://`` URI, atomically.

    Raises:
        ValueError: a value cannot be represented in JSON.
        vitpcm.errors.StorageError: the destination cannot be written.
    """
    text = json.dumps(json_safe(metrics), indent=2, allow_nan=False)
    storage.write_bytes(uri, (text + "\n").encode("utf-8"))


def _save_figure(fig: Any, path: str | os.PathLike[str]) -> None:
    # Render through the Agg canvas into memory so the pyplot global state and the
    # interactive backend are never touched, then write atomically (local or s3://).
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    storage.write_bytes(path, buffer.getvalue())


def _names(class_names: Sequence[str] | None, k: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(k)]
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for {k} classes")
    return [str(n) for n in class_names]


def plot_confusion_matrix(
    matrix: np.ndarray,
    class_names: Sequence[str] | None,
    path: str | os.PathLike[str],
    title: str = "Confusion matrix (rows normalised)",
) -> None:
    """Save a row-normalised confusion-matrix heatmap as PNG.

    Each row (ground-truth class) is divided by its pixel count, so the diagonal reads as
    per-class recall; cells are annotated when there are few enough classes to read them.
    """
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix, dtype=np.float64)
    k = matrix.shape[0]
    names = _names(class_names, k)
    rows = matrix.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        normalised = np.where(rows > 0, matrix / rows, 0.0)
    side = min(max(4.0, 0.45 * k + 2.0), 40.0)
    fontsize = 8 if k <= 30 else 5
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels=names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(k), labels=names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                value = normalised[i, j]
                if value >= 0.01:
                    color = "white" if value > 0.5 else "black"
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color=color)
    _save_figure(fig, path)


def plot_class_iou(
    class_iou: Sequence[float | None],
    class_names: Sequence[str] | None,
    path: str | os.PathLike[str],
    title: str = "Per-class IoU",
    sort: bool = False,
) -> None:
    """Save a bar chart of per-class IoU with the mIoU as a dashed line.

    Undefined IoUs (``None``/NaN: class absent from ground truth and prediction) are drawn
    as empty slots and excluded from the mIoU line, matching :func:`metrics_from_matrix`.
    """
    from matplotlib.figure import Figure

    values = np.array([np.nan if v is None else float(v) for v in class_iou], dtype=np.float64)
    k = values.size
    names = _names(class_names, k)
    order = np.arange(k)
    if sort:
        order = np.argsort(np.nan_to_num(-values, nan=np.inf), kind="stable")
    shown = np.nan_to_num(values[order], nan=0.0)
    fig = Figure(figsize=(min(max(6.0, 0.35 * k + 2.0), 40.0), 4.5))
    ax = fig.add_subplot()
    ax.bar(range(k), shown, color="tab:blue")
    defined = ~np.isnan(values)
    if defined.any():
        miou = float(values[defined].mean())
        ax.axhline(miou, color="tab:red", linestyle="--", label=f"mIoU {miou:.3f}")
        ax.legend(loc="upper right")
    ax.set_xticks(
        range(k), labels=[names[i] for i in order], rotation=90, fontsize=8 if k <= 30 else 5
    )
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("IoU")
    ax.set_title(title)
    _save_figure(fig, path)
