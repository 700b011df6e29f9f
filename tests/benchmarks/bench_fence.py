"""Cost of the lease fence per publish: fenced `lease.publish` vs unfenced `Store.publish`, same run.

    flock /tmp/bench.lock python tests/benchmarks/bench_fence.py [--publishes N] [--kib K] [--repeat R]

For a local folder and for S3 (moto's server in its own process on 127.0.0.1), a lease is held
and `N` staged shards of `K` KiB are published, alternating unfenced (`store.publish`) and
fenced (`convert.lease.publish(..., run_id)`: locally flock + read + compare around the rename;
on S3 one If-Match PUT of the lease's own bytes before the shard's PUT, the lease version read
once and reused until it changes) and, for comparison, the wave-2 check (read the lease, compare,
publish: not atomic). Only the publish call is timed; the figure is the median per publish over
`repeat` rounds, the modes interleaved; the fence's cost is the difference. moto is CPU-bound on
this box: its absolute times are a ceiling for a real endpoint, where the fence costs one small
request's latency.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from convert.lease import current_run_id, hold_lease, publish, staging
from convert.store import Store, open_store
from convert.testing.s3 import MotoServer


def _read_checked(store: Store, tmp: str, rel: str, size: int, digest: str, run_id: str) -> None:
    """The wave-2 fence, for comparison: read the lease, compare, then publish (not atomic)."""
    if current_run_id(store) != run_id:
        raise RuntimeError("lease moved")
    store.publish(tmp, rel, size, digest)


def _round(store: Store, run_id: str, count: int, data: bytes, mode: str) -> float:
    """Median seconds per publish of `count` staged files."""
    digest = hashlib.sha256(data).hexdigest()
    times = []
    for i in range(count):
        with staging(store, f"shard-{i:05d}", ".bin", run_id=run_id) as tmp:
            Path(tmp).write_bytes(data)
            rel = f"shards/shard-{i:05d}.bin"
            start = time.perf_counter()
            if mode == "fenced":
                publish(store, tmp, rel, len(data), digest, run_id)
            elif mode == "read-checked":
                _read_checked(store, tmp, rel, len(data), digest, run_id)
            else:
                store.publish(tmp, rel, len(data), digest)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


MODES = ("unfenced", "read-checked", "fenced")


def measure(store: Store, count: int, data: bytes, repeat: int) -> dict[str, float]:
    """Median seconds per publish for each mode, rounds interleaved."""
    runs: dict[str, list[float]] = {mode: [] for mode in MODES}
    with hold_lease(store) as lease:
        _round(store, lease.run_id, 3, data, "fenced")  # warm connections and caches
        for _ in range(repeat):
            for mode in MODES:
                runs[mode].append(_round(store, lease.run_id, count, data, mode))
    return {mode: statistics.median(times) for mode, times in runs.items()}


def _line(name: str, figures: dict[str, float]) -> str:
    plain, old, fenced = (figures[mode] * 1e3 for mode in MODES)
    return (
        f"{name:6s} unfenced {plain:7.3f}  read-checked (wave 2) {old:7.3f}  fenced {fenced:7.3f} ms/publish;"
        f"  fence +{fenced - plain:.3f} ms vs unfenced, {fenced - old:+.3f} ms vs read-checked"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--publishes", type=int, default=40)
    parser.add_argument("--kib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    data = os.urandom(args.kib * 1024)
    print(f"{args.publishes} publishes of {args.kib} KiB per round, {args.repeat} rounds, median per publish")
    with tempfile.TemporaryDirectory() as work:
        print(_line("local", measure(open_store(os.path.join(work, "out")), args.publishes, data, args.repeat)))
    with MotoServer() as moto:
        moto.make_bucket("bench")
        store = open_store("s3://bench/fence", moto.storage_options())
        print(_line("s3", measure(store, args.publishes, data, args.repeat)))


if __name__ == "__main__":
    main()
