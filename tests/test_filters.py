"""Filters (image.min_size / max_aspect_ratio / max_area), aspect-preserving resizes and upscale: false,
and the read side turning `encode: original` images upright.

Real images from convert.testing.images; expected shapes are written out by hand (img2dataset's
keep_ratio arithmetic: shorter/longer side -> S, the other round(side * S / that side), half to even),
references are computed with Pillow directly.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps
from pydantic import ValidationError

from convert import run
from convert.config import ConfigError, ImageConfig, load_config
from convert.dataset import open_dataset
from convert.decoders import decode_stored
from convert.specs import ItemError, Status
from convert.testing import images
from convert.timing import StageClock
from convert.transform import SourceFacts, output_shape, transform

pytest.importorskip("simplejpeg")
DECODERS = ["simplejpeg", "pillow"]
BICUBIC = Image.Resampling.BICUBIC


def jpeg(w: int, h: int, seed: int = 0) -> bytes:
    return images.jpeg_bytes(w, h, seed=seed, quality=92)


def outcome(data: bytes | np.ndarray, **kw: object) -> tuple[np.ndarray | bytes, SourceFacts]:
    facts = SourceFacts()
    return transform(data, ImageConfig(**kw), facts=facts), facts


def refused(data: bytes | np.ndarray, **kw: object) -> tuple[ItemError, SourceFacts, StageClock]:
    facts, clock = SourceFacts(), StageClock()
    with pytest.raises(ItemError) as err:
        transform(data, ImageConfig(**kw), clock=clock, facts=facts)
    return err.value, facts, clock


def mae(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---------------------------------------------------------------- filters

BOUNDARIES = [  # (setting, value, (w, h) kept, (w, h) filtered, reason)
    ("min_size", 64, (64, 200), (200, 63), "shorter side 63 px < image.min_size 64 (200x63)"),
    ("max_aspect_ratio", 2.0, (200, 100), (201, 100), "aspect ratio 2.01 > image.max_aspect_ratio 2 (201x100)"),
    ("max_aspect_ratio", 1.5, (100, 150), (100, 151), "aspect ratio 1.51 > image.max_aspect_ratio 1.5 (100x151)"),
    ("max_area", 10_000, (100, 100), (101, 100), "area 101x100 = 10100 px > image.max_area 10000"),
]


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("setting,value,kept,cut,reason", BOUNDARIES)
def test_filter_boundaries_jpeg(decoder, setting, value, kept, cut, reason):
    out, facts = outcome(jpeg(*kept), size=32, decoder=decoder, **{setting: value})
    assert out.shape == (32, 32, 3) and facts.decoder == decoder
    err, facts, _ = refused(jpeg(*cut), size=32, decoder=decoder, **{setting: value})
    assert err.status == Status.FILTERED and err.message == reason
    assert (facts.width, facts.height, facts.format, facts.decoder) == (*cut, "jpeg", "")  # size known, not decoded


@pytest.mark.parametrize("setting,value,kept,cut,reason", BOUNDARIES)
@pytest.mark.parametrize("kind", ["png", "array"])
def test_filter_boundaries_png_and_arrays(kind, setting, value, kept, cut, reason):
    def make(w: int, h: int) -> bytes | np.ndarray:
        img = images.photo_like(w, h, seed=1)
        return images.encode(img, "PNG") if kind == "png" else np.asarray(img)

    assert outcome(make(*kept), size=32, **{setting: value})[0].shape == (32, 32, 3)
    err, _, _ = refused(make(*cut), size=32, **{setting: value})
    assert err.status == Status.FILTERED and err.message == reason


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_filtered_image_is_never_decoded(decoder, fmt):
    """A valid header over a cut-off body: filtered (decided from the header), not decode_error."""
    data = images.cut_after_header(images.encode(images.photo_like(300, 40, seed=2), fmt))
    err, facts, clock = refused(data, size=32, decoder=decoder, min_size=41)
    assert err.status == Status.FILTERED and "shorter side 40 px" in err.message
    assert clock.seconds().get("decode", 0.0) == 0.0 and facts.decoder == ""
    err, _, _ = refused(data, size=32, decoder=decoder, min_size=40)  # kept by the filter: decoding fails
    assert err.status == Status.DECODE_ERROR


def test_filters_apply_to_original_encoding_and_exif_rotation():
    data = images.exif_rotated_jpeg(200, 63, 6)  # upright 63x200: the filters are rotation-invariant
    err, _, _ = refused(data, encode="original", min_size=64)
    assert err.status == Status.FILTERED and err.message.startswith("shorter side 63 px")
    assert transform(data, ImageConfig(encode="original", min_size=63, max_aspect_ratio=3.2)) == data


def test_bomb_cap_is_checked_before_filters():
    err, _, _ = refused(jpeg(300, 200), size=32, max_pixels=1000, max_area=100)
    assert err.status == Status.DECOMPRESSION_BOMB


def test_keep_ratio_output_is_capped_by_max_pixels():
    """A sliver upscaled to keep_ratio would be 512 x 1,024,000: refused from the header, not an OOM."""
    sliver = images.encode(images.photo_like(1, 2000), "PNG")
    err, _, _ = refused(sliver, size=512, resize="keep_ratio")
    assert err.status == Status.DECOMPRESSION_BOMB and "would resize to 512x1024000" in err.message
    assert transform(sliver, ImageConfig(size=512, resize="keep_ratio", upscale=False)).shape == (2000, 1, 3)


def test_filter_settings_are_validated():
    for bad in ({"min_size": -1}, {"max_aspect_ratio": 0.5}, {"max_area": 0}):
        with pytest.raises(ValidationError):
            ImageConfig(**bad)
    assert ImageConfig().min_size == 0 and ImageConfig().max_area is None  # off by default


# ---------------------------------------------------------------- resize modes x upscale

MODES = ["stretch", "center_crop", "pad", "keep_ratio", "keep_ratio_largest", "none"]
# output (H, W) for target 64, per source (w, h) and (mode, upscale)
EXPECTED = {
    (300, 200): {
        "stretch": ((64, 64),) * 2,
        "center_crop": ((64, 64),) * 2,
        "pad": ((64, 64),) * 2,
        "keep_ratio": ((64, 96),) * 2,
        "keep_ratio_largest": ((43, 64),) * 2,
        "none": ((200, 300),) * 2,
    },
    (50, 30): {
        "stretch": ((64, 64), (30, 50)),
        "center_crop": ((64, 64), (30, 50)),
        "pad": ((64, 64),) * 2,
        "keep_ratio": ((64, 107), (30, 50)),
        "keep_ratio_largest": ((38, 64), (30, 50)),
        "none": ((30, 50),) * 2,
    },
    (100, 40): {
        "stretch": ((64, 64), (40, 64)),
        "center_crop": ((64, 64), (40, 64)),
        "pad": ((64, 64),) * 2,
        "keep_ratio": ((64, 160), (40, 100)),
        "keep_ratio_largest": ((26, 64),) * 2,
        "none": ((40, 100),) * 2,
    },
}


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("upscale", [True, False])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("src", sorted(EXPECTED))
def test_every_mode_and_upscale_shape(src, mode, upscale, decoder):
    size = None if mode == "none" else 64
    out, facts = outcome(jpeg(*src, seed=3), size=size, resize=mode, upscale=upscale, decoder=decoder)
    assert facts.decoder == decoder
    assert out.shape == (*EXPECTED[src][mode][0 if upscale else 1], 3)
    fixed = output_shape(ImageConfig(size=size, resize=mode, upscale=upscale))
    assert fixed is None or fixed == out.shape  # a declared fixed shape is what every image gets


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("mode", ["keep_ratio", "keep_ratio_largest"])
@pytest.mark.parametrize("src", [(640, 480), (480, 640), (90, 50)])
def test_keep_ratio_pixels_match_pillow(src, mode, decoder):
    """Aspect kept, nothing cropped: the whole (upscaled or drafted) image, close to a full Pillow resize."""
    data = jpeg(*src, seed=4)
    out, facts = outcome(data, size=64, resize=mode, decoder=decoder)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    ref = np.asarray(full.resize((out.shape[1], out.shape[0]), BICUBIC))
    assert facts.decoder == decoder and mae(out, ref) <= 6.0


@pytest.mark.parametrize("decoder", DECODERS)
def test_keep_ratio_still_uses_the_dct_scaled_decode(decoder):
    data = jpeg(800, 600, seed=5)
    fast = transform(data, ImageConfig(size=64, resize="keep_ratio", decoder=decoder))
    exact = transform(data, ImageConfig(size=64, resize="keep_ratio", draft=False))
    assert fast.shape == exact.shape == (64, 85, 3)
    assert not np.array_equal(fast, exact) and mae(fast, exact) <= 4.0  # decoded at 1/8 (100x75 >= 85x64)


def test_keep_ratio_rounds_half_to_even_and_keeps_one_pixel():
    png = images.encode(images.photo_like(10, 4), "PNG")
    assert transform(png, ImageConfig(size=5, resize="keep_ratio")).shape == (5, 12, 3)  # 12.5 -> 12
    sliver = images.encode(images.photo_like(1, 300), "PNG")
    assert transform(sliver, ImageConfig(size=64, resize="keep_ratio_largest")).shape == (64, 1, 3)


def test_keep_ratio_exif_rotated_uses_the_upright_sides():
    out, facts = outcome(images.exif_rotated_jpeg(300, 200, 6), size=64, resize="keep_ratio")
    assert facts.decoder == "simplejpeg" and out.shape == (96, 64, 3)


def test_upscale_false_center_crop_and_pad_do_not_resample():
    src = images.photo_like(100, 40, seed=6)
    png = images.encode(src, "PNG")
    crop = transform(png, ImageConfig(size=64, resize="center_crop", upscale=False))
    np.testing.assert_array_equal(crop, np.asarray(src)[:, 18:82])
    small = images.encode(src.crop((0, 0, 50, 40)), "PNG")
    pad = transform(small, ImageConfig(size=64, resize="pad", upscale=False))
    np.testing.assert_array_equal(pad[12:52, 7:57], np.asarray(src)[:, :50])
    assert (pad[:12] == 0).all() and (pad[:, :7] == 0).all()


def test_output_shape_is_variable_for_varying_modes():
    assert output_shape(ImageConfig(size=64, resize="keep_ratio")) is None
    assert output_shape(ImageConfig(size=64, resize="keep_ratio_largest")) is None
    assert output_shape(ImageConfig(size=(48, 64), resize="stretch", upscale=False)) is None
    assert output_shape(ImageConfig(size=(48, 64), resize="center_crop", upscale=False)) is None
    assert output_shape(ImageConfig(size=(48, 64), resize="pad", upscale=False)) == (48, 64, 3)
    assert output_shape(ImageConfig(size=(48, 64), resize="center_crop")) == (48, 64, 3)


def test_keep_ratio_takes_one_length():
    assert ImageConfig(size=[256], resize="keep_ratio").size == ImageConfig(size=[256, 256], resize="keep_ratio").size
    with pytest.raises(ConfigError) as err:
        load_config(
            None, {"source.uri": "in", "output.uri": "out", "image.resize": "keep_ratio", "image.size": [48, 6]}
        )
    assert "takes one length, the shorter side's (image.size: 48, not [48, 6])" in str(err.value)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- end to end, and the read side


def _convert(src, out, fmt: str, **settings: object) -> None:
    overrides = {"source.uri": str(src), "output.uri": str(out), "output.format": fmt, "shard.size": 4}
    overrides.update({"cluster.kind": "threads", "cluster.workers": 1, **settings})
    assert run(load_config(None, overrides), log=lambda m: None).exit_code() == 0


SOURCES = {"a/wide": (120, 60), "a/tall": (50, 100), "a/small": (40, 30), "b/tiny": (40, 19), "b/square": (70, 70)}
SOURCES["b/long"] = (200, 40)


@pytest.mark.parametrize("fmt", ["hdf5", "lmdb"])
def test_keep_ratio_and_filters_end_to_end(tmp_path, fmt):
    for i, (name, wh) in enumerate(SOURCES.items()):
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / f"{name}.jpg").write_bytes(jpeg(*wh, seed=i))
    settings = {"image.resize": "keep_ratio", "image.size": 48, "image.upscale": False}
    _convert(tmp_path / "src", tmp_path / "out", fmt, **settings, **{"image.min_size": 20, "image.max_aspect_ratio": 4})
    ds = open_dataset(str(tmp_path / "out"))
    shapes = {ds[i]["key"]: ds[i]["image"].shape[:2] for i in range(len(ds))}
    assert shapes == {"a/wide.jpg": (48, 96), "a/tall.jpg": (96, 48), "a/small.jpg": (30, 40), "b/square.jpg": (48, 48)}
    ledger = ds.ledger()
    rows = zip(ledger["key"], ledger["status"], ledger["error"], strict=True)
    assert {k: e for k, s, e in rows if s == "filtered"} == {
        "b/tiny.jpg": "shorter side 19 px < image.min_size 20 (40x19)",
        "b/long.jpg": "aspect ratio 5 > image.max_aspect_ratio 4 (200x40)",
    }
    row = ledger["key"].index("b/tiny.jpg")  # the header was read: the source columns are filled
    assert (ledger["width"][row], ledger["height"][row], ledger["src_format"][row]) == (40, 19, "jpeg")


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("WEBP", "RGB")])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_reader_turns_original_bytes_upright(fmt, mode, orientation):
    """Issue 20.5: what `encode: original` stored reads back as the write side decodes it (JPEG
    through simplejpeg, PNG/WebP through Pillow)."""
    src = images.photo_like(120, 80, seed=7).convert(mode)
    data = images.exif_rotated(src, fmt, orientation)
    arr = decode_stored(data)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    upright = upright[:, :, None] if upright.ndim == 2 else upright
    channels = 1 if mode == "L" else 3
    want = (80, 120, channels) if orientation == 3 else (120, 80, channels)
    assert arr.shape == want and mae(arr, upright) <= (1.0 if fmt == "JPEG" else 0.0)
    written = transform(data, ImageConfig(resize="none", size=None, mode=mode))
    assert mae(arr, written) <= 1.0


def test_reader_turns_original_bytes_upright_end_to_end(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "rotated.jpg").write_bytes(images.exif_rotated_jpeg(120, 80, 6, seed=8))
    (tmp_path / "src" / "a" / "gray.jpg").write_bytes(images.encode(images.photo_like(60, 30).convert("L"), "JPEG"))
    _convert(tmp_path / "src", tmp_path / "out", "hdf5", **{"image.encode": "original"})
    ds = open_dataset(str(tmp_path / "out"))
    items = {ds[i]["key"]: ds[i]["image"] for i in range(len(ds))}
    assert items["a/rotated.jpg"].shape == (120, 80, 3) and items["a/gray.jpg"].shape == (30, 60, 1)
