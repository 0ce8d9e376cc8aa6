"""Label PNG parsing: VOC palette indices, SBD single-channel values, refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vitpcm.data.labels import (
    check_label_values,
    decode_label_png,
    encode_palette_png,
    image_labels_from_mask,
    voc_palette,
)
from vitpcm.data.sources.voc12 import VOC_CLASSES
from vitpcm.errors import BadSampleError


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _sample_label() -> np.ndarray:
    label = np.zeros((24, 31), dtype=np.uint8)
    label[:, :21] = np.arange(21, dtype=np.uint8)  # every VOC class in its own column
    label[5:9, 25:30] = 255
    label[20:, 22:] = 15
    return label


def test_voc_classes_order():
    assert len(VOC_CLASSES) == 21
    assert VOC_CLASSES[0] == "background"
    assert VOC_CLASSES[1] == "aeroplane"
    assert VOC_CLASSES[15] == "person"
    assert VOC_CLASSES[20] == "tvmonitor"


def test_voc_palette_known_colours():
    palette = voc_palette()
    assert palette.shape == (256, 3)
    assert palette.dtype == np.uint8
    # Colours published with the VOC devkit.
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]
    assert palette[2].tolist() == [0, 128, 0]
    assert palette[3].tolist() == [128, 128, 0]
    assert palette[8].tolist() == [64, 0, 0]
    assert palette[15].tolist() == [192, 128, 128]
    assert palette[20].tolist() == [0, 64, 128]
    assert palette[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in palette.tolist()}) == 256


def test_palette_round_trip_gives_indices_not_colours():
    label = _sample_label()
    data = encode_palette_png(label)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    assert image.mode == "P"
    # The file shows VOC colours...
    rgb = np.asarray(image.convert("RGB"))
    assert rgb[21, 23].tolist() == [192, 128, 128]
    # ...but decoding returns the indices.
    decoded = decode_label_png(data, "a.png")
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, label)


def test_encode_is_deterministic():
    label = _sample_label()
    assert encode_palette_png(label) == encode_palette_png(label.copy())


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        encode_palette_png(np.zeros((4, 4, 3), dtype=np.uint8))


def test_sbd_single_channel_png_values():
    label = _sample_label()
    data = _png(Image.fromarray(label, mode="L"))
    np.testing.assert_array_equal(decode_label_png(data, "sbd/2008_000002.png"), label)


def test_rgb_png_rejected():
    rgb = voc_palette()[_sample_label()]
    data = _png(Image.fromarray(rgb, mode="RGB"))
    with pytest.raises(BadSampleError) as info:
        decode_label_png(data, "SegmentationClass/x.png")
    message = str(info.value)
    assert "SegmentationClass/x.png" in message
    assert "mode RGB" in message
    assert "palette (P)" in message
    assert info.value.path == "SegmentationClass/x.png"


def test_jpeg_rejected():
    buffer = io.BytesIO()
    Image.fromarray(_sample_label(), mode="L").save(buffer, format="JPEG")
    with pytest.raises(BadSampleError, match="JPEG file, expected a palette"):
        decode_label_png(buffer.getvalue(), "x.jpg")


@pytest.mark.parametrize("cut", [0, 10, -20])
def test_corrupt_png_rejected(cut):
    data = encode_palette_png(_sample_label())
    broken = b"not a png at all" if cut == 0 else data[:cut]
    with pytest.raises(BadSampleError, match="cannot decode the label PNG"):
        decode_label_png(broken, "broken.png")


def test_check_label_values_accepts_classes_and_ignore():
    check_label_values(_sample_label(), 21, "ok.png")


def test_check_label_values_names_offending_values():
    label = _sample_label()
    label[0, 0] = 21
    label[1, 1] = 254
    with pytest.raises(BadSampleError) as info:
        check_label_values(label, 21, "bad.png")
    message = str(info.value)
    assert "bad.png" in message
    assert "21, 254" in message
    assert "0..20" in message


def test_check_label_values_small_k():
    with pytest.raises(BadSampleError, match="label values 5, 9 are outside 0..4"):
        check_label_values(np.array([[0, 5], [9, 255]], dtype=np.uint8), 5, "m")


def test_image_labels_from_mask():
    mask = np.array([[0, 3, 255], [3, 3, 255]], dtype=np.uint8)
    expected = np.zeros(6, dtype=np.float32)
    expected[[0, 3]] = 1
    result = image_labels_from_mask(mask, 6)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, expected)
    # No background pixel: background is absent from the labels.
    np.testing.assert_array_equal(
        image_labels_from_mask(np.full((2, 2), 2, np.uint8), 3), [0.0, 0.0, 1.0]
    )
