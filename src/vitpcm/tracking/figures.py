"""Figures for the MLflow run page: sample overlays, a stage's result plots, and the test
step's pseudo masks read back to pick the best and worst images.

Overlays put image, ground truth, BPM and CRF side by side, one row per sample; label maps
are tinted over the image in the VOC palette (background untinted so the shapes stand out;
255 = ignore keeps its palette colour), with a legend of the classes that appear. Rendering
goes through the Agg canvas only: headless, and pyplot's global state is never touched.
"""

from __future__ import annotations

import heapq
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitpcm import storage
from vitpcm.run_files import METRICS_JSON

# (key in a sample, column title), in display order.
OVERLAY_COLUMNS = (("ground_truth", "ground truth"), ("bpm", "BPM"), ("crf", "BPM + CRF"))
BPM_DIR, CRF_DIR = "pseudo_masks", "pseudo_masks_crf"  # the test step's PNG folders
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


def overlay_labels(image: Any, label: Any, alpha: float = 0.55) -> np.ndarray:
    """Tint ``image`` (H, W, 3) with ``label`` (any size: resized with nearest neighbour,
    labels must not blend) in the VOC palette; returns uint8."""
    from PIL import Image

    from vitpcm.data.labels import voc_palette

    rgb = _as_rgb(image)
    fitted = np.asarray(label)
    if fitted.ndim != 2:
        raise ValueError(f"label map must be (H, W), got shape {fitted.shape}")
    fitted = fitted.astype(np.uint8)
    if fitted.shape != rgb.shape[:2]:
        size = (rgb.shape[1], rgb.shape[0])
        fitted = np.asarray(Image.fromarray(fitted).resize(size, Image.Resampling.NEAREST))
    out = rgb.astype(np.float64)
    tinted = fitted != 0
    out[tinted] = (1.0 - alpha) * out[tinted] + alpha * voc_palette()[fitted][tinted]
    return out.round().astype(np.uint8)


def _save(fig: Any, path: str | os.PathLike[str], **options: Any) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, **options)
    storage.write_bytes(path, buffer.getvalue())


