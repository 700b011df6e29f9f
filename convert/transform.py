"""Decode one image from memory and turn it into what a shard stores.

`transform(data, cfg)` -> uint8 pixels (H, W, C) or encoded bytes; per-item failures raise
`ItemError` (DECODE_ERROR / DECOMPRESSION_BOMB, and FILTERED by image.min_size / max_aspect_ratio /
max_area, decided from the header before decoding). Everything is thread-safe: no Pillow globals are
read or mutated (MAX_IMAGE_PIXELS, LOAD_TRUNCATED_IMAGES) and no warnings filters are touched.

Choices:
- Filter: BICUBIC. Pillow's resampling widens the kernel by the scale factor (proper
  anti-aliasing), so BICUBIC is nearly as sharp as LANCZOS with less ringing and a smaller kernel.
- `reducing_gap=3.0`: only kicks in for reductions >= 6x (non-JPEG or draft off); Pillow documents
  3.0 as indistinguishable from full resampling in most cases.
- JPEG draft (DCT-domain scaling by 1/2, 1/4, 1/8) asks for exactly the size the resize mode needs
  (every mode, keep_ratio ones included: convert.geometry.needed_size); libjpeg's scaled IDCT is an
  area-style reduction, and draft never goes below the requested size.
- Geometry per resize mode (and upscale: false) is decided in convert.geometry; img2dataset
  resamples with OpenCV (INTER_AREA down, LANCZOS up), so its pixels differ slightly from ours.
- Transparent pixels are composited over `pad_color` (the same fill used for letterbox borders).
- 16-bit inputs are scaled to 8 bits (x / 257, rounded); Pillow's own I;16 -> L conversion clips.
"""

from __future__ import annotations

import functools
import io
import struct
from typing import Any

from dataclasses import dataclass

import numpy as np
from PIL import Image, JpegImagePlugin

from .config import ImageConfig
from .decoders import decode_scaled, exif_orientation, fast_eligible, pil_orientation, scan_jpeg, upright
from .geometry import Box, check_header, fixed_shape, needed_size, plan
from .specs import ItemError, Status
from .timing import NULL_CLOCK, StageClock

RESAMPLE = Image.Resampling.BICUBIC
REDUCING_GAP = 3.0
# Raster formats decoded in-process. Excludes e.g. EPS (Pillow would run Ghostscript on untrusted input).
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM", "TGA", "ICO", "QOI", "AVIF")
_ENCODERS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}

Image.init()  # register every plugin once at import (idempotent), so _open never mutates registries


def output_shape(cfg: ImageConfig) -> tuple[int, int, int] | None:
    """Fixed (H, W, C) of transform() output for raw pixels with a resize; None if variable or encoded
    (resize none, keep_ratio modes, stretch/center_crop with upscale false): writers then store each
    image's own shape."""
    if cfg.encode != "raw" or cfg.size is None or not fixed_shape(cfg):
        return None
    return (cfg.size[0], cfg.size[1], 3 if cfg.mode == "RGB" else 1)


@dataclass(slots=True)
class SourceFacts:
    """What the source image was, filled in as soon as its header is read (for the ledger)."""

    width: int = -1
    height: int = -1
    format: str = ""  # Pillow's format name, lower case ("jpeg", "png", ...)
    decoder: str = ""  # which path decoded it: "simplejpeg" (fast JPEG path) or "pillow"


def transform(
    data: bytes | np.ndarray, cfg: ImageConfig, clock: StageClock = NULL_CLOCK, facts: SourceFacts | None = None
) -> np.ndarray | bytes:
    """Decode (bytes) or adopt (uint8 array) one image, apply orientation/mode/resize, return pixels or bytes.

    `clock` is charged "decode", "resize" and "encode"; `facts` receives the source size and format.
    """
    t = clock.now()
    if isinstance(data, np.ndarray):
        img = _from_array(data, cfg)
        src = img.size
        _note(facts, img.size, "array")
        if cfg.encode == "original":
            t = clock.lap("decode", t)
            out = _encode(img, "png", cfg.quality)
            clock.lap("encode", t)
            return out
    else:
        data = bytes(data)
        fast = _fast_jpeg(data, cfg, facts) if _wants_fast(data, cfg) else None
        if fast is not None:
            return _finish(*fast, cfg, clock, clock.lap("decode", t))
        img = _open(data, cfg, facts)
        _note(facts, img.size, img.format, "pillow")
        if cfg.encode == "original":
            if cfg.draft and isinstance(img, JpegImagePlugin.JpegImageFile):
                img.draft(None, (1, 1))  # still entropy-decodes every block; the IDCT is 1/8 the work
            _load(img)
            clock.lap("decode", t)
            return data
        img, src = _decode(img, cfg)
    return _finish(img, src, cfg, clock, clock.lap("decode", t))


