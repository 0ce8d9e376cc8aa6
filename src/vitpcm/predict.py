"""``vitpcm predict``: segmentation masks for your own images.

No dataset, no image labels: the model's own image-level class scores decide which classes
are present (``score >= threshold``, background always a candidate), the label merge then
runs on those classes exactly as ``vitpcm test`` does on a split without ground truth, and
the merged probabilities are upsampled to the image's own size and arg-maxed. With ``crf``
the same probabilities go through the dense CRF over the present classes, spread over the
cores. Images are read, predicted and written one at a time (the CRF keeps a bounded number
in flight), so memory does not grow with the number of images.

:func:`load_predictor` and :meth:`Predictor.predict` are the small API the served MLflow
model reuses; :func:`run_predict` is the command.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vitpcm import storage
from vitpcm.errors import ConfigError, DataError, ModelError, VitpcmError
from vitpcm.image_io import (  # noqa: F401  (decode_image, list_inputs: part of this API)
    IMAGE_SUFFIXES,
    OutputNames,
    decode_image,
    list_inputs,
    overlay_jpeg,
)
from vitpcm.run_files import CONFIG_FILE

if TYPE_CHECKING:
    from vitpcm.config import CrfConfig

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
PREDICTIONS_FILE = "predictions.jsonl"
FAILURES_FILE = "failures.jsonl"
MLFLOW_SCHEMES = ("models:/", "runs:/")


def default_class_names(num_classes: int, dataset: str | None = None) -> list[str]:
    """Class names of a model: its dataset's, else those of the first downloadable dataset
    (VOC, COCO) with ``num_classes`` classes, else ``class_<i>``."""
    from vitpcm.data.sources import dataset_names, get_source

    names = dataset_names()
    known = [dataset] if dataset in names else [n for n in names if get_source(n).files]
    for candidate in (get_source(n).class_names for n in known):
        if len(candidate) == num_classes:
            return list(candidate)
    return ["background", *(f"class_{i}" for i in range(1, num_classes))]


# ----------------------------------------------------------------------------- the model


@dataclass
class Predictor:
    """A loaded ViT-PCM model and how to turn one image into a mask.

    Attributes:
        model: the Keras model (outputs ``patch_probs`` and ``class_probs``).
        class_names: name of every class, background first.
        image_size: the side the network sees (a multiple of the patch size).
        threshold: class score at or above which a class counts as present.
        crf_params: the ``crf`` config section (or ``None`` for the paper's values).
        source: where the model came from, for messages.
    """

    model: Any
    class_names: list[str]
    image_size: int
    threshold: float = DEFAULT_THRESHOLD
    crf_params: CrfConfig | None = None
    source: str = ""
    _forward: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import tensorflow as tf

        patch = int(getattr(self.model.get_layer("backbone"), "patch_size", 1))
        if self.image_size < patch or self.image_size % patch:
            raise ConfigError(
                f"--size {self.image_size} is not a positive multiple of the model's patch "
                f"size {patch}; pick e.g. {max(patch, self.image_size // patch * patch)}"
            )
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"--threshold {self.threshold} must be in (0, 1]")
        model = self.model

        @tf.function(reduce_retracing=True)
        def forward(images: Any) -> Any:
            outputs = model(images, training=False)
            return outputs["patch_probs"], outputs["class_probs"]

        self._forward = forward

    @property
    def num_classes(self) -> int:
        """K, background included."""
        return len(self.class_names)

    def present_labels(self, class_probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """Multi-hot (K,) labels: classes scoring ``>= threshold``, background always kept."""
        threshold = self.threshold if threshold is None else float(threshold)
        if not 0.0 < threshold <= 1.0:
            raise DataError(f"threshold {threshold} must be in (0, 1]")
        labels = (np.asarray(class_probs) >= threshold).astype(np.float32)
        labels[0] = 1.0
        return labels

    def probabilities(
        self, image: np.ndarray, threshold: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Merged class probabilities of one image at its own size.

        Args:
            image: (H, W, 3) uint8 RGB.
            threshold: presence score for this image (default: :attr:`threshold`).

        Returns:
            ``(merged (H, W, K) float32, labels (K,) multi-hot, class_probs (K,))``.
        """
        import tensorflow as tf

        from vitpcm.data.augment import resize_image
        from vitpcm.eval import merged_probabilities

        image = _check_image(image)
        height, width = image.shape[:2]
        resized = resize_image(tf.convert_to_tensor(image), self.image_size)[None]
        patch_probs, class_probs = self._forward(resized)
        class_probs = class_probs[0].numpy()
        labels = self.present_labels(class_probs, threshold)
        merged = merged_probabilities(patch_probs[0].numpy(), labels, height, width)
        return merged, labels, class_probs

    def scores_of(self, labels: np.ndarray, class_probs: np.ndarray) -> dict[str, float]:
        """``{class name: score}`` of the present classes, in class order."""
        return {
            self.class_names[i]: round(float(class_probs[i]), 6) for i in np.flatnonzero(labels)
        }

    def predict(
        self, image: np.ndarray, crf: bool = False, threshold: float | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Mask and present-class scores of one image.

        Args:
            image: (H, W, 3) uint8 RGB (grey (H, W) or RGBA are converted).
            crf: refine with the dense CRF over the present classes (in this process).
            threshold: presence score for this image (default: :attr:`threshold`).

        Returns:
            ``(mask, scores)``: (H, W) uint8 class ids at the image's own size, and
            ``{class name: image-level score}`` of the present classes.
        """
        from vitpcm.crf import crf_present_classes

        image = _check_image(image)
        merged, labels, class_probs = self.probabilities(image, threshold)
        if crf:
            mask = crf_present_classes(image, merged, labels, self.crf_params)
        else:
            mask = merged.argmax(axis=-1)
        return mask.astype(np.uint8), self.scores_of(labels, class_probs)


def _check_image(image: Any) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or min(array.shape[:2]) < 1:
        raise DataError(f"an image must be (H, W, 3) RGB, got shape {array.shape}")
    if array.dtype != np.uint8:
        if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 255):
            raise DataError("image values must be 0..255 (uint8 RGB)")
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array[..., :3])


def _find_file(root: str, suffix: str) -> str | None:
    for dirpath, _dirs, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(suffix):
                return os.path.join(dirpath, name)
    return None


def _resolve(model_uri: str, tmp: str) -> tuple[str, Any]:
    """A local ``.keras`` path and the run config (``None`` if unknown) of a MODEL argument."""
    from vitpcm.config import load_config

    cfg = None
    if model_uri.startswith(MLFLOW_SCHEMES):
        import mlflow.artifacts

        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        except Exception as exc:
            raise ModelError(
                f"cannot fetch MLflow model {model_uri} ({type(exc).__name__}: {exc}); check "
                "the name/alias and MLFLOW_TRACKING_URI"
            ) from exc
        keras_path = _find_file(local, ".keras")
        if keras_path is None:
            raise ModelError(f"MLflow model {model_uri} holds no .keras file; log it with vitpcm")
        config_path = _find_file(local, CONFIG_FILE)
        if config_path:
            cfg = load_config(config_path)
        return keras_path, cfg
    folder = posixpath.dirname(model_uri) if model_uri.endswith(".keras") else model_uri
    config_uri = storage.join(folder, CONFIG_FILE) if folder else CONFIG_FILE
    try:
        if storage.exists(config_uri):
            local_config = os.path.join(tmp, CONFIG_FILE)
            with open(local_config, "wb") as handle:
                handle.write(storage.read_bytes(config_uri))
            cfg = load_config(local_config)
    except VitpcmError as exc:
        log.warning("ignoring %s: %s", config_uri, exc)
    return model_uri, cfg


def load_predictor(
    model_uri: str,
    *,
    size: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    class_names: Sequence[str] | None = None,
) -> Predictor:
    """Load a model for prediction.

    Args:
        model_uri: a model folder (``vitpcm train`` or ``weights import-reference`` output),
            a ``.keras`` file (local or ``s3://``), or an MLflow ``models:/NAME@alias`` /
            ``runs:/RUN/PATH`` URI.
        size: side the network sees; default ``data.test_size`` of the model's config, else
            the size its position embedding was stored for.
        threshold: image-level score at or above which a class is present.
        class_names: override the names (default: from the config's dataset / class count).

    Returns:
        A :class:`Predictor`.
    """
    from vitpcm.eval import load_model

    with tempfile.TemporaryDirectory() as tmp:
        keras_path, cfg = _resolve(str(model_uri), tmp)
        model = load_model(keras_path)
    num_classes = int(model.output["class_probs"].shape[-1])
    if class_names is None:
        class_names = default_class_names(num_classes, None if cfg is None else cfg.data.dataset)
    if len(class_names) != num_classes:
        raise ConfigError(
            f"{len(class_names)} class names for a model of {num_classes} classes ({model_uri})"
        )
    if size is None:
        if cfg is not None:
            size = int(cfg.data.test_size)
        else:
            backbone = model.get_layer("backbone")
            size = int(backbone.pos_embed_grid) * int(backbone.patch_size)
    return Predictor(
        model,
        list(class_names),
        int(size),
        threshold=float(threshold),
        crf_params=None if cfg is None else cfg.crf,
        source=str(model_uri),
    )


# ----------------------------------------------------------------------------- command


@dataclass
class PredictSummary:
    """What ``vitpcm predict`` did."""

    out: str
    images: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)

    @property
    def num_failed(self) -> int:
        """Images that could not be read or predicted."""
        return len(self.failed)


def run_predict(
    model_uri: str,
    inputs: Sequence[str],
    out_dir: str,
    *,
    crf: bool = False,
    overlays: bool = False,
    size: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    workers: int = 0,
    progress: bool = True,
) -> PredictSummary:
    """``vitpcm predict``: a VOC-palette mask per image, overlays, ``predictions.jsonl``.

    Writes ``<out>/<stem>.png`` at each image's own size, ``<out>/overlays/<stem>.jpg`` with
    ``overlays``, one JSON line per image in ``<out>/predictions.jsonl`` (``image``, ``mask``,
    ``classes`` = present class names with their scores, ``height``, ``width``, and
    ``overlay``), and ``<out>/failures.jsonl`` naming every image that failed. Bad images are
    logged and skipped; the folder is committed at the end either way.

    Args:
        model_uri: see :func:`load_predictor`.
        inputs: image files, folders or ``s3://`` prefixes.
        out_dir: output folder (local or ``s3://``).
        crf: refine with the dense CRF over the present classes (all cores).
        overlays: also write overlay JPEGs.
        size: network input side (see :func:`load_predictor`).
        threshold: image-level score for a class to count as present.
        workers: CRF processes (0: the config's ``crf.workers``, else all cores).
        progress: show a progress bar.

    Returns:
        The summary; ``failed`` lists ``{"image", "error"}`` of every skipped image.
    """
    from tqdm.auto import tqdm

    from vitpcm.crf import crf_map
    from vitpcm.data.labels import encode_palette_png
    from vitpcm.outputs import claim_output

    paths = list_inputs(inputs)
    given = {f"INPUT {item}": item for item in inputs}
    model_input = None if str(model_uri).startswith(MLFLOW_SCHEMES) else model_uri
    claim_output(out_dir, "predict", inputs={"-m": model_input, **given})
    predictor = load_predictor(model_uri, size=size, threshold=threshold)
    summary = PredictSummary(out=str(out_dir))
    stems = OutputNames()
    with (
        storage.atomic_dir(out_dir, kind="predict") as tmp,
        tempfile.TemporaryDirectory() as local,
    ):
        lines_path = os.path.join(local, PREDICTIONS_FILE)
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
        pending: dict[int, dict[str, Any]] = {}

        with open(lines_path, "w", encoding="utf-8") as lines:

            def finish(key: int, mask: np.ndarray) -> None:
                item = pending.pop(key)
                mask = mask.astype(np.uint8)
                record = {
                    "image": item["image"],
                    "mask": f"{item['stem']}.png",
                    "classes": item["classes"],
                    "height": int(mask.shape[0]),
                    "width": int(mask.shape[1]),
                }
                storage.write_bytes(storage.join(tmp, record["mask"]), encode_palette_png(mask))
                if overlays:
                    record["overlay"] = f"overlays/{item['stem']}.jpg"
                    jpeg = overlay_jpeg(item["pixels"], mask)
                    storage.write_bytes(storage.join(tmp, record["overlay"]), jpeg)
                lines.write(json.dumps(record) + "\n")
                summary.images += 1
                bar.update(1)

            def fail(path: str, exc: BaseException) -> None:
                reason = str(exc)
                log.warning("skipped %s: %s", path, reason)
                summary.failed.append({"image": path, "error": reason})
                bar.update(1)

            def items() -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
                for key, path in enumerate(paths):
                    try:
                        image = decode_image(storage.read_bytes(path), path)
                        merged, labels, class_probs = predictor.probabilities(image)
                    except VitpcmError as exc:
                        fail(path, exc)
                        continue
                    pending[key] = {
                        "image": path,
                        "stem": stems(path),
                        "classes": predictor.scores_of(labels, class_probs),
                        "pixels": image if overlays else None,
                    }
                    yield key, image, merged, labels

            if crf:
                refined = crf_map(items(), predictor.crf_params, workers=workers, progress=False)
                for key, mask in refined:
                    finish(key, mask)
            else:
                for key, _image, merged, _labels in items():
                    finish(key, merged.argmax(axis=-1))
        bar.close()
        with open(lines_path, "rb") as handle:
            storage.write_bytes(storage.join(tmp, PREDICTIONS_FILE), handle.read())
        if summary.failed:
            text = "".join(json.dumps(f) + "\n" for f in summary.failed)
            storage.write_bytes(storage.join(tmp, FAILURES_FILE), text.encode())
    log.info("%d masks in %s, %d images failed", summary.images, out_dir, summary.num_failed)
    return summary
