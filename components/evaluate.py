"""Scoring steps: baseline pseudo masks on the validation split, and test inference + CRF.

Both read the resolved ``config.yaml`` the training step saved next to the model, so they
always use the sizes and class count the model was trained with; ``overrides`` only tune
evaluation settings (``eval.batch_size``, ``crf.*``). Both read their one split of the
dataset in place, by URI (:mod:`components.artifacts`), instead of receiving a copy of every
shard.
"""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.images import cpu_image


@dsl.component(base_image=cpu_image(), install_kfp_package=False)
def evaluate_model(
    model: Input[Model],
    tfrecords_uri: str,
    metrics: Output[Metrics],
    class_iou: Output[Markdown],
    report: Output[Artifact],
    split: str = "",
    overrides: str = "",
):
    """Score the baseline pseudo masks (label merge) at each label's original resolution.

    Args:
        model: Training output folder (model.keras + config.yaml).
        tfrecords_uri: Converted dataset (a folder, s3:// or the pipeline's minio:// URI);
            only the split scored is read.
        metrics: mIoU, pixel accuracy and mean class accuracy.
        class_iou: Per-class IoU table, shown in the Kubeflow UI.
        report: Folder with metrics.json, the confusion matrix (.npy, .png) and the IoU plot.
        split: Split to score; empty for the config's data.val_split.
        overrides: Space-separated KEY=VALUE overrides of evaluation settings.
    """
    import os
    import shlex

    from components.artifacts import exit_cleanly_after_s3, readable_uri
    from vitpcm.config import load_config
    from vitpcm.eval import run_eval
    from vitpcm.metrics import SCALAR_METRICS
    from vitpcm.run_files import CONFIG_FILE

    data = readable_uri(tfrecords_uri)
    exit_cleanly_after_s3(data)
    cfg = load_config(os.path.join(model.path, CONFIG_FILE), shlex.split(overrides))
    result = run_eval(
        cfg,
        model.path,
        data_uri=data,
        out_dir=report.path,
        split=split or None,
        progress=False,
    )

    for key in SCALAR_METRICS:
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
    tfrecords_uri: str,
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
        tfrecords_uri: Converted dataset (a folder, s3:// or the pipeline's minio:// URI);
            only the split scored is read.
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

    from components.artifacts import exit_cleanly_after_s3, readable_uri
    from vitpcm.config import load_config
    from vitpcm.infer import run_test
    from vitpcm.metrics import REPORTED_METRICS
    from vitpcm.run_files import CONFIG_FILE

    data = readable_uri(tfrecords_uri)
    exit_cleanly_after_s3(data)
    sets = shlex.split(overrides)
    if workers > 0:
        sets.append(f"crf.workers={workers}")
    cfg = load_config(os.path.join(model.path, CONFIG_FILE), sets)
    result = run_test(
        cfg,
        model.path,
        data_uri=data,
        out_dir=pseudo_masks.path,
        crf=crf,
        split=split or None,
        progress=False,
    )

    for key in REPORTED_METRICS:
        if result.get(key) is not None:
            metrics.log_metric(key, float(result[key]))
    metrics.log_metric("num_images", int(result["num_images"]))
    pseudo_masks.metadata.update(
        {"split": result["split"], "num_images": int(result["num_images"]), "crf": bool(crf)}
    )
