"""Export throughput: `convert.export.export_webdataset` beside webdataset's own `ShardWriter` fed
from `open_dataset`, on the same datasets in the same run (ratios: the machine may be shared).

    flock /tmp/bench.lock python tests/benchmarks/bench_export.py [--count 5000] [--size 64] [--repeats 3]

Two datasets of `count` generated JPEGs resized to size x size: stored as JPEG (the tars get the
stored bytes: .jpg) and as raw pixels (.npy). Both writers cut tars every 1000 items and write to
a local folder; the ShardWriter loop is what a user writes today:

    for item in open_dataset(uri, decode=False):
        sink.write({"__key__": ..., "jpg" | "npy": item["image"], "cls": item["label"]})

Columns: images/s of each (median of interleaved repeats), ours / ShardWriter, tar MB.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import webdataset as wds

from convert import run
from convert.config import load_config
from convert.dataset import open_dataset
from convert.export import escape_key, export_webdataset
from convert.testing import images as gen

MAXCOUNT = 1000


def build(root: Path, count: int, size: int, encode: str) -> str:
    src = root / "src"
    if not src.exists():
        gen.write_image_folder(src, {"a": count // 2, "b": count - count // 2}, size=(size + 16, size + 8))
    out = root / f"ds-{encode}"
    cfg = load_config(
        None,
        {
            "source.uri": str(src),
            "output.uri": str(out),
            "image.size": size,
            "image.encode": encode,
            "shard.size": 500,
            "cluster.kind": "threads",
        },
    )
    assert run(cfg, log=lambda m: None).exit_code() == 0
    return str(out)


def ours(uri: str, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    export_webdataset(uri, str(out), maxcount=MAXCOUNT)
    return time.perf_counter() - t


def shardwriter(uri: str, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t = time.perf_counter()
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=MAXCOUNT, verbose=0) as sink:
        for item in open_dataset(uri, decode=False):
            ext = "npy" if hasattr(item["image"], "shape") else "jpg"
            sink.write({"__key__": escape_key(item["key"]), ext: item["image"], "cls": item["label"]})
    return time.perf_counter() - t


def megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.tar")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        root = Path(tmp)
        print(f"{args.count} images, {args.size}x{args.size}, {MAXCOUNT} per tar, median of {args.repeats}")
        print(f"{'stored':8} {'ours img/s':>11} {'ShardWriter img/s':>18} {'ratio':>6} {'ours MB':>8} {'wds MB':>7}")
        for encode in ("jpeg", "raw"):
            uri = build(root, args.count, args.size, encode)
            n = len(open_dataset(uri))
            times: dict[str, list[float]] = {"ours": [], "wds": []}
            for _ in range(args.repeats):  # interleaved: drift on a shared machine hits both
                times["ours"].append(ours(uri, root / "ours"))
                times["wds"].append(shardwriter(uri, root / "wds"))
            a, b = (n / statistics.median(times[k]) for k in ("ours", "wds"))
            print(
                f"{encode:8} {a:11.0f} {b:18.0f} {a / b:6.2f} {megabytes(root / 'ours'):8.1f} "
                f"{megabytes(root / 'wds'):7.1f}"
            )


if __name__ == "__main__":
    main()
