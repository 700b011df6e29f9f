"""Append of 1 % new rows to an N-row list vs a full run of the grown list (issue 23: <= 2 %).

    flock /tmp/bench.lock python tests/benchmarks/bench_append.py [--count 1000000] [--root /tmp/bench-append]

The list: N rows over 100 tiny PNGs (4x4..13x10) resized to 4x4, 1000 per shard, default cluster
(`cluster.kind: auto`). Same run, same machine: (1) the full run over N rows (the first
generation), (2) the list grows by 1 % and `run --append` converts what is new, planning,
resume and manifest included, (3) the baseline: a full run of the grown list into a fresh
output. Printed: each time and append / full.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from convert import run
from convert.config import load_config


def images(root: Path) -> None:
    img = root / "img"
    img.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for j in range(100):
        pixels = rng.integers(0, 255, (4 + j % 7, 4 + j % 10, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(img / f"{j:03d}.png")


def timed_run(lst: Path, out: Path, append: bool = False) -> float:
    cfg = load_config(
        None,
        {"source.uri": str(lst), "output.uri": str(out), "image.size": 4, "shard.size": 1000, "run.append": append},
    )
    t = time.perf_counter()
    summary = run(cfg, log=lambda m: None)
    assert summary.exit_code() == 0, summary.failed_shards
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--root", default="/tmp/bench-append")
    args = parser.parse_args()
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    images(root)
    lst, grown = root / "list.txt", args.count + args.count // 100
    lst.write_text("".join(f"img/{i % 100:03d}.png\n" for i in range(args.count)))
    first = timed_run(lst, root / "ds")
    with lst.open("a") as f:
        f.writelines(f"img/{i % 100:03d}.png\n" for i in range(args.count, grown))
    append = timed_run(lst, root / "ds", append=True)
    full = timed_run(lst, root / "full")
    print(f"first generation: {args.count} rows in {first:.1f} s")
    print(f"append of {grown - args.count} rows (1 %): {append:.2f} s, planning and resume included")
    print(f"baseline, full run of the grown list ({grown} rows): {full:.1f} s")
    print(f"append / full run = {append / full:.2%} (target <= 2 %)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
