"""Figures for the MLflow run page: sample overlays and a split's result plots.

Sample overlays put image, ground truth, BPM and CRF side by side, one row per sample;
label maps are tinted over the image in the VOC palette (background left untinted so the
object shapes stand out; 255 = ignore/boundary keeps its palette colour), with a legend of
the classes that appear. Rendering goes through the Agg canvas
only, so it works headless and never touches pyplot's global state.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitpcm import storage

# (key in a sample, column title), in display order.
OVERLAY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ground_truth", "ground truth"),
    ("bpm", "BPM"),
    ("crf", "BPM + CRF"),
)
_IGNORE = 255
_LEGEND_IN = 0.45  # figure height (inches) kept free for the legend row


def _as_rgb(image: Any) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"sample image must be (H, W, 3) or (H, W), got shape {array.shape}")
    if array.dtype != np.uint8:  # float images in [0, 255] as the model takes them
        array = np.clip(np.nan_to_num(array.astype(np.float64)), 0, 255).round()
    return array.astype(np.uint8)


def _fit_label(label: Any, shape: tuple[int, int]) -> np.ndarray:
    """The label map at the image's size (nearest neighbour: labels must not blend)."""
    from PIL import Image

    array = np.asarray(label)
    if array.ndim != 2:
        raise ValueError(f"label map must be (H, W), got shape {array.shape}")
    array = array.astype(np.uint8)
    if array.shape != shape:
        resized = Image.fromarray(array).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
        array = np.asarray(resized)
    return array


def overlay_labels(image: Any, label: Any, alpha: float = 0.55) -> np.ndarray:
    """Tint ``image`` (H, W, 3) with ``label`` (H', W') in the VOC palette; returns uint8."""
    from vitpcm.data.labels import voc_palette

    rgb = _as_rgb(image)
    fitted = _fit_label(label, rgb.shape[:2])
    colours = voc_palette()[fitted].astype(np.float64)
    out = rgb.astype(np.float64)
    tinted = fitted != 0
    out[tinted] = (1.0 - alpha) * out[tinted] + alpha * colours[tinted]
    return out.round().astype(np.uint8)


