"""The fast JPEG path (simplejpeg, DCT-scaled) against an independent Pillow computation.

Every test asserts which decoder ran (`SourceFacts.decoder`), so a fast path that silently fell
back - or a fallback that silently stopped happening - fails. References use Image.open /
ImageOps directly, never convert.transform.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from convert.config import ImageConfig
from convert.specs import ItemError, Status
from convert.testing import images
from convert.decoders import decode_scaled
from convert.geometry import needed_size
from convert.transform import SourceFacts, transform

pytest.importorskip("simplejpeg")

BICUBIC = Image.Resampling.BICUBIC
TOLERANCE = 6.0  # mean abs error of the draft/scaled path, as for Pillow's own draft


def run(data: bytes, **kw) -> tuple[np.ndarray, str]:
    facts = SourceFacts()
    out = transform(data, ImageConfig(**kw), facts=facts)
    return out, facts.decoder


def reference(data: bytes, size=(48, 64), resize="center_crop", mode="RGB", pad=(0, 0, 0)) -> np.ndarray:
    """Full-resolution Pillow decode, upright, then the resize mode via ImageOps."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert(mode)
    h, w = size
    if resize == "center_crop":
        img = ImageOps.fit(img, (w, h), BICUBIC)
    elif resize == "pad":
        img = ImageOps.pad(
            img,
            (w, h),
            BICUBIC,
            color=pad if mode == "RGB" else Image.new("RGB", (1, 1), pad).convert("L").getpixel((0, 0)),
        )
    elif resize == "stretch":
        img = img.resize((w, h), BICUBIC)
    arr = np.asarray(img)
    return arr[:, :, None] if arr.ndim == 2 else arr


def mae(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def jpeg(img: Image.Image, **kw) -> bytes:
    return images.encode(img, "JPEG", **{"quality": 92, **kw})


PHOTO = images.photo_like(410, 300, seed=3)


@pytest.mark.parametrize(
    "name,data",
    [
        ("baseline-420", jpeg(PHOTO, subsampling=2)),
        ("baseline-422", jpeg(PHOTO, subsampling=1)),
        ("baseline-444", jpeg(PHOTO, subsampling=0)),
        ("progressive", jpeg(PHOTO, progressive=True)),
        ("optimized", jpeg(PHOTO, optimize=True)),
        ("gray", jpeg(PHOTO.convert("L"))),
    ],
)
@pytest.mark.parametrize("resize", ["center_crop", "pad", "stretch"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_fast_path_matches_pillow(name, data, resize, mode):
    out, decoder = run(data, size=(48, 64), resize=resize, mode=mode, pad_color=(10, 200, 30))
    assert decoder == "simplejpeg"
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3 if mode == "RGB" else 1)
    assert mae(out, reference(data, (48, 64), resize, mode, (10, 200, 30))) <= TOLERANCE


@pytest.mark.parametrize("resize", ["keep_ratio", "keep_ratio_largest"])
@pytest.mark.parametrize("upscale", [True, False])
def test_keep_ratio_modes_take_the_fast_path(resize, upscale):
    """The DCT-scaled decode serves keep_ratio modes too, at a scale that still covers the output."""
    data = jpeg(PHOTO)
    out, decoder = run(data, size=64, resize=resize, upscale=upscale)
    want = (64, 87) if resize == "keep_ratio" else (47, 64)  # 410x300: 410*64/300 = 87.47, 300*64/410 = 46.83
    assert decoder == "simplejpeg" and out.shape == (*want, 3)
    need = needed_size((410, 300), 1, ImageConfig(size=64, resize=resize))
    scaled = decode_scaled(data, need, gray=False)
    assert scaled is not None and scaled.width < 410 and scaled.width >= want[1] and scaled.height >= want[0]
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((want[1], want[0]), BICUBIC))
    assert mae(out, ref) <= TOLERANCE


def test_resize_none_keeps_source_size():
    data = jpeg(PHOTO)
    out, decoder = run(data, size=None, resize="none")
    assert decoder == "simplejpeg" and out.shape == (300, 410, 3)
    assert mae(out, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))) <= 1.0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations(orientation):
    data = images.exif_rotated_jpeg(200, 120, orientation, seed=4)
    out, decoder = run(data, size=(30, 50), resize="stretch")
    assert decoder == "simplejpeg"
    assert mae(out, reference(data, (30, 50), "stretch")) <= TOLERANCE


def test_xmp_only_orientation_goes_to_pillow():
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    data = jpeg(PHOTO, xmp=xmp)
    out, decoder = run(data, size=(30, 50), resize="stretch")
    assert decoder == "pillow"
    assert mae(out, reference(data, (30, 50), "stretch")) <= TOLERANCE


@pytest.mark.parametrize("name", ["cmyk", "adobe-rgb-marker"])
def test_cmyk_and_adobe_marker_go_to_pillow(name):
    img = PHOTO.convert("CMYK") if name == "cmyk" else PHOTO
    data = jpeg(img) if name == "cmyk" else _with_adobe_marker(jpeg(img))
    out, decoder = run(data, size=(48, 64))
    assert decoder == "pillow"
    assert mae(out, reference(data, (48, 64))) <= TOLERANCE


