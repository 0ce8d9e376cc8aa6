"""Images in and out for ``vitpcm predict``: listing inputs, decoding, overlays, names.

INPUT arguments are image files, folders (walked recursively) or ``s3://`` prefixes; a
JPEG/PNG is decoded exactly as the TFRecord reader decodes it (``tf.io.decode_image``), so
``vitpcm predict`` and ``vitpcm test`` see the same pixels.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence

import numpy as np

from vitpcm import storage
from vitpcm.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
OVERLAY_ALPHA = 0.5


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _walk(root: str) -> list[str]:
    """Every file under a folder or ``s3://`` prefix, sorted."""
    return sorted(storage.join(root, *rel.split("/")) for rel in storage.list_files(root))


def list_inputs(inputs: Sequence[str]) -> list[str]:
    """Image paths/URIs of the INPUT arguments: files, folders (recursive) or ``s3://`` prefixes.

    Raises:
        DataError: an input does not exist, or none of them holds a JPEG/PNG.
    """
    images: list[str] = []
    for item in inputs:
        text = storage.local_path(str(item))
        if storage.is_s3(text):
            if _is_image(text) and storage.exists(text):
                images.append(text)
                continue
            found = [p for p in _walk(text.rstrip("/")) if _is_image(p)]
        elif os.path.isfile(text):
            images.append(text)
            continue
        elif os.path.isdir(text):
            found = [p for p in _walk(text) if _is_image(p)]
        else:
            raise DataError(f"input {item} does not exist; pass image files, folders or s3://")
        if not found:
            raise DataError(f"input {item} holds no .jpg/.jpeg/.png images")
        images.extend(found)
    if not images:
        raise DataError("no input images given")
    return images


def decode_image(data: bytes, name: str) -> np.ndarray:
    """JPEG/PNG bytes -> (H, W, 3) uint8 RGB, decoded as the TFRecord reader decodes.

    Raises:
        DataError: the bytes are not a decodable image.
    """
    import tensorflow as tf

    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    except (tf.errors.InvalidArgumentError, ValueError) as exc:
        reason = str(getattr(exc, "message", exc)).strip().splitlines()[0]
        raise DataError(f"{name} is not a readable JPEG/PNG ({reason})") from exc
    if image.ndim != 3 or min(image.shape[:2]) < 1:
        raise DataError(f"{name} decodes to an empty image")
    return image


def overlay_jpeg(image: np.ndarray, mask: np.ndarray) -> bytes:
    """The image blended with the VOC colours of its mask (background left as is), JPEG."""
    import tensorflow as tf

    from vitpcm.data.labels import voc_palette

    colours = voc_palette()[mask].astype(np.float32)
    blend = image.astype(np.float32)
    foreground = mask > 0
    blend[foreground] = (1 - OVERLAY_ALPHA) * blend[foreground] + OVERLAY_ALPHA * colours[
        foreground
    ]
    return tf.io.encode_jpeg(np.clip(blend, 0, 255).astype(np.uint8), quality=90).numpy()


class OutputNames:
    """Unique output names: ``cat``, then ``cat-2``, ``cat-3`` for same-named inputs."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def __call__(self, path: str) -> str:
        stem = os.path.splitext(posixpath.basename(path.replace(os.sep, "/")))[0] or "image"
        count = self.seen.get(stem, 0) + 1
        self.seen[stem] = count
        return stem if count == 1 else f"{stem}-{count}"
