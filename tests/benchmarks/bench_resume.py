"""Cost of trusting committed shards on resume, and of opening a large shard index.

    flock /work/wt/bench.lock python tests/benchmarks/bench_resume.py [--shards 100] [--repeat 5] [--index 100000]

A dataset of N shards is converted once locally and once to S3 (moto's server on 127.0.0.1).
Then, interleaved, `repeat` times each, median seconds of:
  size-only   wave 1's rule, as it was: list shards/, read each record in turn, compare the size;
  content     `committed_records` (records read concurrently; S3: ETag from the listing, local:
              inode + mtime_ns + a hash of both 64 KiB ends);
  full        `committed_records(verify=True)` (`--verify-resume`: sha256 of every shard).
Then a synthetic index of `--index` shards: seconds to read the manifest + open a Dataset, against
json.loads of the same table as wave 1's inline manifest list.
Other helpers' tests may load the machine: read the ratios (same run), not the absolute figures.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

from convert import persist
from convert.config import load_config
from convert.orchestrate import run
from convert.manifest import read_manifest, write_manifest
from convert.records import RECORD_SUFFIX, committed_records, record_rel_path
from convert.specs import ShardRecord
from convert.layout import SHARDS_DIR
from convert.store import Store, open_store
from convert.testing import images as gen
from convert.testing.s3 import MotoServer


def size_only(store: Store, names: list[str]) -> int:
    """Wave 1's resume check: one listing, then each record read sequentially, size compared."""
    listing = {e.name: e for e in store.list(SHARDS_DIR)}
    trusted = 0
    for name in names:
        if f"{name}{RECORD_SUFFIX}" not in listing:
            continue
        obj = persist.load(io.BytesIO(store.read_bytes(record_rel_path(name))))
        entry = listing.get(obj["path"].rsplit("/", 1)[-1])
        trusted += entry is not None and entry.size == obj["bytes"]
    return trusted


def build(uri: str, options: dict, source: Path, scheduler: str, shards: int) -> tuple[Store, dict[str, str]]:
    cfg = load_config(
        None,
        {
            "source.uri": str(source),
            "output.uri": uri,
            "output.storage_options": options,
            "shard.size": 8,
            "image.size": 16,
            "cluster.scheduler": scheduler,
        },
    )
    summary = run(cfg, log=lambda m: None)
    assert summary.exit_code() == 0 and summary.shards == shards, summary
    store = open_store(uri, options)
    fps = {}
    for s in read_manifest(store)["shards"]:
        fps[s["name"]] = persist.load(io.BytesIO(store.read_bytes(record_rel_path(s["name"]))))["fingerprint"]
    return store, fps


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def resume_costs(store: Store, fps: dict[str, str], repeat: int) -> dict[str, float]:
    names = list(fps)
    assert size_only(store, names) == len(names) == len(committed_records(store, fps))
    out = {"size-only": [], "content": [], "full": []}
    for _ in range(repeat):  # interleaved
        out["size-only"].append(timed(lambda: size_only(store, names), 1))
        out["content"].append(timed(lambda: committed_records(store, fps), 1))
        out["full"].append(timed(lambda: committed_records(store, fps, verify=True), 1))
    return {k: statistics.median(v) for k, v in out.items()}


def index_costs(n: int, root: Path, repeat: int) -> dict[str, float]:
    from convert.dataset import open_dataset

    records = [
        ShardRecord(
            f"shard-{i:07d}",
            f"shards/shard-{i:07d}.h5",
            "hdf5",
            1000,
            998,
            2,
            6_500_000,
            "ab" * 32,
            (64, 64, 3),
            "raw",
            stages={"fetch": 1.5, "write": 0.2},
        )
        for i in range(n)
    ]
    config = {"output": {"format": "hdf5"}}
    store = open_store(str(root / "big"))
    write_manifest(store, records, config, None, "urls", counts={"ok": 998 * n, "decode_error": 2 * n})
    legacy = json.dumps({"shards": [r.summary() for r in records]}, indent=1).encode()
    manifest_bytes = (root / "big" / "manifest.json").stat().st_size + (root / "big" / "index.gz").stat().st_size
    return {
        "index": timed(lambda: open_dataset(str(root / "big")), repeat),
        "inline-json": timed(lambda: json.loads(legacy), repeat),
        "bytes": manifest_bytes,
        "legacy-bytes": len(legacy),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--index", type=int, default=100_000)
    args = ap.parse_args()
    from distributed import LocalCluster

    with (
        tempfile.TemporaryDirectory() as tmp,
        MotoServer() as moto,
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
    ):
        root = Path(tmp)
        gen.write_image_folder(root / "src", {"a": args.shards * 8}, size=(24, 20))
        moto.make_bucket("bench")
        idx = index_costs(args.index, root, args.repeat)
        print(
            f"open_dataset over a {args.index}-shard index: {idx['index']:.3f} s, {idx['bytes'] / 1e6:.1f} MB on "
            f"disk; wave 1 inline JSON table: json.loads alone {idx['inline-json']:.3f} s, "
            f"{idx['legacy-bytes'] / 1e6:.1f} MB",
            flush=True,
        )
        print(f"resume of {args.shards} committed shards (median of {args.repeat}, seconds):", flush=True)
        for label, uri, opts in (("local", str(root / "out"), {}), ("moto", "s3://bench/out", moto.storage_options())):
            store, fps = build(uri, opts, root / "src", cluster.scheduler_address, args.shards)
            r = resume_costs(store, fps, args.repeat)
            print(
                f"  {label:5s}  size-only {r['size-only']:.3f}   content-checked {r['content']:.3f} "
                f"({r['content'] / r['size-only']:.2f}x)   full sha256 {r['full']:.3f} "
                f"({r['full'] / r['size-only']:.2f}x)",
                flush=True,
            )


if __name__ == "__main__":
    main()
