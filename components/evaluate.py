"""Scoring steps: baseline pseudo masks on the validation split, and test inference + CRF.

Both read the resolved ``config.yaml`` the training step saved next to the model, so they
always use the sizes and class count the model was trained with; ``overrides`` only tune
evaluation settings (``eval.batch_size``, ``crf.*``).
"""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from pipeline.images import cpu_image


@dsl.component(base_image=cpu_image(), install_kfp_package=False)
def evaluate_model(
    model: Input[Model],
    tfrecords: Input[Dataset],
    metrics: Output[Metrics],
    class_iou: Output[Markdown],
    report: Output[Artifact],
    split: str = "",
    overrides: str = "",
):
    """Score the baseline pseudo masks (label merge) at each label's original resolution.

    Args:
        model: Training output folder (model.keras + config.yaml).
        tfrecords: Converted dataset.
        metrics: mIoU, pixel accuracy and mean class accuracy.
        class_iou: Per-class IoU table, shown in the Kubeflow UI.
        report: Folder with metrics.json, the confusion matrix (.npy, .png) and the IoU plot.
        split: Split to score; empty for the config's data.val_split.
        overrides: Space-separated KEY=VALUE overrides of evaluation settings.
    """
    import os
    import shlex

    from vitpcm.config import load_config
    from vitpcm.eval import run_eval

    cfg = load_config(os.path.join(model.path, "config.yaml"), shlex.split(overrides))
    result = run_eval(
        cfg,
        model.path,
        data_uri=tfrecords.path,
        out_dir=report.path,
        split=split or None,
        progress=False,
    )

    for key in ("miou", "pixel_accuracy", "mean_accuracy"):
        if result.get(key) is not None:
            metrics.log_metric(key, float(result[key]))
    metrics.log_metric("num_images", int(result["num_images"]))
    names = result.get("class_names") or [str(i) for i in range(len(result["class_iou"]))]
    rows = [
        f"| {i} | {name} | {'n/a' if iou is None else f'{iou:.4f}'} |"
        for i, (name, iou) in enumerate(zip(names, result["class_iou"], strict=True))
    ]
    miou = result.get("miou")
    table = [
        f"### Per-class IoU, {result['split']} split ({result['num_images']} images)",
        "",
        "| # | class | IoU |",
        "|---:|---|---:|",
        *rows,
        "",
        f"**mIoU {'n/a' if miou is None else f'{miou:.4f}'}** (n/a: class absent from both "
        "ground truth and prediction)",
        "",
    ]
    with open(class_iou.path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(table))
    report.metadata["split"] = result["split"]


@dsl.component(base_image=cpu_image(), install_kfp_package=False)
def infer_crf(
    model: Input[Model],
    tfrecords: Input[Dataset],
    pseudo_masks: Output[Dataset],
    metrics: Output[Metrics],
    crf: bool = True,
    split: str = "",
    workers: int = 0,
    overrides: str = "",
):
    """Infer pseudo masks at the test size, then refine them with the dense CRF.

    Args:
        model: Training output folder (model.keras + config.yaml).
        tfrecords: Converted dataset.
        pseudo_masks: Folder: pseudo_masks/ (and pseudo_masks_crf/) palette PNGs, probs/
            per-image class probabilities, metrics.json.
        metrics: mIoU before and after the CRF (when the split has masks).
        crf: Also run the dense CRF.
        split: Split to run; empty for the config's data.test_split.
        workers: CRF processes; 0 keeps the config's crf.workers.
        overrides: Space-separated KEY=VALUE overrides of inference/CRF settings.
    """
    import os
    import shlex

    from vitpcm.config import load_config
    from vitpcm.infer import run_test

    sets = shlex.split(overrides)
    if workers > 0:
        sets.append(f"crf.workers={workers}")
    cfg = load_config(os.path.join(model.path, "config.yaml"), sets)
    result = run_test(
        cfg,
        model.path,
        data_uri=tfrecords.path,
        out_dir=pseudo_masks.path,
        crf=crf,
        split=split or None,
        progress=False,
    )

    for key in ("miou", "miou_crf", "pixel_accuracy", "pixel_accuracy_crf"):
        if result.get(key) is not None:
            metrics.log_metric(key, float(result[key]))
    metrics.log_metric("num_images", int(result["num_images"]))
    pseudo_masks.metadata.update(
        {"split": result["split"], "num_images": int(result["num_images"]), "crf": bool(crf)}
    )
