"""Dense CRF refinement of the baseline pseudo masks (pydensecrf), streamed over a split.

The paper refines the merged class probabilities with a fully connected CRF (Krähenbühl
and Koltun, 2011): unary ``-log p`` from the probabilities, a Gaussian smoothness kernel
(sxy 1, compat 3) and a bilateral appearance kernel (sxy 67, srgb 3, compat 4), 10
mean-field iterations.

Two choices here keep it fast without changing the answer:

* Only the classes present in the image (image label 1) enter the CRF. Merged
  probabilities are exactly zero elsewhere, so those channels only add cost: the CRF is
  linear in the number of labels and VOC images have 1-3 of 21 classes.
* :func:`crf_map` streams ``(key, image, probs, labels)`` items through a process pool
  with a bounded number in flight, so a split never sits in memory at once (the reference
  code loaded the whole split before starting).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from vitpcm.config import CrfConfig
from vitpcm.parallel import ordered_map, resolve_workers

# Probabilities are clipped to this floor before -log: exact zeros would give infinite
# unaries, and the floor keeps an absent-class channel irrelevant but finite.
PROB_FLOOR = 1e-8


def crf_refine(image: np.ndarray, probs: np.ndarray, params: CrfConfig | None = None) -> np.ndarray:
    """Refine class probabilities with a dense CRF.

    Args:
        image: (H, W, 3) uint8 RGB image the probabilities belong to.
        probs: (H, W, C) class probabilities (float32, any C >= 1), at the image's size.
        params: the ``crf`` config section; ``None`` for the paper's values.

    Returns:
        (H, W) int32 labels in ``0..C-1`` (channel indices of ``probs``).

    Raises:
        ValueError: shapes do not fit together.
    """
    import pydensecrf.densecrf as dcrf

    p = params or CrfConfig()
    image = np.asarray(image)
    probs = np.asarray(probs)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    if probs.ndim != 3 or probs.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"probabilities shape {probs.shape} does not match image shape {image.shape}; "
            "upsample the probabilities to the image size first"
        )
    height, width, channels = probs.shape
    if channels == 1:
        return np.zeros((height, width), dtype=np.int32)
    # pydensecrf wants class-major, C-contiguous float32 unaries and a C-contiguous uint8
    # image; anything else is silently misread.
    unary = np.clip(probs.astype(np.float32, copy=False), PROB_FLOOR, 1.0)
    unary = np.ascontiguousarray(-np.log(unary).transpose(2, 0, 1).reshape(channels, -1))
    rgb = np.ascontiguousarray(image, dtype=np.uint8)
    crf = dcrf.DenseCRF2D(width, height, channels)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=p.gaussian_sxy, compat=p.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=p.bilateral_sxy, srgb=p.bilateral_srgb, rgbim=rgb, compat=p.bilateral_compat
    )
    q = np.asarray(crf.inference(int(p.iterations)), dtype=np.float32)
    return q.reshape(channels, height, width).argmax(axis=0).astype(np.int32)


def present_channels(image_labels: np.ndarray | None, num_classes: int) -> np.ndarray:
    """Indices of the classes whose image label is 1 (all classes when none is).

    With no class marked present there is no label information to restrict to, so every
    channel is kept rather than failing the whole split on one sample.
    """
    if image_labels is None:
        return np.arange(num_classes)
    labels = np.asarray(image_labels).reshape(-1)
    if labels.size != num_classes:
        raise ValueError(f"{labels.size} image labels for {num_classes} probability channels")
    present = np.flatnonzero(labels > 0)
    return present if present.size else np.arange(num_classes)


def crf_present_classes(
    image: np.ndarray,
    probs_full: np.ndarray,
    image_labels: np.ndarray | None,
    params: CrfConfig | None = None,
) -> np.ndarray:
    """Dense CRF over the present classes only, labels mapped back to class ids.

    Args:
        image: (H, W, 3) uint8 image.
        probs_full: (H, W, K) merged class probabilities over all K classes.
        image_labels: (K,) multi-hot image labels; channels with label 1 enter the CRF
            (background only when its label is 1, as in the label merge). ``None`` uses all.
        params: CRF parameters (see :func:`crf_refine`).

    Returns:
        (H, W) int32 labels in ``0..K-1``.
    """
    probs_full = np.asarray(probs_full)
    if probs_full.ndim != 3:
        raise ValueError(f"probabilities must be (H, W, K), got shape {probs_full.shape}")
    keep = present_channels(image_labels, probs_full.shape[2])
    return _refine_subset(image, probs_full[..., keep], keep, params)


def _refine_subset(
    image: np.ndarray, probs: np.ndarray, class_ids: np.ndarray, params: CrfConfig | None
) -> np.ndarray:
    if class_ids.size == 1:
        # A single label leaves the CRF nothing to decide.
        return np.full(probs.shape[:2], class_ids[0], dtype=np.int32)
    local = crf_refine(image, probs, params)
    return class_ids.astype(np.int32)[local]


def _task(item: tuple[Any, np.ndarray, np.ndarray, np.ndarray, CrfConfig]) -> tuple[Any, Any]:
    key, image, probs, class_ids, params = item
    return key, _refine_subset(image, probs, class_ids, params)


def _prepare(
    items: Iterable[tuple[Any, np.ndarray, np.ndarray, np.ndarray | None]], params: CrfConfig
) -> Iterator[tuple[Any, np.ndarray, np.ndarray, np.ndarray, CrfConfig]]:
    # Slicing to the present channels in the parent means only those cross the process
    # boundary (2-3 channels instead of 21 or 81).
    for key, image, probs, labels in items:
        probs = np.asarray(probs)
        if probs.ndim != 3:
            raise ValueError(f"{key}: probabilities must be (H, W, K), got shape {probs.shape}")
        keep = present_channels(labels, probs.shape[2])
        yield key, np.asarray(image), np.ascontiguousarray(probs[..., keep]), keep, params


def crf_map(
    items: Iterable[tuple[Any, np.ndarray, np.ndarray, np.ndarray | None]],
    params: CrfConfig | None = None,
    workers: int = 0,
    progress: bool = True,
    total: int | None = None,
    max_in_flight: int | None = None,
) -> Iterator[tuple[Any, np.ndarray]]:
    """Stream ``(key, image, probs, labels)`` items through the present-classes CRF.

    Items are pulled lazily: at most ``max_in_flight`` (default ``2 * workers``) are taken
    from ``items`` beyond those already yielded, so a generator reading one sample at a time
    keeps memory bounded whatever the split size. Results come back in input order
    (:func:`vitpcm.parallel.ordered_map`).

    Args:
        items: iterable of ``(key, image (H,W,3) uint8, probs (H,W,K), labels (K,) or None)``.
        params: the ``crf`` config section (``None``: the paper's values); its ``workers``
            field is used when ``workers`` is 0.
        workers: processes to use; 0 takes ``params.workers`` or else all cores; 1 runs in
            this process.
        progress: show a tqdm progress bar.
        total: number of items, for the progress bar (taken from ``len(items)`` if any).
        max_in_flight: bound on items submitted but not yet yielded.

    Yields:
        ``(key, labels)`` with (H, W) int32 labels in ``0..K-1``, in input order.
    """
    crf_params = params or CrfConfig()
    if workers == 0:
        workers = crf_params.workers
    workers = resolve_workers(workers)
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="dense CRF", unit="img")
    tasks = _prepare(items, crf_params)
    try:
        for result in ordered_map(_task, tasks, workers, max_in_flight):
            if bar is not None:
                bar.update(1)
            yield result
    finally:
        if bar is not None:
            bar.close()