def _finish(img: Image.Image, src: tuple[int, int], cfg: ImageConfig, clock: StageClock, t: int) -> np.ndarray | bytes:
    """Decoded, upright image (`src`: the source's upright size, before any draft) -> working mode ->
    geometry -> pixels or encoded bytes."""
    img = _to_working_mode(img, cfg)
    img = _resize(img, src, cfg)
    t = clock.lap("resize", t)
    if cfg.encode == "raw":
        arr = np.array(img, dtype=np.uint8)
        out: np.ndarray | bytes = arr[:, :, None] if arr.ndim == 2 else arr
    else:
        out = _encode(img, cfg.encode, cfg.quality)
    clock.lap("encode", t)
    return out


def _note(facts: SourceFacts | None, size: tuple[int, int], fmt: str | None, decoder: str = "") -> None:
    if facts is not None:
        facts.width, facts.height = size
        facts.format, facts.decoder = (fmt or "").lower(), decoder


def _wants_fast(data: bytes, cfg: ImageConfig) -> bool:
    """Fast JPEG path: draft on (off means "exactly Pillow"), pixels wanted, bytes that start like a JPEG."""
    return cfg.draft and cfg.decoder != "pillow" and cfg.encode != "original" and data[:3] == b"\xff\xd8\xff"


Decoded = tuple[Image.Image, tuple[int, int]]  # upright pixels (maybe drafted), the source's upright (w, h)


def _fast_jpeg(data: bytes, cfg: ImageConfig, facts: SourceFacts | None) -> Decoded | None:
    """Upright pixels of a common JPEG via the DCT-scaled fast decoder and the source's upright
    size, or None to use Pillow."""
    head = scan_jpeg(data)  # a broken header is DECODE_ERROR on either path
    if not fast_eligible(head):
        return None
    _note(facts, (head.width, head.height), "jpeg")
    check_header(head.width, head.height, cfg)
    orientation = exif_orientation(head)
    if orientation is None:
        return None
    need = needed_size((head.width, head.height), orientation, cfg)
    img = decode_scaled(data, need, gray=cfg.mode == "L" or head.components == 1)
    if img is None:
        return None
    _note(facts, (head.width, head.height), "jpeg", "simplejpeg")
    src = (head.height, head.width) if orientation >= 5 else (head.width, head.height)
    return upright(img, orientation), src


def _open(data: bytes, cfg: ImageConfig, facts: SourceFacts | None) -> Image.Image:
    """Parse the header only; reject non-images, images over the pixel cap and filtered images
    before any decoding."""
    if not data:
        raise ItemError(Status.DECODE_ERROR, "empty input (0 bytes)")
    img = _identify(data)
    if isinstance(img, JpegImagePlugin.JpegImageFile):
        scan_jpeg(data)
    _note(facts, img.size, img.format)
    check_header(*img.size, cfg)
    return img


def _identify(data: bytes) -> Image.Image:
    """Image.open's format probe without its global-threshold bomb check (which warns or raises on
    Pillow's MAX_IMAGE_PIXELS, not on our per-config cap, and cannot be silenced thread-safely)."""
    prefix, why = data[:16], ""
    for fmt in Image.ID:
        if fmt not in ALLOWED_FORMATS:
            continue
        factory, accept = Image.OPEN[fmt]
        try:
            accepted = accept(prefix) if accept is not None else True
        except Exception:  # noqa: BLE001 - some probes unpack 4 bytes unguarded (DIB on b"\xff\xd8\xff")
            continue
        if isinstance(accepted, str) or not accepted:  # a str is Pillow's "looks like it, but unsupported"
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error) as exc:
            why = why or f": {fmt} header: {exc}"
            continue  # this plugin rejects it; try the next, as Image.open does
        except Image.DecompressionBombError as exc:  # a plugin's own check (e.g. WebP, MPO frames)
            raise ItemError(Status.DECOMPRESSION_BOMB, str(exc)) from None
        except Exception as exc:
            raise ItemError(Status.DECODE_ERROR, f"{fmt} header: {type(exc).__name__}: {exc}") from None
    # never quote the bytes: an item may be a file the list was not meant to expose
    raise ItemError(Status.DECODE_ERROR, f"not a supported image ({len(data)} bytes, no known image signature){why}")


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise ItemError(Status.DECOMPRESSION_BOMB, str(exc)) from None
    except Exception as exc:  # Pillow raises OSError/ValueError/SyntaxError/... for broken data
        raise ItemError(Status.DECODE_ERROR, f"{img.format} decode: {type(exc).__name__}: {exc}") from None


