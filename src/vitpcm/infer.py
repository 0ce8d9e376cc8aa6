"""``vitpcm test``: inference at the test size, pseudo masks, and the dense CRF.

For each image of the split (METHOD.md, "Evaluation and inference"): the network runs at
``data.test_size`` (960 px for VOC: a 60 x 60 grid through the interpolated position
embedding), the class maps are merged with the image labels and upsampled to the image's
own size; the probability maps of the present classes go to ``probs/<id>.npz`` and the
arg-max to ``pseudo_masks/<id>.png`` (VOC palette). With ``--crf`` the same probabilities go
through the dense CRF over the present classes only into ``pseudo_masks_crf/<id>.png``. The
PNG folders are the pseudo-mask dataset a second-stage segmenter trains on. Everything per
image after the network (merge, upsampling, arg-max, CRF, PNG/npz encoding) runs in worker
processes (:mod:`vitpcm.pseudo_masks`, ``crf.workers``: 0 = all cores), streamed and
overlapped with the next batch's forward (memory does not grow with the split).

Splits without ground truth (VOC ``test``) use the network's own image-level predictions
(``class_probs >= 0.5``, background always kept) as labels, and report no mIoU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

from vitpcm import events, outputs, storage
from vitpcm.config import Config
from vitpcm.errors import ConfigError
from vitpcm.metrics import SCALAR_METRICS, ConfusionMatrix
from vitpcm.pseudo_masks import Task, finish_map
from vitpcm.run_files import METRICS_JSON

log = logging.getLogger(__name__)

PREDICTED_LABEL_THRESHOLD = 0.5
KIND = "test"


def _stem(filename: str) -> str:
    return os.path.splitext(os.path.basename(filename))[0]


def run_test(
    cfg: Config,
    model_uri: str,
    *,
    data_uri: str | None = None,
    out_dir: str | None = None,
    crf: bool = False,
    split: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run test inference (and optionally the CRF); returns and writes ``metrics.json``."""
    from tqdm.auto import tqdm

    from vitpcm.data.reader import dataset_from_config, read_split_info, split_has_masks
    from vitpcm.eval import check_model_matches, iter_samples, load_model, predict_batches
    from vitpcm.metrics import write_metrics_json

    data_uri = data_uri or cfg.data.uri
    if not data_uri:
        raise ConfigError("no test data: pass --data URI or set data.uri in the config")
    split = split or cfg.data.test_split
    out_dir = out_dir or "test-out"
    outputs.claim_output(out_dir, KIND, inputs={"-m": model_uri, "--data": data_uri})
    info = read_split_info(data_uri, split, cfg.data.num_classes)
    has_masks = split_has_masks(info)
    model = load_model(model_uri)
    check_model_matches(model, cfg, model_uri)
    dataset = dataset_from_config(
        cfg,
        split,
        training=False,
        uri=data_uri,
        image_size=cfg.data.test_size,
        with_label=has_masks,
        include_original=crf,
    )
    k = cfg.data.num_classes
    names = list(info.class_names) if len(info.class_names) == k else None
    bpm_matrix = ConfusionMatrix(k, class_names=names)
    crf_matrix = ConfusionMatrix(k, class_names=names)
    masks: dict[str, Any] = {}
    counts = {"images": 0}
    crf_params = cfg.crf if crf else None
    workers = cfg.crf.workers

    with storage.atomic_dir(out_dir, kind=KIND) as tmp:
        bar = tqdm(total=info.num_examples, desc="inference", unit="img", disable=not progress)

        def tasks() -> Iterator[Task]:
            # The forward of the next batch runs while the workers finish earlier images.
            for sample, patch_probs in iter_samples(predict_batches(model, dataset)):
                stem = _stem(sample["filename"])
                labels = sample["labels"] if has_masks else _predicted_labels(patch_probs)
                if has_masks:
                    masks[stem] = sample["mask"]
                yield Task(
                    stem,
                    patch_probs,
                    labels,
                    sample["height"],
                    sample["width"],
                    image=sample["original_image"] if crf else None,
                    crf_params=crf_params,
                )

        for result in finish_map(tasks(), workers=workers):
            storage.write_bytes(storage.join(tmp, "probs", f"{result.stem}.npz"), result.npz)
            storage.write_bytes(storage.join(tmp, "pseudo_masks", f"{result.stem}.png"), result.png)
            if result.crf_png is not None:
                storage.write_bytes(
                    storage.join(tmp, "pseudo_masks_crf", f"{result.stem}.png"), result.crf_png
                )
            if has_masks:
                mask = masks.pop(result.stem)
                bpm_matrix.update(mask, result.prediction)
                if crf:
                    crf_matrix.update(mask, result.crf_labels)
            counts["images"] += 1
            bar.update(1)
        bar.close()

        metrics: dict[str, Any] = {"split": split, "num_images": counts["images"], "crf": crf}
        if has_masks:
            metrics.update(bpm_matrix.compute())
            if crf:
                crf_metrics = crf_matrix.compute()
                for name in (*SCALAR_METRICS, "class_iou"):
                    metrics[f"{name}_crf"] = crf_metrics[name]
        write_metrics_json(storage.join(tmp, METRICS_JSON), metrics)

    if has_masks:
        after = f", after CRF {metrics['miou_crf']:.4f}" if crf else ""
        log.info(
            "%s: BPM mIoU %.4f%s on %d images", split, metrics["miou"], after, counts["images"]
        )
        scores = {"split": split, "miou": metrics["miou"], "images": counts["images"]}
        if crf:
            events.emit("crf_score", miou_crf=metrics["miou_crf"], **scores)
        else:
            events.emit("score", **scores)
    return metrics


def _predicted_labels(patch_probs: Any) -> Any:
    """Image labels predicted by the network itself (max-pooled), for splits without masks."""
    import numpy as np

    pooled = patch_probs.reshape(-1, patch_probs.shape[-1]).max(axis=0)
    labels = (pooled >= PREDICTED_LABEL_THRESHOLD).astype(np.float32)
    labels[0] = 1.0  # background is always a candidate
    return labels
