"""transform(): decoding every input kind, errors as ItemError, geometry per resize mode, encodings.

References are computed directly with Pillow (Image.open / ImageOps.exif_transpose / resize), not
through convert.transform, so a wrong choice in the pipeline shows up as a mismatch.
"""

from __future__ import annotations

import io
import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from convert.config import ImageConfig
from convert.specs import ItemError, Status
from convert.testing import images
from convert.geometry import needed_size
from convert.transform import output_shape, transform

BICUBIC = Image.Resampling.BICUBIC


def cfg(**kw) -> ImageConfig:
    return ImageConfig(**kw)


def pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def status_of(data, config: ImageConfig) -> Status:
    with pytest.raises(ItemError) as info:
        transform(data, config)
    return info.value.status


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", sorted(images.variants()))
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_every_variant_decodes_to_mode_and_shape(name: str, mode: str) -> None:
    data = images.variants()[name]
    channels = 3 if mode == "RGB" else 1
    out = transform(data, cfg(mode=mode, size=(40, 50), resize="center_crop"))
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8
    assert out.shape == (40, 50, channels)
    assert out.std() > 5  # real content, not a blank canvas
    kept = transform(data, cfg(mode=mode, resize="none", size=None))
    upright = (120, 90) if name.startswith("exif6") else (90, 120)
    assert kept.shape == (*upright, channels)


def test_rgba_is_composited_over_pad_color() -> None:
    data = images.variants()["rgba.png"]  # alpha 128 everywhere
    rgb = np.asarray(pil(data).convert("RGB")).astype(np.float64)
    alpha = 128 / 255
    for fill in [(0, 0, 0), (255, 255, 255)]:
        out = transform(data, cfg(resize="none", size=None, pad_color=fill))
        expected = rgb * alpha + np.array(fill) * (1 - alpha)
        assert np.abs(out - expected).max() <= 1.0


def test_16bit_gray_is_scaled_not_clipped() -> None:
    gray8 = np.asarray(images.photo_like(120, 90, 0).convert("L"))
    out = transform(images.variants()["gray16.png"], cfg(mode="L", resize="none", size=None))
    np.testing.assert_array_equal(out[:, :, 0], gray8)  # stored as v * 257 -> exactly v


def test_cmyk_jpeg_matches_source_colours() -> None:
    src = np.asarray(images.photo_like(120, 90, 0))
    out = transform(images.variants()["cmyk.jpg"], cfg(resize="none", size=None))
    assert mae(out, src) < 6


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_imageops(orientation: int) -> None:
    data = images.exif_rotated_jpeg(120, 90, orientation)
    ref = np.asarray(ImageOps.exif_transpose(pil(data)).convert("RGB"))
    out = transform(data, cfg(resize="none", size=None, draft=False))
    np.testing.assert_array_equal(out, ref)


def test_exif6_with_draft_shrinks_the_upright_image() -> None:
    data = images.exif_rotated_jpeg(480, 320, 6)  # upright: 320 wide, 480 tall
    upright = ImageOps.exif_transpose(pil(data)).convert("RGB")
    ref = np.asarray(upright.resize((40, 60), BICUBIC))
    out = transform(data, cfg(size=(60, 40), resize="stretch", draft=True))
    assert out.shape == (60, 40, 3)
    assert mae(out, ref) < 4


@pytest.mark.parametrize("name", sorted(images.bad_files()))
@pytest.mark.parametrize("encode", ["raw", "original"])
def test_bad_files_are_decode_errors(name: str, encode: str) -> None:
    assert status_of(images.bad_files()[name], cfg(encode=encode)) is Status.DECODE_ERROR


