"""``vitpcm eval``: baseline pseudo masks scored at each label's original resolution.

For every sample of a split the network sees the image at ``data.image_size``; its per-patch
class probabilities are merged with the image labels, upsampled bilinearly to the label's
own size and arg-maxed (METHOD.md, "Label merge"), and a confusion matrix accumulates over
*every* sample (the reference code silently dropped the last partial batch). The same
:func:`evaluate_model` gives the validation mIoU during training.
"""

from __future__ import annotations

import logging
import os
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

from vitpcm import events, outputs, storage
from vitpcm.config import Config
from vitpcm.errors import ConfigError, DataError, ModelError
from vitpcm.metrics import ConfusionMatrix
from vitpcm.run_files import METRICS_JSON, MODEL_FILE

log = logging.getLogger(__name__)

KIND = "eval"


def load_model(uri: str) -> Any:
    """Load a trained ViT-PCM ``.keras`` model from a file/URI or a training output folder."""
    import keras

    import vitpcm.model.vitpcm  # noqa: F401  (registers the custom layers for deserialisation)

    source = str(uri)
    if not source.endswith(".keras"):
        source = storage.join(source, MODEL_FILE)
    try:
        data = storage.read_bytes(source)
    except Exception as exc:
        raise ModelError(
            f"cannot read model {source}: {exc}; pass -m a .keras file or a `vitpcm train` "
            "output folder"
        ) from exc
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        with open(path, "wb") as handle:
            handle.write(data)
        try:
            return keras.models.load_model(path, compile=False)
        except Exception as exc:
            raise ModelError(
                f"{source} is not a loadable ViT-PCM Keras model ({type(exc).__name__}: {exc})"
            ) from exc


def check_model_matches(model: Any, cfg: Config, model_uri: str) -> None:
    """Refuse a model whose classes or patch size disagree with the config."""
    num_classes = int(model.output["class_probs"].shape[-1])
    if num_classes != cfg.data.num_classes:
        raise ConfigError(
            f"model {model_uri} predicts {num_classes} classes but the config says "
            f"data.num_classes={cfg.data.num_classes}; use the config it was trained with"
        )
    backbone = model.get_layer("backbone")
    patch = getattr(backbone, "patch_size", None)
    if patch is not None and int(patch) != cfg.model.patch_size:
        raise ConfigError(
            f"model {model_uri} uses {patch}-px patches but the config says "
            f"model.patch_size={cfg.model.patch_size}; use the config it was trained with"
        )


# model -> its traced inference forward, so validation after every epoch reuses one trace
# instead of tracing anew (and TensorFlow warning of retracing) each time. The function holds
# the model weakly: the cache never keeps a model alive.
_FORWARDS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def inference_forward(model: Any) -> Any:
    """``images -> patch_probs`` of ``model`` in inference mode, traced once per model."""
    import tensorflow as tf

    forward = _FORWARDS.get(model)
    if forward is None:
        held = weakref.ref(model)

        @tf.function(reduce_retracing=True)
        def forward(images: Any) -> Any:
            return held()(images, training=False)["patch_probs"]

        _FORWARDS[model] = forward
    return forward


def predict_batches(model: Any, dataset: Any) -> Iterator[tuple[dict[str, Any], Any]]:
    """Yield ``(batch as NumPy, patch_probs as NumPy)`` for every batch of ``dataset``."""
    forward = inference_forward(model)
    for batch in dataset:
        probs = forward(batch["image"]).numpy()
        yield {k: v.numpy() for k, v in batch.items() if k != "image"}, probs


def merged_probabilities(patch_probs: Any, labels: Any, height: int, width: int) -> Any:
    """Label-merged class probabilities of one image upsampled to (height, width), NumPy."""
    import tensorflow as tf

    from vitpcm.model.label_merge import label_merge

    merged = label_merge(patch_probs[None], labels[None])
    return tf.image.resize(merged, (height, width), method="bilinear")[0].numpy()