def _with_adobe_marker(data: bytes) -> bytes:
    app14 = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x01"  # transform=1 (YCbCr): decodes the same
    return data[:2] + app14 + data[2:]


def outcome(data: bytes, **kw):
    """(decoder, pixels) or ("failed", status): what one configuration made of the input."""
    try:
        out, decoder = run(data, **kw)
    except ItemError as err:
        return "failed", err.status
    return decoder, out


@pytest.mark.parametrize("sof", [0xC3, 0xC9, 0xCA])  # lossless, arithmetic, arithmetic progressive
def test_other_frame_types_go_to_pillow(sof):
    data = bytearray(jpeg(PHOTO))
    pos = data.index(b"\xff\xc0")
    data[pos + 1] = sof
    fast = outcome(bytes(data), size=(48, 64))
    slow = outcome(bytes(data), size=(48, 64), decoder="pillow")
    assert fast[0] in ("pillow", "failed") and fast[0] == slow[0]  # never the fast decoder
    if fast[0] == "failed":
        assert fast[1] == slow[1]
    else:
        np.testing.assert_array_equal(fast[1], slow[1])


def test_twelve_bit_precision_goes_to_pillow():
    data = bytearray(jpeg(PHOTO))
    pos = data.index(b"\xff\xc0")
    data[pos + 4] = 12  # precision byte
    statuses = []
    for decoder in ("auto", "pillow"):
        with pytest.raises(ItemError) as err:
            run(bytes(data), size=(48, 64), decoder=decoder)
        statuses.append(err.value.status)
    assert statuses == [Status.DECODE_ERROR, Status.DECODE_ERROR]


@pytest.mark.parametrize("size", [(1, 1), (10000, 40), (40, 10000)])
def test_extreme_shapes(size):
    data = jpeg(Image.new("RGB", size, (200, 40, 90)).resize(size))
    if size != (1, 1):
        data = jpeg(images.photo_like(*size, seed=5))
    out, decoder = run(data, size=(16, 16), resize="center_crop")
    assert decoder == "simplejpeg" and out.shape == (16, 16, 3)
    assert mae(out, reference(data, (16, 16))) <= TOLERANCE


@pytest.mark.parametrize("name", sorted(images.bad_files()) + ["tiny-header", "soi-only"])
def test_broken_files_get_pillows_status(name):
    data = {**images.bad_files(), "tiny-header": b"\xff\xd8\xff", "soi-only": b"\xff\xd8"}[name]
    statuses = []
    for decoder in ("auto", "pillow"):
        with pytest.raises(ItemError) as err:
            run(data, size=(48, 64), decoder=decoder)
        statuses.append(err.value.status)
    assert statuses == [Status.DECODE_ERROR, Status.DECODE_ERROR]


def test_truncated_tail_falls_back_and_agrees_with_pillow():
    data = jpeg(PHOTO)
    cut = data[: len(data) - len(data) // 4]  # scan data cut short: libjpeg warns, strict mode refuses
    for decoder in ("auto", "pillow"):
        with pytest.raises(ItemError) as err:
            run(cut, size=(48, 64), decoder=decoder)
        assert err.value.status == Status.DECODE_ERROR


def test_pixel_cap_is_checked_before_decoding():
    data = jpeg(images.photo_like(400, 300))
    facts = SourceFacts()
    with pytest.raises(ItemError) as err:
        transform(data, ImageConfig(size=16, max_pixels=400 * 300 - 1), facts=facts)
    assert err.value.status == Status.DECOMPRESSION_BOMB and facts.decoder == ""  # nothing decoded


def test_draft_off_is_exactly_pillow():
    data = jpeg(PHOTO)
    out, decoder = run(data, size=(48, 64), draft=False)
    assert decoder == "pillow"
    np.testing.assert_array_equal(out, run(data, size=(48, 64), draft=False, decoder="pillow")[0])


def test_forced_pillow_and_facts():
    data = jpeg(PHOTO)
    facts = SourceFacts()
    transform(data, ImageConfig(size=16, decoder="pillow"), facts=facts)
    assert (facts.width, facts.height, facts.format, facts.decoder) == (410, 300, "jpeg", "pillow")
    transform(data, ImageConfig(size=16), facts=facts)
    assert (facts.width, facts.height, facts.format, facts.decoder) == (410, 300, "jpeg", "simplejpeg")


def test_threads_give_identical_results():
    from concurrent.futures import ThreadPoolExecutor

    blobs = [images.jpeg_bytes(150 + i, 120, seed=i) for i in range(16)]
    cfg = ImageConfig(size=32)
    serial = [transform(b, cfg) for b in blobs]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda b: transform(b, cfg), blobs * 4))
    for i, out in enumerate(parallel):
        np.testing.assert_array_equal(out, serial[i % 16])
