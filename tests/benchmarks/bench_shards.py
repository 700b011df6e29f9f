"""Per-shard costs at many shards: client memory and wall per shard of a real run, and resume,
verify, inspect and open_dataset against the number of shards.

    flock /tmp/bench.lock python tests/benchmarks/bench_shards.py [--runs 100,1000,3000]
                                                                   [--synth 1000,10000,100000] [--moto 1000,5000]

runs   `python -m convert run` with the DEFAULT LocalCluster (client and scheduler in one process),
       10 tiny 32x32 JPEGs per shard from nginx on 127.0.0.1: client peak RSS, its slope per completed
       shard, wall per shard, and a rerun with nothing to do (a resume). Ratios against the smallest N.
synth  an output of N shards SYNTHESISED with the project's own writers (one real 10-item shard
       converted once, its bytes published N times under N names, each with its record written by
       `records.write_record` and the index by `ShardTable` + `write_manifest`, as a run does): then
       seconds of resume (`convert.resume.resume`, what `run` calls), `verify`, `inspect` (CLI,
       includes ~1 s of interpreter start) and `open_dataset`, and their slope per shard.
moto   the same resume on S3 (moto's server on 127.0.0.1).
The machine is shared: read slopes and ratios of the same run, not absolute figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_pipeline import serve
from bench_scale import timed, write_txt

from convert.config import load_config
from convert.dataset import open_dataset
from convert.manifest import ShardIndex, write_manifest
from convert.orchestrate import run
from convert.records import (
    ordered_map,
    read_record_full,
    shard_rel_path,
    write_record,
)
from convert.resume import fill_identities, resume
from convert.shards import verify
from convert.shardtable import ShardTable
from convert.store import Store, open_store
from convert.summary import LedgerTally
from convert.testing import images as gen
from convert.testing.s3 import MotoServer

PER_SHARD = 10


def seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def real_runs(ns: list[int], tmp: Path) -> None:
    www = tmp / "www"
    for j in range(100):
        (www / "img").mkdir(parents=True, exist_ok=True)
        (www / "img" / f"{j:03d}.jpg").write_bytes(gen.jpeg_bytes(32, 32))
    server, base, server_name = serve(www)
    print(f"runs: {server_name}, default LocalCluster, {PER_SHARD} items per shard", flush=True)
    rows = []
    try:
        for n in ns:
            lst, out = tmp / f"urls-{n}.txt", tmp / f"run-{n}"
            write_txt(lst, n * PER_SHARD, base)
            args = [
                sys.executable,
                "-m",
                "convert",
                "run",
                "--source",
                str(lst),
                "--output",
                str(out),
                "--shard-size",
                str(PER_SHARD),
                "--size",
                "32",
                "--set",
                "fetch.allowed_schemes=[http]",
                "--set",
                "image.encode=raw",
                "--set",
                "fetch.allow_private_networks=true",
            ]
            wall, res, peak = timed(args, tree=False)  # the client process alone: scheduler inside, workers not
            assert res.returncode == 0, res.stderr[-3000:]
            again, res2, _ = timed(args)
            assert res2.returncode == 0 and "0 to convert" in res2.stdout + res2.stderr, res2.stderr[-2000:]
            rows.append((n, wall, peak["client"], again))
            print(
                f"  {n:>6} shards: run {wall:6.1f} s ({1000 * wall / n:5.1f} ms/shard), client peak "
                f"{peak['client']:6.1f} MB, resume with nothing to do {again:5.1f} s",
                flush=True,
            )
    finally:
        server.terminate() if server_name.startswith("nginx") else server.stdin.close()
        server.wait(10)
    (n0, w0, m0, r0), (n1, w1, m1, r1) = rows[0], rows[-1]
    if n1 > n0:
        print(
            f"  slope {n0} -> {n1} shards: client {1024 * (m1 - m0) / (n1 - n0):.2f} kB per completed shard "
            f"(target <= 1), run {1000 * (w1 - w0) / (n1 - n0):.1f} ms per shard, resume "
            f"{1000 * (r1 - r0) / (n1 - n0):.2f} ms per shard; client RSS ratio {m1 / m0:.2f}x",
            flush=True,
        )


def seed_shard(tmp: Path) -> tuple[bytes, Any, dict[str, Any]]:
    """One real 10-item shard (bytes, record, config) converted by `run` with the thread executor."""
    gen.write_image_folder(tmp / "seed-src", {"a": PER_SHARD}, size=(32, 32))
    cfg = load_config(
        None,
        {
            "source.uri": str(tmp / "seed-src"),
            "output.uri": str(tmp / "seed"),
            "shard.size": PER_SHARD,
            "image.size": 32,
            "image.encode": "jpeg",
            "cluster.kind": "threads",
        },
    )
    assert run(cfg, log=lambda m: None).exit_code() == 0
    store = open_store(str(tmp / "seed"))
    record, _, _ = read_record_full(store, "shard-00000")
    return store.read_bytes(record.path), record, cfg.redacted()


def synthesise(store: Store, n: int, blob: bytes, seed: Any, config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """n committed shards written the way workers and the client write them; (names, fingerprints)."""
    names = [f"shard-{i:07d}" for i in range(n)]
    fps = [f"{i:064x}" for i in range(n)]
    table = ShardTable(names, fps)
    tally = LedgerTally.of(seed.ledger)

    def commit(i: int) -> Any:
        record = dataclasses.replace(seed, name=names[i], path=shard_rel_path(names[i], ".h5"))
        store.write_bytes(record.path, blob)
        write_record(store, record, fps[i])
        return record

    for record in ordered_map(commit, range(n), threads=16, window=256):
        table.add(record, tally, new=True)
    t = seconds(lambda: fill_identities(store, table))
    write_manifest(
        store,
        ShardIndex(table.index_cols()),
        config,
        None,
        "folder",
        counts={k: v * n for k, v in tally.counts.items()},
    )
    print(f"    (synthesised; the finish's identity read of {n} records took {t:.1f} s)", flush=True)
    return names, fps


def synth_costs(
    ns: list[int],
    tmp: Path,
    label: str,
    make: Callable[[int], tuple[Store, str]],
    blob: bytes,
    seed: Any,
    config: dict[str, Any],
    cli: bool,
) -> None:
    print(f"synth ({label}): {PER_SHARD}-item shards of {len(blob)} B", flush=True)
    rows = []
    for n in ns:
        store, uri = make(n)
        names, fps = synthesise(store, n, blob, seed, config)
        table = ShardTable(names, fps)
        r = {"resume": seconds(lambda: resume(store, table))}
        assert len(table) == n, (len(table), n)
        if cli:
            r["verify"] = seconds(lambda: verify(store))
            r["inspect"], res, _ = timed([sys.executable, "-m", "convert", "inspect", uri, "--json"])
            assert res.returncode == 0, res.stderr[-2000:]
            r["open"] = seconds(lambda: len(open_dataset(uri)))
        rows.append((n, r))
        print(f"  {n:>7} shards: " + ", ".join(f"{k} {v:.2f} s" for k, v in r.items()), flush=True)
    (n0, r0), (n1, r1) = rows[0], rows[-1]
    if n1 > n0:
        print(
            "  slope per shard: "
            + ", ".join(f"{k} {1e3 * (r1[k] - r0[k]) / (n1 - n0):.3f} ms" for k in r1)
            + "; projected to 10^5 shards: "
            + ", ".join(f"{k} {r1[k] + (100_000 - n1) * (r1[k] - r0[k]) / (n1 - n0):.1f} s" for k in r1),
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="100,1000,3000")
    ap.add_argument("--synth", default="1000,10000,100000")
    ap.add_argument("--moto", default="1000,5000")
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as name:
        tmp = Path(name)
        if ints(args.runs):
            real_runs(ints(args.runs), tmp)
        blob, seed, config = seed_shard(tmp)
        if ints(args.synth):
            local = lambda n: (open_store(str(tmp / f"synth-{n}")), str(tmp / f"synth-{n}"))
            synth_costs(ints(args.synth), tmp, "local", local, blob, seed, config, cli=True)
        if ints(args.moto):
            with MotoServer() as moto:
                moto.make_bucket("bench")
                opts = moto.storage_options()
                s3 = lambda n: (open_store(f"s3://bench/synth-{n}", opts), f"s3://bench/synth-{n}")
                small = blob[:4096]  # resume on S3 compares the listing's size + ETag only: no need to upload 1 MB each
                synth_costs(
                    ints(args.moto),
                    tmp,
                    "moto S3",
                    s3,
                    small,
                    dataclasses.replace(seed, bytes=len(small)),
                    config,
                    cli=False,
                )


if __name__ == "__main__":
    main()