def test_truncated_scan_data_is_an_error_even_with_draft() -> None:
    data = images.jpeg_bytes(300, 200)
    for draft in (True, False):
        assert status_of(data[: len(data) * 3 // 4], cfg(draft=draft)) is Status.DECODE_ERROR


def test_bomb_is_an_item_error_without_warnings() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = status_of(images.bomb_png(4000), cfg(max_pixels=1_000_000))
    assert status is Status.DECOMPRESSION_BOMB
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_pixel_cap_is_per_config_not_pillow_global(monkeypatch: pytest.MonkeyPatch) -> None:
    data = images.jpeg_bytes(100, 80)
    assert status_of(data, cfg(max_pixels=7999)) is Status.DECOMPRESSION_BOMB
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # would make Image.open warn/raise
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert transform(data, cfg(max_pixels=8000)).shape == (64, 64, 3)


def test_array_bomb_and_bad_arrays() -> None:
    assert status_of(np.zeros((100, 100, 3), np.uint8), cfg(max_pixels=9999)) is Status.DECOMPRESSION_BOMB
    assert status_of(np.zeros((10, 10, 3), np.float32), cfg()) is Status.DECODE_ERROR
    assert status_of(np.zeros((10, 10, 2), np.uint8), cfg()) is Status.DECODE_ERROR


def test_concurrent_threads_use_their_own_caps() -> None:
    bomb, good = images.bomb_png(3000), images.jpeg_bytes(200, 150)
    jobs = [(bomb, cfg(max_pixels=10**6)), (good, cfg(max_pixels=10**6)), (bomb, cfg(max_pixels=10**7))] * 4

    def run(job):
        try:
            return transform(*job).shape
        except ItemError as exc:
            return exc.status

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, jobs))
    assert results == [Status.DECOMPRESSION_BOMB, (64, 64, 3), (64, 64, 3)] * 4


def test_array_input_is_pixels() -> None:
    rng = np.random.default_rng(0)
    row = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # a CIFAR record
    np.testing.assert_array_equal(transform(row, cfg(resize="none", size=None)), row)
    ref = np.asarray(Image.fromarray(row).resize((64, 64), BICUBIC))
    np.testing.assert_array_equal(transform(row, cfg(size=64, resize="stretch")), ref)
    gray = transform(row[:, :, 0], cfg(mode="L", resize="none", size=None))
    np.testing.assert_array_equal(gray[:, :, 0], row[:, :, 0])
    png = transform(row, cfg(encode="original"))
    np.testing.assert_array_equal(np.asarray(pil(png)), row)  # "original" pixels, losslessly


# ---------------------------------------------------------------- geometry


def test_stretch_equals_direct_pillow_without_draft() -> None:
    for data in (images.jpeg_bytes(333, 251, seed=3), images.encode(images.photo_like(500, 90, 4), "PNG")):
        ref = np.asarray(pil(data).convert("RGB").resize((48, 64), BICUBIC, reducing_gap=3.0))
        np.testing.assert_array_equal(transform(data, cfg(size=(64, 48), resize="stretch", draft=False)), ref)


def test_draft_is_used_and_stays_close() -> None:
    data = images.jpeg_bytes(600, 480, seed=5)
    ref = np.asarray(pil(data).convert("RGB").resize((64, 64), BICUBIC))
    fast = transform(data, cfg(size=64, resize="stretch", draft=True))
    slow = transform(data, cfg(size=64, resize="stretch", draft=False))
    assert not np.array_equal(fast, slow)  # the DCT-domain path really ran
    assert mae(fast, ref) < 4


@given(
    w=st.integers(8, 300),
    h=st.integers(8, 300),
    tw=st.integers(1, 100),
    th=st.integers(1, 100),
    orientation=st.integers(1, 8),
    resize=st.sampled_from(["stretch", "center_crop", "pad", "keep_ratio", "keep_ratio_largest"]),
    upscale=st.booleans(),
)
@settings(max_examples=100, deadline=None)
def test_draft_request_keeps_enough_pixels(w, h, tw, th, orientation, resize, upscale) -> None:
    """A real JPEG drafted with the requested size still covers what the resize mode needs."""
    if resize.startswith("keep_ratio"):
        th = tw  # one length
    need = needed_size((w, h), orientation, cfg(size=(th, tw), resize=resize, upscale=upscale))
    img = pil(images.encode(Image.new("RGB", (w, h)), "JPEG"))
    if need is not None:
        img.draft("RGB", need)
    dw, dh = img.size
    if orientation >= 5:  # compare in the upright orientation
        w, h, dw, dh = h, w, dh, dw
    if resize == "pad":
        k = min(tw / w, th / h)
        want = (round(w * k), round(h * k))
    elif resize == "center_crop":
        k = max(tw / w, th / h)
        want = (math.ceil(w * k - 1e-9), math.ceil(h * k - 1e-9))
    elif resize.startswith("keep_ratio"):
        k = tw / (min(w, h) if resize == "keep_ratio" else max(w, h))
        want = (round(w * k), round(h * k))
    else:
        want = (tw, th)
    assert dw >= min(w, want[0]) and dh >= min(h, want[1])