def plot_sample_overlays(
    samples: Sequence[Mapping[str, Any]],
    class_names: Sequence[str] | None,
    path: str | os.PathLike[str],
    *,
    alpha: float = 0.55,
    title: str | None = None,
) -> None:
    """Save a PNG grid: one row per sample, columns image / ground truth / BPM / CRF.

    Args:
        samples: dicts with ``image`` ((H, W, 3) uint8, or float in [0, 255]) and any of
            ``ground_truth``, ``bpm``, ``crf`` ((H, W) integer label maps, any size: they
            are resized to the image with nearest neighbour), plus an optional ``name``.
            A column is drawn when at least one sample has it.
        class_names: K class names for the legend (``None``: class indices).
        path: where to write the PNG (local or ``s3://``).
        alpha: how strongly labels tint the image.
        title: an optional figure title.

    Raises:
        ValueError: no samples, or an image or label map has the wrong shape.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from vitpcm.data.labels import voc_palette

    if not samples:
        raise ValueError("plot_sample_overlays needs at least one sample")
    columns = [(k, t) for k, t in OVERLAY_COLUMNS if any(s.get(k) is not None for s in samples)]
    ncols = 1 + len(columns)
    nrows = len(samples)
    height = 2.6 * nrows + _LEGEND_IN
    fig = Figure(figsize=(2.6 * ncols, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    present: set[int] = set()
    for row, sample in enumerate(samples):
        image = _as_rgb(sample["image"])
        ax = axes[row][0]
        ax.imshow(image)
        ax.set_ylabel(str(sample.get("name", f"sample {row + 1}")), fontsize=8)
        for col, (key, _label) in enumerate(columns, start=1):
            ax = axes[row][col]
            label = sample.get(key)
            if label is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
                continue
            values = np.unique(np.asarray(label))
            present.update(int(v) for v in values)
            ax.imshow(overlay_labels(image, label, alpha))
    for col, column_title in enumerate(["image", *(t for _k, t in columns)]):
        axes[0][col].set_title(column_title, fontsize=10)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    palette = voc_palette() / 255.0
    handles = []
    for value in sorted(present - {0}):  # background is left untinted
        if value == _IGNORE:
            name = "ignore"
        elif class_names is not None and value < len(class_names):
            name = str(class_names[value])
        else:
            name = str(value)
        handles.append(Patch(facecolor=palette[value], edgecolor="black", label=name))
    if handles:
        fig.legend(
            handles=handles,
            loc="lower center",
            ncol=min(len(handles), 7),
            fontsize=8,
            frameon=False,
        )
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, _LEGEND_IN / height if handles else 0, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    storage.write_bytes(path, buffer.getvalue())


def plot_class_iou_before_after_crf(
    bpm: Sequence[float | None],
    crf: Sequence[float | None],
    class_names: Sequence[str] | None,
    path: str | os.PathLike[str],
    title: str = "Per-class IoU before and after the CRF",
) -> None:
    """Save a grouped bar chart: each class's IoU before (BPM) and after the CRF, side by
    side, with both mIoUs in the legend. Undefined IoUs (``None``/NaN) leave empty slots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    before = np.array([np.nan if v is None else float(v) for v in bpm], dtype=np.float64)
    after = np.array([np.nan if v is None else float(v) for v in crf], dtype=np.float64)
    if before.shape != after.shape:
        raise ValueError(f"{before.size} IoUs before the CRF but {after.size} after")
    k = before.size
    names = [str(n) for n in class_names] if class_names else [str(i) for i in range(k)]
    x = np.arange(k)
    fig = Figure(figsize=(min(max(6.0, 0.6 * k + 2.0), 40.0), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for offset, values, label, colour in (
        (-0.2, before, "BPM", "#4c72b0"),
        (0.2, after, "after CRF", "#dd8452"),
    ):
        miou = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        ax.bar(x + offset, np.nan_to_num(values), 0.4, label=f"{label} (mIoU {miou:.3f})",
               color=colour)  # fmt: skip
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45 if k > 8 else 0, ha="right" if k > 8 else "center")
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    storage.write_bytes(path, buffer.getvalue())


def write_split_figures(
    folder: str | os.PathLike[str],
    metrics: Mapping[str, Any],
    split: str,
    *,
    stage: str = "eval",
    confusion_matrix: Any = None,
    confusion_matrix_crf: Any = None,
    class_names: Sequence[str] | None = None,
    samples: Sequence[Mapping[str, Any]] | None = None,
    best: Sequence[Mapping[str, Any]] | None = None,
    worst: Sequence[Mapping[str, Any]] | None = None,
) -> list[str]:
    """Write a stage's result files into a new local ``folder``; returns their names.

    ``confusion_matrix.png`` (BPM, before the CRF) and ``confusion_matrix_crf.png`` (after
    it) when the matrices are given; ``class_iou_before_after_crf.png`` when CRF results are
    in ``metrics``, else ``class_iou.png``; ``overlays_best.png`` / ``overlays_worst.png``
    (the images with the highest and lowest IoU) and ``sample_overlays.png`` when given;
    and ``metrics.json``. Titles name the stage and the split.
    """
    from vitpcm.metrics import json_safe, plot_class_iou, plot_confusion_matrix

    out = Path(folder)
    out.mkdir(parents=True)
    where = f"{stage}, split {split}"
    for matrix, file, what in (
        (confusion_matrix, "confusion_matrix.png", "BPM, before CRF"),
        (confusion_matrix_crf, "confusion_matrix_crf.png", "after CRF"),
    ):
        if matrix is not None:
            title = f"Confusion matrix, {what} ({where}; rows normalised)"
            plot_confusion_matrix(matrix, class_names, out / file, title=title)
    if metrics.get("class_iou") and metrics.get("class_iou_crf"):
        plot_class_iou_before_after_crf(
            metrics["class_iou"],
            metrics["class_iou_crf"],
            class_names,
            out / "class_iou_before_after_crf.png",
            title=f"Per-class IoU before and after the CRF ({where})",
        )
    elif metrics.get("class_iou"):
        title = f"Per-class IoU, BPM ({where})"
        plot_class_iou(metrics["class_iou"], class_names, out / "class_iou.png", title=title)
    for chosen, file, what in (
        (best, "overlays_best.png", "highest"),
        (worst, "overlays_worst.png", "lowest"),
        (samples, "sample_overlays.png", None),
    ):
        if chosen:
            title = (
                f"The {len(chosen)} images with the {what} BPM IoU ({where})"
                if what
                else f"Samples ({where})"
            )
            plot_sample_overlays(chosen, class_names, out / file, title=title)
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2) + "\n")
    return sorted(p.name for p in out.iterdir())
