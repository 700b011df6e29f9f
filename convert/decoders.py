"""JPEG header scan and the fast JPEG path (simplejpeg: libjpeg-turbo's DCT-scaled decode).

JPEG is most of every real corpus. Measured on this machine (tests/benchmarks/bench_transform.py,
300 photo-like JPEGs of 200-600 px, mean 48 KiB, to 64x64 centre crop, one core): Pillow draft
decode ~1250 decodes/s, simplejpeg scaled decode ~1450/s; the whole transform ~950 vs ~1050 img/s
(bench_transform prints the same-run figures). pyvips' shrink-on-load thumbnail ran at ~200 img/s
per core here (its per-call set-up dominates at 45 kB); PyTurboJPEG needs a system libturbojpeg
and calls the same libjpeg-turbo decoder as simplejpeg. So the fast path is simplejpeg, an
optional binary wheel: `pip install 'convert[fast-jpeg]'`.

The fast path handles only what it surely decodes like Pillow: baseline/extended/progressive
Huffman JPEG, 8-bit, 1 or 3 components, no Adobe (APP14) colour transform marker, orientation
from EXIF only. Anything else - CMYK/YCCK, 12-bit, lossless, arithmetic coding, XMP-only
orientation - and any libjpeg warning (`strict=True`: corrupt data, truncation, odd scans) goes to
Pillow, which then decides the item's status exactly as before.

Decoders are imported here, at module load: importing lazily from prefetch/convert threads raced
on a 10^6-item run (`ImportError: from-import-* object has no __dict__`).
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .specs import ItemError, Status

try:
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only without the fast-jpeg extra
    simplejpeg = None

FAST_JPEG = simplejpeg is not None
MISSING_MESSAGE = "convert: simplejpeg not installed, JPEGs decode with Pillow (pip install simplejpeg)"
_SOF_FAST = (0xC0, 0xC1, 0xC2)  # baseline, extended, progressive (Huffman)
_SOF_ALL = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG, DAC are not frames
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_log = logging.getLogger("convert.decoders")
ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_warned = False


@dataclass(slots=True)
class JpegHeader:
    """What the marker walk from SOI to the first SOS found."""

    sof: int = 0  # frame marker (0xC0..0xCF), 0 if none before SOS
    precision: int = 0
    width: int = 0
    height: int = 0
    components: int = 0
    exif: bytes | None = None  # first APP1 "Exif\0\0" payload
    xmp: bool = False
    adobe: bool = False


def scan_jpeg(data: bytes) -> JpegHeader:
    """Walk the JPEG marker segments from SOI to the first SOS; ItemError(DECODE_ERROR) if broken.

    Hand-written because Pillow skips garbage between segments and libjpeg only *warns* about it
    ("Corrupt JPEG data: N extraneous bytes"), and Pillow drops libjpeg warnings, so a file with a
    damaged header would otherwise decode silently (possibly with substituted Huffman tables).
    """
    head, pos, n = JpegHeader(), 2, len(data)
    if n < 4 or data[:2] != b"\xff\xd8":
        raise ItemError(Status.DECODE_ERROR, f"truncated JPEG: {n}-byte header")
    while pos < n:
        if data[pos] != 0xFF:
            raise ItemError(Status.DECODE_ERROR, f"corrupt JPEG: garbage at byte {pos} between header segments")
        while pos < n and data[pos] == 0xFF:  # fill bytes may precede a marker
            pos += 1
        if pos + 2 >= n:
            break
        marker = data[pos]
        if marker == 0xDA:  # start of scan: the header is complete
            return head
        if marker in (0x00, 0xD8, 0xD9) or 0xD0 <= marker <= 0xD7:
            raise ItemError(Status.DECODE_ERROR, f"corrupt JPEG: unexpected marker 0xFF{marker:02X} at byte {pos}")
        (length,) = struct.unpack_from(">H", data, pos + 1)
        if length < 2:
            raise ItemError(Status.DECODE_ERROR, f"corrupt JPEG: bad segment length {length} at byte {pos}")
        _note_segment(head, marker, data[pos + 3 : pos + 1 + length])
        pos += 1 + length
    raise ItemError(Status.DECODE_ERROR, "truncated JPEG: no image data (start-of-scan) found")


def _note_segment(head: JpegHeader, marker: int, body: bytes) -> None:
    if marker in _SOF_ALL and head.sof == 0 and len(body) >= 6:
        head.sof, head.precision = marker, body[0]
        head.height, head.width = struct.unpack_from(">HH", body, 1)
        head.components = body[5]
    elif marker == 0xE1:
        if body.startswith(b"Exif\x00\x00") and head.exif is None:
            head.exif = body
        elif body.startswith(_XMP):
            head.xmp = True
    elif marker == 0xEE and body.startswith(b"Adobe"):
        head.adobe = True


def fast_eligible(head: JpegHeader) -> bool:
    """True when the fast path decodes this JPEG exactly as libjpeg under Pillow would."""
    return (
        head.sof in _SOF_FAST
        and head.precision == 8
        and head.components in (1, 3)
        and not head.adobe
        and head.width > 0
        and head.height > 0
    )


def exif_orientation(head: JpegHeader) -> int | None:
    """EXIF orientation 1-8 (1 if absent/unreadable, as Pillow's path); None means "ask Pillow"
    (an XMP packet could carry the orientation instead, which Pillow honours)."""
    if head.exif is None:
        return None if head.xmp else 1
    try:
        exif = Image.Exif()
        exif.load(head.exif)
        value = exif.get(ORIENTATION_TAG)
    except Exception:  # unreadable EXIF is not worth losing the image for (Pillow's path agrees)
        return 1
    if value is None and head.xmp:
        return None
    return value if value in range(1, 9) else 1


def decode_scaled(data: bytes, need: tuple[int, int] | None, gray: bool) -> Image.Image | None:
    """libjpeg-turbo decode scaled by M/8 to the smallest size >= need (w, h); None on any doubt."""
    global _warned
    if simplejpeg is None:
        if not _warned:
            _warned = True
            _log.warning(MISSING_MESSAGE)
        return None
    w, h = need if need is not None else (0, 0)
    try:
        arr = simplejpeg.decode_jpeg(data, "GRAY" if gray else "RGB", min_height=h, min_width=w, strict=True)
    except Exception:  # noqa: BLE001 - any libjpeg warning/error: let Pillow decide (and classify)
        return None
    if gray:
        return Image.fromarray(np.ascontiguousarray(arr[:, :, 0]), "L")
    return Image.fromarray(arr, "RGB")


def pil_orientation(img: Image.Image) -> int:
    """EXIF (or XMP) orientation of an opened image, 1 when absent or unreadable."""
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # unreadable EXIF is not worth losing the image for
        return 1
    return value if value in TRANSPOSE else 1


def upright(img: Image.Image, orientation: int) -> Image.Image:
    """The image turned as EXIF `orientation` says it should be displayed."""
    return img.transpose(TRANSPOSE[orientation]) if orientation in TRANSPOSE else img


def decode_stored(data: bytes) -> np.ndarray:
    """A shard's encoded image -> HxWxC uint8 (C=1 for grayscale), upright: the read side.

    `encode: original` stores the source bytes, EXIF orientation included; the write side makes
    pixels upright, so the reader does too (our own jpeg/png/webp encodings carry no orientation).
    JPEG through libjpeg-turbo when installed, anything it refuses through Pillow.
    """
    if data[:3] == b"\xff\xd8\xff" and simplejpeg is not None:
        arr = _stored_jpeg(data)
        if arr is not None:
            return arr
    with Image.open(io.BytesIO(data)) as opened:
        orientation = pil_orientation(opened)
        img = opened if opened.mode in ("RGB", "L") else opened.convert("RGB")
        arr = np.asarray(upright(img, orientation))
    return arr[:, :, None] if arr.ndim == 2 else arr


def _stored_jpeg(data: bytes) -> np.ndarray | None:
    """simplejpeg decode, turned upright; None to let Pillow decide (CMYK, XMP orientation, ...)."""
    try:
        orientation = exif_orientation(scan_jpeg(data))
        if orientation is None:
            return None
        gray = simplejpeg.decode_jpeg_header(data)[2] == "Gray"
        arr = simplejpeg.decode_jpeg(data, colorspace="GRAY" if gray else "RGB")
    except (ItemError, ValueError):  # simplejpeg refuses e.g. CMYK with ValueError
        return None
    if orientation not in TRANSPOSE:
        return arr
    turned = np.asarray(upright(Image.fromarray(arr[:, :, 0] if gray else arr), orientation))
    return turned[:, :, None] if gray else turned
