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


def write_split_figures(
    folder: str | os.PathLike[str],
    metrics: Mapping[str, Any],
    split: str,
    *,
    confusion_matrix: Any = None,
    class_names: Sequence[str] | None = None,
    samples: Sequence[Mapping[str, Any]] | None = None,
) -> list[str]:
    """Write a split's result files into a new local ``folder``; returns their names.

    ``confusion_matrix.png`` (when the matrix is given), ``class_iou.png`` (BPM) and
    ``class_iou_crf.png`` (when CRF results are in ``metrics``), ``sample_overlays.png``
    (when samples are given) and ``metrics.json``.
    """
    from vitpcm.metrics import json_safe, plot_class_iou, plot_confusion_matrix

    out = Path(folder)
    out.mkdir(parents=True)
    if confusion_matrix is not None:
        plot_confusion_matrix(
            confusion_matrix,
            class_names,
            out / "confusion_matrix.png",
            title=f"Confusion matrix, {split} (rows normalised)",
        )
    for key, stage, file in (
        ("class_iou", "BPM", "class_iou.png"),
        ("class_iou_crf", "after CRF", "class_iou_crf.png"),
    ):
        if metrics.get(key):
            title = f"Per-class IoU, {split} ({stage})"
            plot_class_iou(metrics[key], class_names, out / file, title=title)
    if samples:
        plot_sample_overlays(
            samples, class_names, out / "sample_overlays.png", title=f"Samples, {split}"
        )
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2) + "\n")
    return sorted(p.name for p in out.iterdir())