def iter_samples(
    batches: Iterator[tuple[dict[str, Any], Any]],
) -> Iterator[tuple[dict[str, Any], Any]]:
    """Unbatch ``predict_batches`` output into per-sample dicts cropped to their true size."""
    for batch, probs in batches:
        for i in range(probs.shape[0]):
            h, w = int(batch["height"][i]), int(batch["width"][i])
            sample = {"height": h, "width": w}
            for key, value in batch.items():
                if key in ("mask",):
                    sample[key] = value[i, :h, :w]
                elif key == "original_image":
                    sample[key] = value[i, :h, :w, :]
                elif key == "filename":
                    sample[key] = value[i].decode("utf-8")
                elif key not in ("height", "width"):
                    sample[key] = value[i]
            yield sample, probs[i]


def evaluate_model(
    model: Any,
    dataset: Any,
    num_classes: int,
    *,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    total: int | None = None,
) -> tuple[dict[str, Any], ConfusionMatrix]:
    """Score the baseline pseudo masks of every sample in an evaluation dataset.

    Returns the metrics dict (``miou``, ``class_iou``, ``pixel_accuracy``, ``mean_accuracy``,
    ``frequency_weighted_iou``, ``num_images``) and the confusion matrix.
    """
    from tqdm.auto import tqdm

    names = list(class_names) if class_names and len(class_names) == num_classes else None
    matrix = ConfusionMatrix(num_classes, class_names=names)
    count = 0
    bar = tqdm(total=total, desc="evaluate", unit="img", disable=not progress)
    for sample, probs in iter_samples(predict_batches(model, dataset)):
        merged = merged_probabilities(probs, sample["labels"], sample["height"], sample["width"])
        matrix.update(sample["mask"], merged.argmax(axis=-1))
        count += 1
        bar.update(1)
    bar.close()
    if count == 0:
        raise DataError("the evaluation split is empty: nothing to score")
    metrics = matrix.compute()
    metrics["num_images"] = count
    return metrics, matrix


def run_eval(
    cfg: Config,
    model_uri: str,
    *,
    data_uri: str | None = None,
    out_dir: str | None = None,
    split: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``vitpcm eval``: metrics of the baseline pseudo masks, written to ``<out>/metrics.json``.

    Also writes ``confusion_matrix.npy`` and the confusion-matrix and per-class IoU plots.
    """
    import numpy as np

    from vitpcm.data.reader import dataset_from_config, read_split_info
    from vitpcm.metrics import plot_class_iou, plot_confusion_matrix, write_metrics_json

    data_uri = data_uri or cfg.data.uri
    if not data_uri:
        raise ConfigError("no evaluation data: pass --data URI or set data.uri in the config")
    split = split or cfg.data.val_split
    out_dir = out_dir or "eval-out"
    outputs.claim_output(out_dir, KIND, inputs={"-m": model_uri, "--data": data_uri})
    info = read_split_info(data_uri, split, cfg.data.num_classes)
    model = load_model(model_uri)
    check_model_matches(model, cfg, model_uri)
    dataset = dataset_from_config(cfg, split, training=False, uri=data_uri, with_label=True)
    metrics, matrix = evaluate_model(
        model,
        dataset,
        cfg.data.num_classes,
        class_names=info.class_names,
        progress=progress,
        total=info.num_examples,
    )
    metrics["split"] = split
    with storage.atomic_dir(out_dir, kind=KIND) as tmp:
        with tempfile.TemporaryDirectory() as local:
            np.save(os.path.join(local, "confusion_matrix.npy"), matrix.matrix)
            plot_confusion_matrix(
                matrix.matrix, info.class_names, os.path.join(local, "confusion_matrix.png")
            )
            plot_class_iou(
                metrics["class_iou"], info.class_names, os.path.join(local, "class_iou.png")
            )
            for name in sorted(os.listdir(local)):
                with open(os.path.join(local, name), "rb") as handle:
                    storage.write_bytes(storage.join(tmp, name), handle.read())
        write_metrics_json(storage.join(tmp, METRICS_JSON), metrics)
    log.info(
        "%s mIoU %.4f on %d images -> %s", split, metrics["miou"], metrics["num_images"], out_dir
    )
    events.emit("score", split=split, miou=metrics["miou"], images=metrics["num_images"])
    return metrics
