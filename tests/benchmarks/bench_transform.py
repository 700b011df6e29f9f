"""Single-core decode+resize rate on photo-like JPEGs: fast JPEG path, Pillow draft, full decode.

    python tests/benchmarks/bench_transform.py [--count 200] [--size 64] [--repeats 3]

All configurations run in this process on the same in-memory corpus; the figures that matter are the
ratios against full decode (the baseline). Also prints the mean absolute pixel difference to full decode.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from convert.config import ImageConfig
from convert.decoders import FAST_JPEG
from convert.testing.images import jpeg_bytes
from convert.transform import transform


def make_corpus(count: int, min_side: int = 200, max_side: int = 600, seed: int = 0) -> list[bytes]:
    """`count` photo-like JPEGs (quality 85) with sides drawn from [min_side, max_side], in memory."""
    rng = np.random.default_rng(seed)
    sides = rng.integers(min_side, max_side + 1, (count, 2))
    return [jpeg_bytes(int(w), int(h), seed=seed + i, quality=85) for i, (w, h) in enumerate(sides)]


def single_core_rate(jpegs: list[bytes], cfg: ImageConfig, repeats: int = 1) -> float:
    """Images per CPU-second for transform() over `jpegs` on the calling thread (best of `repeats`;
    CPU time, not wall time, so other load on a shared machine distorts it less)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.process_time()
        for data in jpegs:
            transform(data, cfg)
        best = min(best, time.process_time() - start)
    return len(jpegs) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--resize", default="center_crop", choices=["center_crop", "pad", "stretch"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    jpegs = make_corpus(args.count)
    mean_kib = sum(map(len, jpegs)) / len(jpegs) / 1024
    print(f"corpus: {len(jpegs)} JPEGs, 200-600 px sides, mean {mean_kib:.1f} KiB; target {args.size}x{args.size}")
    base = ImageConfig(size=args.size, resize=args.resize)
    full_cfg = base.model_copy(update={"draft": False})
    variants = {"pillow draft": base.model_copy(update={"decoder": "pillow"})}
    if FAST_JPEG:
        variants["simplejpeg scaled"] = base.model_copy(update={"decoder": "simplejpeg"})
    single_core_rate(jpegs[:20], base)  # warm up (plugin imports, allocator)
    full = single_core_rate(jpegs, full_cfg, args.repeats)
    print(f"full decode (baseline): {full:8.1f} images/s")
    for name, cfg in variants.items():
        rate = single_core_rate(jpegs, cfg, args.repeats)
        diffs = [
            np.abs(transform(j, cfg).astype(np.int16) - transform(j, full_cfg).astype(np.int16)).mean()
            for j in jpegs[:50]
        ]
        print(
            f"{name + ':':23s} {rate:8.1f} images/s = {rate / full:.2f}x full; "
            f"mean |diff| to full over 50 images {np.mean(diffs):.2f} (max {np.max(diffs):.2f}) of 255"
        )


if __name__ == "__main__":
    main()
