"""Image geometry decided from the header alone: the filters, and each resize mode's target sizes.

Pure arithmetic on (width, height) - no pixels - so the same answers serve three places: the
filters (`check_header`, before any decoding), the JPEG draft / DCT-scaled decode request
(`needed_size`, the smallest decode that still covers the output) and the resize itself (`plan`).

Resize modes (`image.size` is (H, W); keep_ratio modes take one length S, stored as (S, S)):
- stretch: to (W, H). center_crop: scale to cover (W, H), crop the centre. pad: scale to fit
  inside (W, H), centre on a pad_color canvas.
- keep_ratio: the shorter side becomes S, the aspect ratio is kept, nothing is cropped.
  keep_ratio_largest: the longer side becomes S. Both as img2dataset's resize_mode of the same name:
  scale = S / min(w, h) (or max), each side round(side * scale) with Python's round (half to even,
  as albumentations' py3round), so output shapes match img2dataset's exactly. One difference: a side
  is never below 1 px (img2dataset's resize of a 1x10000 image to keep_ratio_largest 64 fails).
- upscale: false never enlarges. keep_ratio modes: an image whose shorter (keep_ratio) or longer
  (keep_ratio_largest) side is <= S is kept as it is - img2dataset's resize_only_if_bigger. For the
  fixed-shape modes we differ from img2dataset (which then leaves the image untouched, uncropped
  and unpadded): stretch shrinks each side to at most the target; center_crop takes the centred
  min(W, w) x min(H, h) region when covering the target would enlarge; pad centres the image at its
  own size on the (W, H) canvas when fitting would enlarge, so pad keeps its fixed shape.

Other differences from img2dataset to expect in a comparison (its modes: fixed = our stretch,
border = pad with a white canvas, no = none): it decodes with OpenCV's IMREAD_UNCHANGED, which
ignores EXIF orientation, so an orientation 5-8 image comes out transposed there and upright here
(the filters agree: they do not depend on orientation); it filters after a full decode, so a
truncated file it reports as a decode error can be `filtered` here; it resamples with OpenCV
(INTER_AREA down, LANCZOS up), we with Pillow's antialiased BICUBIC after a JPEG DCT-scaled decode.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ImageConfig
from .specs import ItemError, Status

Box = tuple[float, float, float, float]
KEEP_RATIO = ("keep_ratio", "keep_ratio_largest")


@dataclass(frozen=True, slots=True)
class Plan:
    """How one upright (w, h) image becomes the output: resample `box` (None: the whole image) to
    `size` (w, h), then centre it on a `canvas` (w, h) of pad_color if one is given."""

    size: tuple[int, int]
    box: Box | None = None
    canvas: tuple[int, int] | None = None
    need: tuple[int, int] | None = None  # smallest upright decode (w, h) that covers this; None = full size


def fixed_shape(cfg: ImageConfig) -> bool:
    """True when every image gets the same (H, W): a resize mode that sets both sides."""
    if cfg.resize == "none" or cfg.size is None or cfg.resize in KEEP_RATIO:
        return False
    return cfg.upscale or cfg.resize == "pad"


def check_header(w: int, h: int, cfg: ImageConfig) -> None:
    """The pixel cap, then the filters, then the cap on a keep_ratio output, on the header's size;
    raises ItemError before any decode.

    The filters are rotation-invariant, so the stored (pre-EXIF) size decides them. Boundaries as
    img2dataset: min(w, h) < min_size, max/min > max_aspect_ratio and w*h > max_area are refused.
    """
    if w * h > cfg.max_pixels:
        raise ItemError(Status.DECOMPRESSION_BOMB, f"{w}x{h} = {w * h} pixels exceeds max_pixels={cfg.max_pixels}")
    short, long = min(w, h), max(w, h)
    if short < cfg.min_size:
        raise ItemError(Status.FILTERED, f"shorter side {short} px < image.min_size {cfg.min_size} ({w}x{h})")
    ratio = long / short if short else float("inf")
    if cfg.max_aspect_ratio is not None and ratio > cfg.max_aspect_ratio:
        raise ItemError(
            Status.FILTERED, f"aspect ratio {ratio:.3g} > image.max_aspect_ratio {cfg.max_aspect_ratio:g} ({w}x{h})"
        )
    if cfg.max_area is not None and w * h > cfg.max_area:
        raise ItemError(Status.FILTERED, f"area {w}x{h} = {w * h} px > image.max_area {cfg.max_area}")
    p = plan((w, h), cfg) if cfg.resize in KEEP_RATIO else None  # only these grow without bound
    if p is not None and p.size[0] * p.size[1] > cfg.max_pixels:  # e.g. a 1x2000 sliver to keep_ratio 512
        ow, oh = p.size
        raise ItemError(
            Status.DECOMPRESSION_BOMB,
            f"{w}x{h} would resize to {ow}x{oh} = {ow * oh} pixels, over max_pixels={cfg.max_pixels}"
            " (set image.max_aspect_ratio to filter such images)",
        )


def plan(src: tuple[int, int], cfg: ImageConfig) -> Plan | None:
    """The geometry for an upright source of size `src` (w, h); None when nothing changes shape."""
    if cfg.resize == "none" or cfg.size is None:
        return None
    sw, sh = src
    th, tw = cfg.size
    if cfg.resize in KEEP_RATIO:
        side = min(sw, sh) if cfg.resize == "keep_ratio" else max(sw, sh)
        scale = tw / float(side)  # the expression order of albumentations' *_max_size
        if scale == 1.0 or (scale > 1.0 and not cfg.upscale):
            return None
        size = (max(1, round(sw * scale)), max(1, round(sh * scale)))
        return Plan(size, need=size)
    if cfg.resize == "stretch":
        size = (tw, th) if cfg.upscale else (min(tw, sw), min(th, sh))
        return Plan(size, need=size)
    if cfg.resize == "center_crop":
        return _center_crop(sw, sh, tw, th, cfg.upscale)
    content = fit((sw, sh), (tw, th)) if cfg.upscale or sw > tw or sh > th else (sw, sh)
    return Plan(content, canvas=(tw, th), need=content)


def _center_crop(sw: int, sh: int, tw: int, th: int, upscale: bool) -> Plan:
    if not upscale and (sw < tw or sh < th):  # covering would enlarge: crop at the source's scale
        cw, ch = min(tw, sw), min(th, sh)
        left, top = (sw - cw) // 2, (sh - ch) // 2
        return Plan((cw, ch), box=(left, top, left + cw, top + ch))
    # scale-to-cover then centre crop == resample the centred source box with the target aspect;
    # passing the box to resize avoids an intermediate image and its rounding. A decode >= (tw, th)
    # on both sides is exactly the cover scale, so that is the draft request.
    if sw * th > sh * tw:  # source wider than target
        bw, bh = sh * tw / th, float(sh)
    else:
        bw, bh = float(sw), sw * th / tw
    box = ((sw - bw) / 2, (sh - bh) / 2, (sw + bw) / 2, (sh + bh) / 2)
    return Plan((tw, th), box=box, need=(tw, th))


def fit(src: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """Largest (w, h) with the aspect ratio of `src` that fits in `box` (letterbox content size)."""
    scale = min(box[0] / src[0], box[1] / src[1])
    return (min(box[0], max(1, round(src[0] * scale))), min(box[1], max(1, round(src[1] * scale))))


def needed_size(stored: tuple[int, int], orientation: int, cfg: ImageConfig) -> tuple[int, int] | None:
    """Smallest (w, h) in STORED orientation that the resize needs (JPEG draft / scaled decode
    request: both decoders return the smallest DCT scale >= it), or None if not shrinking."""
    swap = orientation >= 5  # 5-8 store the image rotated by 90 degrees
    sw, sh = (stored[1], stored[0]) if swap else stored
    p = plan((sw, sh), cfg)
    if p is None or p.need is None:
        return None
    tw, th = p.need
    if tw >= sw and th >= sh:
        return None
    return (th, tw) if swap else (tw, th)