def _decode(img: Image.Image, cfg: ImageConfig) -> Decoded:
    """Draft (JPEG), decode, and make the image upright; also the source's upright size."""
    orientation = pil_orientation(img)
    src = (img.size[1], img.size[0]) if orientation >= 5 else img.size
    if cfg.draft and isinstance(img, JpegImagePlugin.JpegImageFile):
        need = needed_size(img.size, orientation, cfg)
        mode = "L" if cfg.mode == "L" and img.mode == "RGB" else None
        if need is not None or mode is not None:
            img.draft(mode, need)
    _load(img)
    return upright(img, orientation), src


def _from_array(arr: np.ndarray, cfg: ImageConfig) -> Image.Image:
    if arr.dtype != np.uint8:
        raise ItemError(Status.DECODE_ERROR, f"pixel array must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))) or 0 in arr.shape:
        raise ItemError(Status.DECODE_ERROR, f"pixel array must be HxW or HxWx{{1,3,4}}, got shape {arr.shape}")
    check_header(arr.shape[1], arr.shape[0], cfg)
    mode = "L" if arr.ndim == 2 else ("RGB" if arr.shape[2] == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(arr), mode)


def _to_working_mode(img: Image.Image, cfg: ImageConfig) -> Image.Image:
    """Reduce any Pillow mode to "L" or "RGB" (L stays L until after resizing; it is 3x cheaper)."""
    mode = img.mode
    if mode in ("L", "RGB"):
        pass
    elif mode.startswith("I;16") or mode in ("I", "F"):
        img = _to_8bit(img)
    elif mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        img = _flatten_alpha(img, cfg.pad_color)
    else:  # P, 1, CMYK, YCbCr, ...
        try:
            img = img.convert("L" if mode == "1" else "RGB")
        except ValueError as exc:
            raise ItemError(Status.DECODE_ERROR, f"unsupported image mode {mode!r}: {exc}") from None
    if cfg.mode == "L" and img.mode != "L":
        img = img.convert("L")
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "F":
        out = np.clip(np.rint(arr), 0, 255)
    elif img.mode == "I" and arr.max(initial=0) <= 255:
        out = np.clip(arr, 0, 255)  # 32-bit container holding 8-bit values
    else:  # 16-bit range: 0..65535 -> 0..255, rounded (x*257 maps back to x exactly)
        out = (np.clip(arr.astype(np.int64), 0, 65535) * 255 + 32767) // 65535
    return Image.fromarray(out.astype(np.uint8), "L")


def _flatten_alpha(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    rgba = img.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, fill)
    canvas.paste(rgba.convert("RGB"), (0, 0), rgba.getchannel("A"))
    return canvas


def _resize(img: Image.Image, src: tuple[int, int], cfg: ImageConfig) -> Image.Image:
    """Geometry per resize mode (convert.geometry.plan), decided on the source's size `src` so a
    drafted decode gives the same output size. Converts to cfg.mode at the end."""
    p = plan(src, cfg)
    if p is None:
        return img.convert(cfg.mode) if img.mode != cfg.mode else img
    box = p.box if p.box is None or img.size == src else _scale_box(p.box, src, img.size)
    if p.canvas is None:
        out = _resample(img, p.size, box)
    else:  # pad: the fitted content centred on a pad_color canvas
        (fw, fh), (tw, th) = p.size, p.canvas
        content = _resample(img, p.size, box).convert(cfg.mode)
        out = Image.new(cfg.mode, (tw, th), _fill_value(cfg.pad_color, cfg.mode))
        out.paste(content, ((tw - fw) // 2, (th - fh) // 2))
    return out.convert(cfg.mode) if out.mode != cfg.mode else out


def _scale_box(box: Box, src: tuple[int, int], got: tuple[int, int]) -> Box:
    """A source-coordinate box in the coordinates of the decoded (drafted) image."""
    kx, ky = got[0] / src[0], got[1] / src[1]
    return (box[0] * kx, box[1] * ky, box[2] * kx, box[3] * ky)


def _resample(img: Image.Image, size: tuple[int, int], box: Box | None) -> Image.Image:
    if box is None:
        return img if img.size == size else img.resize(size, RESAMPLE, reducing_gap=REDUCING_GAP)
    if (box[2] - box[0], box[3] - box[1]) == size and all(float(v).is_integer() for v in box):
        return img.crop(box)  # a crop at the source's scale (integer box): no resampling
    return img.resize(size, RESAMPLE, box=box, reducing_gap=REDUCING_GAP)


@functools.lru_cache(maxsize=64)  # one pad colour per config: don't build an image per item
def _fill_value(rgb: tuple[int, int, int], mode: str) -> int | tuple[int, int, int]:
    if mode == "RGB":
        return tuple(rgb)  # type: ignore[return-value]
    return int(Image.new("RGB", (1, 1), tuple(rgb)).convert("L").getpixel((0, 0)))  # Pillow's own luma


def _encode(img: Image.Image, encoding: str, quality: int) -> bytes:
    fmt = _ENCODERS[encoding]
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGBA" if "A" in img.mode else "RGB")
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()
