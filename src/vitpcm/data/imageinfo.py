"""Image size, format and integrity from the file header, without decoding pixels.

Conversion stores images as their original encoded bytes, so decoding each one only to
learn its size (and to notice corruption) would waste most of the conversion time. A JPEG
states its size in the SOF segment and ends with the EOI marker; a PNG states it in IHDR
and protects every chunk with a CRC and ends with IEND. Checking those catches the usual
corruption (truncated downloads, wrong file types, damaged chunks) at the cost of one
pass of ``zlib.crc32`` over PNG data and none for JPEG entropy data, which cannot be
checked short of decoding.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from vitpcm.errors import BadSampleError

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8 and CC are
# other segments that share the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length field.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# PNG colour type -> channels after decoding (palette images decode to RGB).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


@dataclass(frozen=True)
class ImageInfo:
    """What the header says about an encoded image.

    Attributes:
        format: ``"jpeg"`` or ``"png"``.
        height: Rows.
        width: Columns.
        channels: Components as decoded (1 grey, 3 colour, 4 with alpha or CMYK).
        png_color_type: The IHDR colour type (0 grey, 2 RGB, 3 palette, 4 grey+alpha,
            6 RGBA); ``None`` for JPEG.
        png_bit_depth: The IHDR bit depth; ``None`` for JPEG.
    """

    format: str
    height: int
    width: int
    channels: int
    png_color_type: int | None = None
    png_bit_depth: int | None = None


def image_info(data: bytes, name: str) -> ImageInfo:
    """Read the size and format of a JPEG or PNG and check that the file is whole.

    Args:
        data: The encoded file.
        name: What to call the file in error messages (usually its path).

    Returns:
        The header facts.

    Raises:
        BadSampleError: Not a JPEG or PNG, a damaged header, a missing end marker
            (truncated file) or, for PNG, a chunk whose CRC does not match.
    """
    if data.startswith(b"\xff\xd8"):
        return _jpeg_info(data, name)
    if data.startswith(_PNG_SIGNATURE):
        return _png_info(data, name)
    if not data:
        raise BadSampleError(name, "the file is empty; download or extract it again")
    raise BadSampleError(name, "not a JPEG or PNG image (unknown signature); replace the file")


def _jpeg_info(data: bytes, name: str) -> ImageInfo:
    # Encoders and copy tools sometimes pad the file after EOI; anything else after the
    # last byte of a truncated scan cannot end in FF D9.
    if not data.rstrip(b"\x00\r\n\x1a").endswith(b"\xff\xd9"):
        raise BadSampleError(
            name, "JPEG has no end-of-image marker: the file is truncated; replace it"
        )
    pos, size = 2, len(data)
    while pos < size:
        if data[pos] != 0xFF:
            raise BadSampleError(name, f"JPEG header is corrupt (no marker at byte {pos})")
        while pos < size and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= size:
            break
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # EOI or start of scan before any frame header
            break
        if pos + 2 > size:
            break
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2 or pos + length > size:
            break
        if marker in _JPEG_SOF:
            if length < 8:
                break
            _precision, height, width, components = struct.unpack_from(">BHHB", data, pos + 2)
            if height == 0 or width == 0:
                raise BadSampleError(name, f"JPEG header gives an empty size {width}x{height}")
            return ImageInfo("jpeg", height, width, components)
        pos += length
    raise BadSampleError(name, "JPEG has no readable frame header (SOF); the file is corrupt")


def palette_png_as_grey(data: bytes) -> bytes | None:
    """Turn an 8-bit palette PNG into the 8-bit grey PNG of its indices, without decoding.

    Both store one byte per pixel with identical filtering and compression, so relabelling
    the IHDR colour type (and dropping the palette chunks) keeps every index as the grey
    value. Readers such as ``tf.io.decode_png`` map palette indices to colours, whereas
    they read grey values as they are.

    Returns:
        The grey PNG, or ``None`` when ``data`` is not an 8-bit palette PNG.
    """
    if not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR" or data[24:26] != b"\x08\x03":
        return None
    out = [_PNG_SIGNATURE]
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if kind == b"IHDR":
            body = bytearray(data[pos + 4 : end - 4])
            body[4 + 9] = 0  # colour type: grey
            out.append(data[pos : pos + 4] + bytes(body) + struct.pack(">I", zlib.crc32(body)))
        elif kind not in (b"PLTE", b"tRNS", b"bKGD", b"hIST", b"sPLT"):  # palette-bound
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            return b"".join(out)
    return None


def _png_info(data: bytes, name: str) -> ImageInfo:
    pos, size = len(_PNG_SIGNATURE), len(data)
    header: ImageInfo | None = None
    while pos + 12 <= size:
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        end = pos + 8 + length
        if end + 4 > size:
            break
        (crc,) = struct.unpack_from(">I", data, end)
        if zlib.crc32(data[pos + 4 : end]) != crc:
            chunk = kind.decode("latin-1")
            raise BadSampleError(name, f"PNG chunk {chunk} fails its CRC: the file is corrupt")
        if header is None:
            if kind != b"IHDR" or length < 13:
                raise BadSampleError(name, "PNG does not start with an IHDR chunk")
            width, height, depth, color = struct.unpack_from(">IIBB", data, pos + 8)
            if color not in _PNG_CHANNELS or width == 0 or height == 0:
                raise BadSampleError(
                    name, f"PNG header is invalid (size {width}x{height}, colour type {color})"
                )
            header = ImageInfo("png", height, width, _PNG_CHANNELS[color], color, depth)
        elif kind == b"IEND":
            return header
        pos = end + 4
    raise BadSampleError(name, "PNG ends before its IEND chunk: the file is truncated; replace it")
