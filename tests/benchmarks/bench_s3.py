"""S3 against moto on loopback: conversion images/s S3->S3 vs local->local, upload MB/s vs s3fs.put.

    python tests/benchmarks/bench_s3.py [--quick] [--images N] [--repeat R] [--upload-mb 8,64,160]

Same run, same machine, same corpus, same LocalCluster (2 workers x 1 thread): the corpus is
converted local folder -> local HDF5 and S3 prefix -> S3 HDF5 (moto's server in its own process
on 127.0.0.1), interleaved, `repeat` times each, fresh output every time; figures are the median.
The upload path is `Store.publish` (convert.store.s3) (checksummed PUT, or multipart above 32 MiB, then a
size check) against `s3fs.put_file` of the same local file, interleaved, median MB/s.
moto keeps objects in memory and is CPU-bound on this box: absolute S3 figures are a floor for a
real endpoint, the ratios are what to read.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from convert.store import open_store
from convert.store.s3 import PART_SIZE
from convert.config import load_config
from convert import run
from convert.testing import images as gen
from convert.testing.s3 import MotoServer


def corpus(root: Path, count: int) -> None:
    per_class = max(1, count // 4)
    gen.write_image_folder(root, {c: per_class for c in ("ant", "bee", "cow", "dog")}, size=(320, 240))


def convert_once(source: str, output: str, opts: dict | None, scheduler: str) -> float:
    overrides = {
        "source.uri": source,
        "output.uri": output,
        "image.size": [64, 64],
        "shard.size": 100,
        "cluster.scheduler": scheduler,
        "run.overwrite": True,
    }
    if opts:
        overrides.update({"source.storage_options": opts, "output.storage_options": opts})
    summary = run(load_config(None, overrides), log=lambda m: None)
    assert summary.exit_code() == 0, summary.failed_shards
    return summary.items_ok / summary.seconds


def bench_conversion(moto: MotoServer, work: Path, images: int, repeat: int, scheduler: str) -> dict[str, float]:
    src = work / "corpus"
    corpus(src, images)
    fs = moto.filesystem()
    for path in sorted(src.rglob("*.jpg")):
        fs.pipe_file(f"bench/in/{path.relative_to(src).as_posix()}", path.read_bytes())
    opts = moto.storage_options()
    ceiling = get_ceiling(fs, opts)
    local, remote = [], []
    for i in range(repeat):
        local.append(convert_once(str(src), str(work / f"out-{i}"), None, scheduler))
        remote.append(convert_once("s3://bench/in", f"s3://bench/out-{i}", opts, scheduler))
    return {"local": statistics.median(local), "s3": statistics.median(remote), "ceiling": ceiling}


def get_ceiling(fs: object, opts: dict) -> float:
    """GETs/s moto serves to 16 threads of this process through the same fetch path (no decoding)."""
    from concurrent.futures import ThreadPoolExecutor

    from convert.fetch import FetchPolicy, fetch_bytes

    keys = sorted(fs.find("bench/in"))  # type: ignore[attr-defined]
    policy = FetchPolicy(storage_options=opts, allowed_schemes=("s3",))
    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: fetch_bytes(f"s3://{k}", policy), keys))
    return len(keys) / (time.perf_counter() - start)


def bench_upload(moto: MotoServer, work: Path, size_mb: int, repeat: int) -> dict[str, float]:
    path = work / f"blob-{size_mb}.bin"
    with open(path, "wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(2**20))
    size = path.stat().st_size
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    out = open_store("s3://bench/up", moto.storage_options())
    fs = moto.filesystem()
    ours, theirs = [], []
    for i in range(repeat):
        t = time.perf_counter()
        out.publish(str(path), f"ours-{i}.bin", size, digest)
        ours.append(size / 2**20 / (time.perf_counter() - t))
        t = time.perf_counter()
        fs.put_file(str(path), f"bench/up/s3fs-{i}.bin")
        theirs.append(size / 2**20 / (time.perf_counter() - t))
        fs.rm([f"bench/up/ours-{i}.bin", f"bench/up/s3fs-{i}.bin"])
    return {"ours": statistics.median(ours), "s3fs": statistics.median(theirs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 images, 2 repeats, uploads of 8 and 40 MB")
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--upload-mb", default="8,64,160")
    parser.add_argument("--only", choices=["convert", "upload"], help="run one half")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeat, args.upload_mb = 200, 2, "8,40"
    from distributed import LocalCluster

    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus; moto S3 on 127.0.0.1; median of {args.repeat}"
    )
    with (
        MotoServer() as moto,
        tempfile.TemporaryDirectory() as tmp,
        LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0") as cluster,
    ):
        moto.make_bucket("bench")
        work = Path(tmp)
        if args.only != "upload":
            conv = bench_conversion(moto, work, args.images, args.repeat, cluster.scheduler_address)
            print(f"conversion, {args.images} JPEG 320x240 -> 64x64 HDF5, 100/shard, 2 workers:")
            print(f"  local -> local  {conv['local']:8.0f} images/s")
            print(f"  S3    -> S3     {conv['s3']:8.0f} images/s   ({conv['s3'] / conv['local']:.2f}x local)")
            print(f"  (moto's GET ceiling, fetch only, 16 threads: {conv['ceiling']:.0f} objects/s)")
        if args.only == "convert":
            return
        print(f"upload of one shard file (publish: single PUT up to {2 * PART_SIZE >> 20} MiB, else multipart):")
        for mb in (int(x) for x in args.upload_mb.split(",")):
            up = bench_upload(moto, work, mb, args.repeat)
            print(
                f"  {mb:4d} MB  publish {up['ours']:7.1f} MB/s   s3fs.put_file {up['s3fs']:7.1f} MB/s   "
                f"({up['ours'] / up['s3fs']:.2f}x)"
            )


if __name__ == "__main__":
    main()
