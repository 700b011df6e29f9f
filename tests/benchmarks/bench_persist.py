"""convert.persist vs joblib: time and peak memory of dump/load for every codec.

    python tests/benchmarks/bench_persist.py [--quick] [--codecs zlib,gzip,...] [--datasets ...]

Datasets: a ledger of N items with keys as a list of str ("ledger_list") or as a fixed-width
bytes array ("ledger_array"), plus labels int64, status uint8, sizes int64, shapes (N,3) int32;
and one large float64 array ("floats", smooth signal rounded to 3 decimals so it compresses
realistically). Times: one subprocess per case alternates persist and joblib dump/load for
--repeat rounds and keeps each one's best. Memory: a fresh subprocess per (library, op) reads its
peak-RSS growth from /proc (VmHWM after resetting it), then repeats the op under tracemalloc.
joblib is measured in the same run, on the same data, at the same codec and level
(zstd is registered with joblib through its public register_compressor hook).

Note on overwriting: timed dumps write a new file each round (the previous one is removed
untimed). Overwriting an existing file adds the filesystem's cost of freeing the old one, which
persist's atomic rename pays at once (~0.3 ms/MB on ext4 here) while joblib's in-place truncation
(non-atomic) largely defers it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from typing import Any, Callable

import numpy as np

LEVELS = {"none": 0, "zlib": 3, "gzip": 3, "bz2": 3, "lzma": 3, "xz": 3, "zstd": 3, "lz4": 1}
SIZES = {"full": {"items": 1_000_000, "float_mb": 500}, "quick": {"items": 100_000, "float_mb": 50}}


def build(dataset: str, items: int, float_mb: int) -> Any:
    """Deterministic benchmark data."""
    rng = np.random.default_rng(42)
    if dataset == "floats":
        n = float_mb * 2**20 // 8
        out = np.empty(n)
        for start in range(0, n, 1 << 22):  # chunked so building it needs no temporary copy
            piece = out[start : start + (1 << 22)]
            piece[:] = np.sin(np.arange(start, start + len(piece)) / 5000.0)
            piece += rng.normal(0, 0.01, len(piece))
            np.round(piece, 3, out=piece)
        return out
    keys = [f"train/n{i % 1000:08d}/n{i % 1000:08d}_{i:07d}.JPEG" for i in range(items)]
    ledger = {
        "keys": keys if dataset == "ledger_list" else np.array(keys, dtype="S40"),
        "labels": rng.integers(0, 1000, items, dtype=np.int64),
        "status": rng.integers(0, 4, items, dtype=np.uint8),
        "sizes": rng.integers(2_000, 500_000, items, dtype=np.int64),
        "shapes": rng.integers(32, 4096, (items, 3), dtype=np.int32),
        "plan": {"shards": [(f"shard-{s:05d}", s * 1000, (s + 1) * 1000) for s in range(items // 1000)], "version": 1},
    }
    return ledger


def _register_joblib_zstd() -> None:
    import joblib
    import zstandard
    from joblib.compressor import CompressorWrapper

    class ZstdWrapper(CompressorWrapper):
        def __init__(self) -> None:
            super().__init__(obj=None, prefix=b"\x28\xb5\x2f\xfd", extension=".zst")

        def compressor_file(self, fileobj: Any, compresslevel: int | None = None) -> Any:
            if isinstance(fileobj, (str, os.PathLike)):
                fileobj = open(fileobj, "wb")
            cctx = zstandard.ZstdCompressor(level=compresslevel or 3, write_checksum=True)
            return cctx.stream_writer(fileobj)

        def decompressor_file(self, fileobj: Any) -> Any:
            return zstandard.ZstdDecompressor().stream_reader(fileobj)

    joblib.register_compressor("zstd", ZstdWrapper(), force=True)


def _ops(impl: str, codec: str) -> tuple[Callable[[Any, str], None], Callable[[str], Any]]:
    level = LEVELS[codec]
    if impl == "persist":
        from convert import persist

        compress = 0 if codec == "none" else (codec, level)
        return (lambda obj, path: persist.dump(obj, path, compress=compress)), persist.load
    import joblib

    if codec == "zstd":
        _register_joblib_zstd()
    compress = 0 if codec == "none" else (codec, level)
    return (lambda obj, path: joblib.dump(obj, path, compress=compress)), joblib.load


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_worker(impl: str, op: str, dataset: str, codec: str, path: str, items: int, float_mb: int) -> dict:
    """Peak RSS growth and tracemalloc peak of one op, in a fresh process."""
    dump, load = _ops(impl, codec)
    obj = build(dataset, items, float_mb) if op == "dump" else None
    run = (lambda: dump(obj, path)) if op == "dump" else (lambda: load(path))
    reset = _reset_rss_peak()
    rss0 = _proc_status("VmRSS")
    result = run()
    rss_peak = _proc_status("VmHWM") - rss0 if reset else float("nan")
    del result
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    result = run()  # kept alive until measured: a load's peak includes its result
    traced = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del result
    return {"traced": traced, "rss": rss_peak, "size": os.path.getsize(path)}


def timing_worker(dataset: str, codec: str, tmp: str, items: int, float_mb: int, repeat: int) -> dict:
    """Best-of-`repeat` seconds per (impl, op), alternating persist and joblib every round so
    that load from other processes on a shared machine hits both alike."""
    obj = build(dataset, items, float_mb)
    ops = {impl: _ops(impl, codec) for impl in ("persist", "joblib")}
    for impl, (dump, load) in ops.items():  # warm-up: lazy imports, page cache
        dump(obj, os.path.join(tmp, impl))
        load(os.path.join(tmp, impl))
    best: dict = {}
    for _ in range(repeat):
        for impl, (dump, load) in ops.items():
            path = os.path.join(tmp, impl)
            for op, run in (("dump", lambda: dump(obj, path)), ("load", lambda: load(path))):
                if op == "dump":
                    os.unlink(path)  # time writing a new file; see the note on overwriting
                t0 = time.perf_counter()
                result = run()
                elapsed = time.perf_counter() - t0
                del result
                best[f"{impl}.{op}"] = min(best.get(f"{impl}.{op}", elapsed), elapsed)
    return best


def _run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return "   nan" if n != n else f"{n / 2**20:6.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k-item ledger, 50 MB array")
    parser.add_argument("--codecs", default=",".join(LEVELS))
    parser.add_argument("--datasets", default="ledger_list,ledger_array,floats")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per case (best of)")
    parser.add_argument("--memory-worker", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--timing-worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        impl, op, dataset, codec, path, items, float_mb = args.memory_worker
        print(json.dumps(memory_worker(impl, op, dataset, codec, path, int(items), int(float_mb))))
        return
    if args.timing_worker:
        dataset, codec, tmp, items, float_mb = args.timing_worker
        print(json.dumps(timing_worker(dataset, codec, tmp, int(items), int(float_mb), args.repeat)))
        return
    sizes = SIZES["quick" if args.quick else "full"]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus; best of {args.repeat}")
    print(
        f"sizes: {sizes}; ratio = persist / joblib (< 1 is better); "
        "mem = tracemalloc peak during the op (dump: beyond the object; load: incl. result); "
        "rss = peak RSS growth"
    )
    print(
        f"{'dataset':<13}{'codec':<6}{'op':<5}{'persist s':>10}{'joblib s':>9}{'ratio':>7}"
        f"{'mem MiB':>9}{'joblib':>8}{'ratio':>7}{'rss MiB':>9}{'joblib':>8}"
        f"{'size MiB':>9}{'joblib':>8}"
    )
    dims = [str(sizes["items"]), str(sizes["float_mb"])]
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets.split(","):
            for codec in args.codecs.split(","):
                times = _run(["--repeat", str(args.repeat), "--timing-worker", dataset, codec, tmp, *dims])
                for op in ("dump", "load"):
                    mem = {
                        impl: _run(
                            ["--memory-worker", impl, op, dataset, codec, os.path.join(tmp, f"{impl}-mem"), *dims]
                        )
                        for impl in ("persist", "joblib")
                    }
                    p, j = mem["persist"], mem["joblib"]
                    tp, tj = times[f"persist.{op}"], times[f"joblib.{op}"]
                    print(
                        f"{dataset:<13}{codec:<6}{op:<5}{tp:>10.3f}{tj:>9.3f}{tp / tj:>7.2f}"
                        f"{_mib(p['traced']):>9}{_mib(j['traced']):>8}"
                        f"{p['traced'] / max(j['traced'], 1):>7.2f}{_mib(p['rss']):>9}"
                        f"{_mib(j['rss']):>8}{_mib(p['size']):>9}{_mib(j['size']):>8}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
