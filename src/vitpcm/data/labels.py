"""Segmentation label maps: the VOC palette, label PNG decoding and value checks.

PASCAL VOC stores ground truth as *palette* PNGs whose pixel **indices** are the class
labels (0-20, 255 = object boundary / ignore); the colours are only for viewing, so a
decoder must never read the RGB values. SBD's ``SegmentationClassAug`` masks are plain
single-channel (``L``) PNGs holding the same values. Anything else (an RGB rendering of a
mask, a JPEG) would silently produce wrong labels, so it is refused.
"""

from __future__ import annotations

import io

import numpy as np

from vitpcm.errors import BadSampleError

__all__ = [
    "IGNORE_LABEL",
    "check_label_values",
    "decode_label_png",
    "encode_palette_png",
    "image_labels_from_mask",
    "voc_palette",
]

IGNORE_LABEL = 255
"""Label value excluded from training targets and from every metric."""


def voc_palette() -> np.ndarray:
    """The standard PASCAL VOC colour map, shape ``(256, 3)`` uint8.

    Colour ``i`` spreads the bits of ``i`` over the channels: bit 0 -> red, bit 1 ->
    green, bit 2 -> blue, placed from the most significant bit downwards, then the next
    three bits one position lower, and so on (so 1 is dark red, 255 is near white).
    """
    index = np.arange(256, dtype=np.int64)
    palette = np.zeros((256, 3), dtype=np.int64)
    for level in range(8):
        bits = index >> (3 * level)
        for channel in range(3):
            palette[:, channel] |= ((bits >> channel) & 1) << (7 - level)
    return palette.astype(np.uint8)


def encode_palette_png(label: np.ndarray) -> bytes:
    """Encode an ``(H, W)`` uint8 label map as a VOC palette PNG.

    The same array always gives the same bytes (fixed palette, default compression,
    no metadata), which keeps generated datasets byte-reproducible.
    """
    from PIL import Image

    array = np.asarray(label)
    if array.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {array.shape}")
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError("label values must fit in uint8 (0..255)")
        array = array.astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(array), mode="P")
    image.putpalette(voc_palette().tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_label_png(data: bytes, name: str) -> np.ndarray:
    """Decode a label PNG to its ``(H, W)`` uint8 label values.

    Args:
        data: The encoded file.
        name: What to call the file in error messages (its path or archive member).

    Returns:
        The palette indices of a ``P`` PNG (VOC ``SegmentationClass``) or the values of an
        ``L`` PNG (SBD ``SegmentationClassAug``).

    Raises:
        BadSampleError: The data is not a decodable PNG, or the PNG is neither a palette
            nor a single-channel image (an RGB mask carries colours, not labels).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image_format = image.format
        image.load()
    except (UnidentifiedImageError, OSError, EOFError, ValueError, SyntaxError) as exc:
        raise BadSampleError(
            name, f"cannot decode the label PNG ({exc}); the file is corrupt or truncated"
        ) from exc
    expected = "a palette (P) or single-channel (L) PNG whose pixel values are class labels"
    if image_format != "PNG":
        raise BadSampleError(name, f"label is a {image_format} file, expected {expected}")
    if image.mode not in ("P", "L"):
        raise BadSampleError(
            name,
            f"label PNG has mode {image.mode}, expected {expected}; "
            "use the original dataset masks, not colour renderings",
        )
    # For a palette image np.asarray gives the indices, never the palette colours.
    return np.asarray(image, dtype=np.uint8).copy()


def check_label_values(label: np.ndarray, num_classes: int, name: str) -> None:
    """Raise unless every value of ``label`` is a class index or the ignore label.

    Args:
        label: Label map of any shape.
        num_classes: K, the number of classes including background.
        name: What to call the sample in the error message.

    Raises:
        BadSampleError: Some values lie outside ``0..K-1`` and are not 255; the message
            lists them.
    """
    values = np.unique(np.asarray(label))
    bad = values[((values < 0) | (values >= num_classes)) & (values != IGNORE_LABEL)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:10])
        more = f" (and {bad.size - 10} more)" if bad.size > 10 else ""
        raise BadSampleError(
            name,
            f"label values {shown}{more} are outside 0..{num_classes - 1} and "
            f"{IGNORE_LABEL} (ignore); check the mask or the dataset's num_classes",
        )


def image_labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-hot image-level labels ``(K,)`` float32 of the classes present in ``mask``.

    Background (0) counts as a class like any other (the patch classifier predicts it);
    the ignore label 255 is skipped. Values ``>= K`` are not counted: validate the mask
    with :func:`check_label_values` first when they could occur.
    """
    counts = np.bincount(np.asarray(mask, dtype=np.uint8).ravel(), minlength=256)
    return (counts[:num_classes] > 0).astype(np.float32)
