"""Generated test images: photo-like content in every mode and container the pipeline handles.

Deterministic from a seed so tests and benchmarks can regenerate the same corpus anywhere.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth RGB gradient with noise and shapes: compresses like a photo, not like flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.28)]
    base = np.stack(
        [
            127 + 100 * np.sin(x * fx + phase),
            127 + 100 * np.cos(y * fy + phase),
            127 + 100 * np.sin((x + y) * (fx + fy) / 2),
        ],
        axis=-1,
    )
    noise = rng.normal(0, 12, (height, width, 3))
    arr = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img


def encode(img: Image.Image, fmt: str = "JPEG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg_bytes(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    return encode(photo_like(width, height, seed), "JPEG", quality=quality)


def exif_rotated_jpeg(width: int, height: int, orientation: int = 6, seed: int = 0) -> bytes:
    """A JPEG whose stored pixels need EXIF `orientation` applied to display upright."""
    img = photo_like(width, height, seed)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def exif_rotated(img: Image.Image, fmt: str, orientation: int = 6) -> bytes:
    """`img` encoded as `fmt` (JPEG, PNG, WEBP) carrying EXIF `orientation`, losslessly where the format allows."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    kw: dict[str, object] = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    return encode(img, fmt, exif=exif.tobytes(), **kw)


def cut_after_header(data: bytes, keep: int = 40) -> bytes:
    """A JPEG or PNG whose header is intact and whose pixel data stops `keep` bytes into the first
    scan (JPEG SOS) or IDAT chunk: its size is readable, but decoding it fails."""
    marker = b"\xff\xda" if data[:2] == b"\xff\xd8" else b"IDAT"
    return data[: data.index(marker) + keep]


def variants(seed: int = 0) -> dict[str, bytes]:
    """One encoded image per mode/container the decoder must handle."""
    rgb = photo_like(120, 90, seed)
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.full((90, 120), 128, np.uint8)))
    arr16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return {
        "rgb.jpg": encode(rgb, "JPEG", quality=92),
        "gray.jpg": encode(rgb.convert("L"), "JPEG", quality=92),
        "rgba.png": encode(rgba, "PNG"),
        "palette.png": encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG", quality=92),
        "gray16.png": encode(Image.fromarray(arr16), "PNG"),
        "rgb.webp": encode(rgb, "WEBP", quality=90),
        "exif6.jpg": exif_rotated_jpeg(120, 90, 6, seed),
    }


def bad_files() -> dict[str, bytes]:
    """Inputs that must become per-item errors, not crashes."""
    good = jpeg_bytes(64, 48, seed=1)
    return {
        "zero.jpg": b"",
        "text.jpg": b"this is not an image\n" * 10,
        "truncated.jpg": good[: len(good) // 3],
        "corrupt.jpg": good[:200] + bytes(300) + good[500:],
    }


def bomb_png(side: int = 20000) -> bytes:
    """A tiny PNG that decodes to side*side pixels (a decompression bomb for low caps)."""
    return encode(Image.new("L", (side, side)), "PNG", optimize=True)


def write_image_folder(
    root: str | Path, classes: dict[str, int], size: tuple[int, int] = (96, 72), seed: int = 0
) -> list[Path]:
    """Write an ImageFolder tree root/<class>/<i>.jpg; returns paths in sorted order."""
    root = Path(root)
    paths = []
    n = 0
    for cls in sorted(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(classes[cls]):
            p = root / cls / f"img_{i:04d}.jpg"
            w = size[0] + (n % 5) * 8
            h = size[1] + (n % 3) * 8
            p.write_bytes(jpeg_bytes(w, h, seed=seed + n))
            paths.append(p)
            n += 1
    return sorted(paths)


def write_corpus(root: str | Path, count: int, min_side: int = 200, max_side: int = 600, seed: int = 0) -> list[Path]:
    """A flat folder of `count` photo-like JPEGs of varied sizes (benchmarks)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        p = root / f"{i:06d}.jpg"
        p.write_bytes(jpeg_bytes(w, h, seed=seed + i, quality=85))
        paths.append(p)
    return paths