def thirds(size: tuple[int, int], vertical: bool) -> bytes:
    """Red | green (half the length) | blue bands, as lossless PNG."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    n = (h if vertical else w) // 4
    sl = [slice(0, n), slice(n, 3 * n), slice(3 * n, None)]
    for band, colour in zip(sl, [(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        if vertical:
            arr[band] = colour
        else:
            arr[:, band] = colour
    return images.encode(Image.fromarray(arr), "PNG")


@pytest.mark.parametrize("vertical", [False, True])
def test_center_crop_keeps_the_centre(vertical: bool) -> None:
    data = thirds((100, 400) if vertical else (400, 100), vertical)
    out = transform(data, cfg(size=(32, 48), resize="center_crop"))
    assert out.shape == (32, 48, 3)
    np.testing.assert_array_equal(out.reshape(-1, 3), np.tile([0, 255, 0], (32 * 48, 1)))


def test_center_crop_equals_cover_then_crop() -> None:
    data = images.encode(images.photo_like(300, 200, 7), "PNG")
    src = pil(data).convert("RGB")
    cover = src.resize((96, 64), BICUBIC)  # scale 64/200 covers 64x64
    ref = np.asarray(cover.crop((16, 0, 80, 64)))
    assert mae(transform(data, cfg(size=64, resize="center_crop")), ref) < 3


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_pad_letterboxes_with_pad_color(mode: str) -> None:
    red = images.encode(Image.new("RGB", (200, 100), (255, 0, 0)), "PNG")
    fill = (10, 20, 200)
    out = transform(red, cfg(size=64, resize="pad", pad_color=fill, mode=mode))
    fill_px = np.asarray(Image.new("RGB", (1, 1), fill).convert(mode)).reshape(-1)
    red_px = np.asarray(Image.new("RGB", (1, 1), (255, 0, 0)).convert(mode)).reshape(-1)
    assert out.shape == (64, 64, 3 if mode == "RGB" else 1)
    assert (out[:16] == fill_px).all() and (out[48:] == fill_px).all()  # 64x32 content, centred
    assert (out[16:48] == red_px).all()


def test_pad_tall_source_borders_left_and_right() -> None:
    data = images.encode(Image.new("RGB", (50, 200), (0, 255, 0)), "PNG")
    out = transform(data, cfg(size=(40, 40), resize="pad", pad_color=(9, 9, 9)))
    assert (out[:, :15] == 9).all() and (out[:, 25:] == 9).all()
    assert (out[:, 15:25] == [0, 255, 0]).all()


# ---------------------------------------------------------------- output


def test_output_shape() -> None:
    assert output_shape(cfg(size=(30, 40))) == (30, 40, 3)
    assert output_shape(cfg(size=(30, 40), mode="L", resize="pad")) == (30, 40, 1)
    assert output_shape(cfg(resize="none", size=None)) is None
    assert output_shape(cfg(encode="jpeg")) is None
    data = images.jpeg_bytes(90, 70)
    for resize in ("stretch", "center_crop", "pad"):
        for mode in ("RGB", "L"):
            c = cfg(size=(30, 40), resize=resize, mode=mode)
            assert transform(data, c).shape == output_shape(c)


@pytest.mark.parametrize("encode,fmt", [("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_encode_round_trip(encode: str, fmt: str) -> None:
    data = images.jpeg_bytes(300, 200, seed=2)
    raw = transform(data, cfg(size=(48, 64)))
    blob = transform(data, cfg(size=(48, 64), encode=encode))
    assert isinstance(blob, bytes)
    img = pil(blob)
    assert img.format == fmt and img.size == (64, 48)
    back = np.asarray(img.convert("RGB"))
    if encode == "png":
        np.testing.assert_array_equal(back, raw)
    else:
        assert mae(back, raw) < 6


def test_original_returns_input_bytes() -> None:
    data = images.variants()["rgb.webp"]
    assert transform(data, cfg(encode="original")) == data
    assert transform(bytearray(data), cfg(encode="original")) == data


@pytest.mark.parametrize("encode", ["jpeg", "webp"])
def test_quality_is_honoured(encode: str) -> None:
    data = images.jpeg_bytes(300, 200, seed=2)
    sizes = [len(transform(data, cfg(size=128, encode=encode, quality=q))) for q in (20, 60, 95)]
    assert sizes[0] < sizes[1] < sizes[2]
