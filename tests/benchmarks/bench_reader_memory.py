"""Memory of each torch DataLoader worker reading a raw (uncompressed, memory-mapped) HDF5 dataset
beside a PNG-encoded one of the same images, measured in the same run (issue 23 part 3).

    flock /tmp/bench.lock python tests/benchmarks/bench_reader_memory.py [--count 20000] [--size 64]
        [--workers 2] [--batch-size 64] [--epochs 1]

A folder of `count` generated JPEGs (two classes) is converted twice by the product's own `run`
(HDF5, 1000 per shard, resized to size x size): stored raw and stored as PNG. Then, for each, a
`StreamingDataLoader` (a real torch DataLoader, `num_workers` workers) iterates the epoch while a
thread samples every worker process (children of this process: psutil when installed, else /proc)
every 0.05 s, reading /proc/<pid>/smaps_rollup: Rss, Pss, Private_Dirty, Anonymous, and Rss minus
Anonymous (= file-backed pages: the mapped shards and libraries, shared page cache). The figure per
worker is its peak over the epoch; the table gives the mean over workers and raw / PNG ratios.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from convert import run
from convert.config import load_config
from convert.testing import images as gen
from convert.torch import StreamingDataLoader, StreamingDataset

try:
    import psutil
except ImportError:  # pragma: no cover - /proc fallback
    psutil = None

FIELDS = ("Rss", "Pss", "Private_Dirty", "Anonymous")


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
            "output.format": "hdf5",
            "image.size": size,
            "image.encode": encode,
            "shard.size": 1000,
            "cluster.kind": "threads",
        },
    )
    assert run(cfg, log=lambda m: None).exit_code() == 0
    return str(out)


def children(pid: int) -> list[int]:
    if psutil is not None:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def smaps(pid: int) -> dict[str, int] | None:
    """kB of each field in /proc/<pid>/smaps_rollup, None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    got = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in FIELDS:
            got[name] = int(rest.split()[0])
    return got if len(got) == len(FIELDS) else None


def measure(uri: str, workers: int, batch_size: int, epochs: int, cache: Path) -> tuple[dict[str, float], float, int]:
    """Mean over workers of each field's per-worker peak (MB), the epoch's seconds, items read."""
    peaks: dict[int, dict[str, int]] = {}
    stop = threading.Event()

    def sample() -> None:
        me = os.getpid()
        while not stop.is_set():
            for pid in children(me):
                got = smaps(pid)
                if got is None:
                    continue
                got["File"] = got["Rss"] - got["Anonymous"]
                peak = peaks.setdefault(pid, dict.fromkeys(got, 0))
                for k, v in got.items():
                    peak[k] = max(peak[k], v)
            stop.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    ds = StreamingDataset(uri, seed=0, cache_dir=cache)
    loader = StreamingDataLoader(ds, batch_size=batch_size, num_workers=workers)
    t, n = time.perf_counter(), 0
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for batch in loader:
            n += len(batch["key"])
    seconds = time.perf_counter() - t
    stop.set()
    thread.join()
    seen = [p for p in peaks.values() if p["Rss"] > 0]
    assert len(seen) >= workers, f"sampled {len(seen)} worker processes, expected {workers}"
    mean = {k: sum(p[k] for p in seen) / len(seen) / 1024 for k in (*FIELDS, "File")}
    return mean, seconds, n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-reader-memory-") as tmp:
        root = Path(tmp)
        uris = {encode: build(root, args.count, args.size, encode) for encode in ("png", "raw")}
        sizes = {e: sum(p.stat().st_size for p in Path(u).rglob("*.h5")) / 2**20 for e, u in uris.items()}
        print(
            f"{args.count} images {args.size}x{args.size}, HDF5 1000/shard, {args.workers} workers, "
            f"batch {args.batch_size}, {args.epochs} epoch(s); sampler: {'psutil' if psutil else '/proc'}"
            " + smaps_rollup; MB = mean over workers of each worker's peak"
        )
        got = {e: measure(u, args.workers, args.batch_size, args.epochs, root / f"cache-{e}") for e, u in uris.items()}
        print(
            f"{'stored':7} {'shards MB':>9} {'Rss':>8} {'Pss':>8} {'Priv_Dirty':>10} {'Anon':>8} {'File':>8} {'s':>6}"
        )
        for e, (mb, seconds, n) in got.items():
            assert n == args.count * args.epochs, (e, n)
            print(
                f"{e:7} {sizes[e]:9.1f} {mb['Rss']:8.1f} {mb['Pss']:8.1f} {mb['Private_Dirty']:10.1f} "
                f"{mb['Anonymous']:8.1f} {mb['File']:8.1f} {seconds:6.1f}"
            )
        raw, png = got["raw"][0], got["png"][0]
        print(
            "raw - png per worker (MB): "
            + ", ".join(f"{k} {raw[k] - png[k]:+.1f}" for k in (*FIELDS, "File"))
            + "; raw / png: "
            + ", ".join(f"{k} {raw[k] / png[k]:.2f}" for k in (*FIELDS, "File") if png[k])
        )


if __name__ == "__main__":
    main()