def plot_sample_overlays(
    samples: Sequence[Mapping[str, Any]],
    class_names: Sequence[str] | None,
    path: str | os.PathLike[str],
    *,
    alpha: float = 0.55,
    title: str | None = None,
) -> None:
    """Save a PNG grid at ``path`` (local or ``s3://``): one row per sample, columns image,
    ground truth, BPM, CRF; ``class_names`` (or indices) in the legend.

    ``samples`` are dicts with ``image`` ((H, W, 3) uint8, or float in [0, 255]), any of
    ``ground_truth``, ``bpm``, ``crf`` ((H, W) label maps, any size) and ``name``; a column
    is drawn when a sample has it (missing cells say n/a). Raises ValueError for no samples
    or a wrong shape.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from vitpcm.data.labels import voc_palette

    if not samples:
        raise ValueError("plot_sample_overlays needs at least one sample")
    columns = [(k, t) for k, t in OVERLAY_COLUMNS if any(s.get(k) is not None for s in samples)]
    height = 2.6 * len(samples) + _LEGEND_IN
    fig = Figure(figsize=(2.6 * (1 + len(columns)), height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(samples), 1 + len(columns), squeeze=False)
    present: set[int] = set()
    for row, sample in enumerate(samples):
        image = _as_rgb(sample["image"])
        axes[row][0].imshow(image)
        axes[row][0].set_ylabel(str(sample.get("name", f"sample {row + 1}")), fontsize=8)
        for col, (key, _title) in enumerate(columns, start=1):
            label = sample.get(key)
            if label is None:
                axes[row][col].text(
                    0.5, 0.5, "n/a", ha="center", transform=axes[row][col].transAxes
                )
                continue
            present.update(int(v) for v in np.unique(np.asarray(label)))
            axes[row][col].imshow(overlay_labels(image, label, alpha))
    for col, column_title in enumerate(["image", *(t for _k, t in columns)]):
        axes[0][col].set_title(column_title, fontsize=10)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    names = list(class_names or [])
    handles = [
        Patch(
            facecolor=voc_palette()[value] / 255.0,
            edgecolor="black",
            label="ignore" if value == 255 else str(names[value] if value < len(names) else value),
        )
        for value in sorted(present - {0})  # background is left untinted
    ]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8,
                   frameon=False)  # fmt: skip
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, _LEGEND_IN / height if handles else 0, 1, 1))
    _save(fig, path, bbox_inches="tight")


def plot_class_iou_before_after_crf(
    bpm: Sequence[float | None],
    crf: Sequence[float | None],
    class_names: Sequence[str] | None,
    path: str | os.PathLike[str],
    title: str = "Per-class IoU before and after the CRF",
) -> None:
    """Save a bar chart of each class's IoU before (BPM) and after the CRF side by side,
    both mIoUs in the legend; undefined IoUs (``None``/NaN) leave empty slots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    before = np.array([np.nan if v is None else float(v) for v in bpm], dtype=np.float64)
    after = np.array([np.nan if v is None else float(v) for v in crf], dtype=np.float64)
    if before.shape != after.shape:
        raise ValueError(f"{before.size} IoUs before the CRF but {after.size} after")
    k = before.size
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
    names = [str(n) for n in class_names] if class_names else [str(i) for i in range(k)]
    ax.set_xticklabels(names, rotation=45 if k > 8 else 0, ha="right" if k > 8 else "center")
    ax.set(ylim=(0, 1), ylabel="IoU", title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


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
    """Write a stage's result files into a new local ``folder``; returns their names:
    ``confusion_matrix.png`` / ``confusion_matrix_crf.png`` (before / after the CRF),
    ``class_iou_before_after_crf.png`` (with CRF results) or ``class_iou.png``,
    ``overlays_best.png`` / ``overlays_worst.png`` / ``sample_overlays.png`` and
    ``metrics.json``, for what is given. Titles name the stage and the split."""
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
        title = f"Per-class IoU before and after the CRF ({where})"
        path = out / "class_iou_before_after_crf.png"
        before, after = metrics["class_iou"], metrics["class_iou_crf"]
        plot_class_iou_before_after_crf(before, after, class_names, path, title)
    elif metrics.get("class_iou"):
        title = f"Per-class IoU, BPM ({where})"
        plot_class_iou(metrics["class_iou"], class_names, out / "class_iou.png", title=title)
    for chosen, file, what in (
        (best, "overlays_best.png", "highest"),
        (worst, "overlays_worst.png", "lowest"),
        (samples, "sample_overlays.png", None),
    ):
        if chosen:
            ranked = f"The {len(chosen)} images with the {what} BPM IoU" if what else "Samples"
            plot_sample_overlays(chosen, class_names, out / file, title=f"{ranked} ({where})")
    (out / METRICS_JSON).write_text(json.dumps(json_safe(metrics), indent=2) + "\n")
    return sorted(p.name for p in out.iterdir())


@dataclass
class PseudoMaskScores:
    """The test step's pseudo masks scored: K x K confusion counts before and after the CRF
    (``None``: no CRF masks), overlay samples of the highest and lowest per-image BPM mIoU
    (best first, worst first) and ``(name, BPM mIoU)`` of every image in file order."""

    confusion_bpm: np.ndarray
    confusion_crf: np.ndarray | None
    best: list[dict[str, Any]]
    worst: list[dict[str, Any]]
    per_image: list[tuple[str, float]]


def _image_miou(matrix: np.ndarray) -> float:
    """Mean IoU over the classes in the ground truth or the prediction."""
    inter = np.diag(matrix).astype(np.float64)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - inter
    return float((inter[union > 0] / union[union > 0]).mean()) if (union > 0).any() else 1.0


def score_pseudo_masks(
    data_dir: str | os.PathLike[str],
    split: str,
    test_dir: str | os.PathLike[str],
    num_classes: int,
    count: int = 4,
) -> PseudoMaskScores | None:
    """Score the PNGs of the test step's output ``test_dir`` (``pseudo_masks/``,
    ``pseudo_masks_crf/``) against the ground truth of ``split`` in the TFRecords of
    ``data_dir``, keeping the ``count`` best and worst images; None when the split has no
    masks or no pseudo mask was found."""
    import tensorflow as tf

    from vitpcm.data import tfrecord
    from vitpcm.data.labels import decode_label_png
    from vitpcm.data.reader import read_split_info
    from vitpcm.metrics import ConfusionMatrix

    test = Path(test_dir)
    total = {BPM_DIR: ConfusionMatrix(num_classes), CRF_DIR: ConfusionMatrix(num_classes)}
    # Heaps of (key, -order, sample): the best keep the highest mIoU, the worst the lowest.
    best: list[Any] = []
    worst: list[Any] = []
    per_image: list[tuple[str, float]] = []
    files = list(read_split_info(str(data_dir), split).files)
    for order, serialized in enumerate(tf.data.TFRecordDataset(files)):
        example = tfrecord.decode_example(serialized.numpy())
        if tfrecord.LABEL_ENCODED not in example:
            return None
        name = example[tfrecord.IMAGE_FILENAME].decode("utf-8")
        stem = os.path.splitext(os.path.basename(name))[0]
        gt = decode_label_png(example[tfrecord.LABEL_ENCODED], name)
        sample: dict[str, Any] = {"name": stem, "ground_truth": gt}
        for folder, key in ((BPM_DIR, "bpm"), (CRF_DIR, "crf")):
            png = test / folder / f"{stem}.png"
            if not png.is_file():
                break  # no BPM mask: the image is not scored
            sample[key] = decode_label_png(png.read_bytes(), str(png))
            total[folder].update(gt, sample[key])
        if "bpm" not in sample:
            continue
        score = _image_miou(ConfusionMatrix(num_classes).update(gt, sample["bpm"]).matrix)
        sample.update(miou=score, encoded=example[tfrecord.IMAGE_ENCODED])
        per_image.append((stem, score))
        for heap, key in ((best, score), (worst, -score)):
            entry = (key, -order, sample)
            if len(heap) < count:
                heapq.heappush(heap, entry)
            elif entry[:2] > heap[0][:2]:
                heapq.heapreplace(heap, entry)
    if not per_image:
        return None
    crf = total[CRF_DIR].matrix
    return PseudoMaskScores(
        total[BPM_DIR].matrix,
        crf if crf.any() else None,
        [_with_image(e[2]) for e in sorted(best, key=lambda e: e[:2], reverse=True)],
        [_with_image(e[2]) for e in sorted(worst, key=lambda e: e[:2], reverse=True)],
        per_image,
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
    return chosen + [Path(CRF_DIR) / n for n in names if (test / CRF_DIR / n).is_file()]
