"""Peak RSS per worker against the number of images (issue 10: flat within +-10% from 10k to 100k).

The product's own LocalCluster (run() with no scheduler: 2 workers x 1 thread on 2 cores) converts a
URL list cycling through the JPEG corpus (nginx on 127.0.0.1) in shards of 1000. While it runs, every
worker's process tree is sampled (psutil, every 0.1 s) and, each time the committed items cross a
checkpoint (--counts), its kernel high-water mark (VmHWM: this process's own peak, not inherited
through exec like ru_maxrss) is read. The peak at a checkpoint is what a run of that many items would
report; the ratio is against the first checkpoint of the same run. `--fresh` does one run (one fresh
cluster) per count instead. bench_pipeline.py (rss_runs) prints the same.

`--probe` also asks each worker at every checkpoint what it holds (live objects by type, Dask worker
state, logs and profile history with their deep sizes, profiler CPU, malloc arenas and heap, threads;
`--tracemalloc` adds the allocation sites that changed most since the first checkpoint): the evidence
for what grows. What it found (session 3): Dask's worker profiler, two call trees per second kept for
1000 cycles (~50 kB/s per worker), grew every worker with run time; see executor.dask_executor.

    flock /work/wt/bench.lock python tests/benchmarks/bench_rss.py [--counts 10000 30000 100000]
        [--base-url http://127.0.0.1:18080 --corpus /tmp/bench-corpus] [--probe] [--tracemalloc]
        [--set k=v ...] [--dask k=v ...] [--env MALLOC_ARENA_MAX=2 ...] [--fresh]
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import dask.config
import psutil
from distributed import default_client

sys.path.insert(0, str(Path(__file__).parent))
from bench_pipeline import OPEN, serve, write_list  # noqa: E402

from convert import run  # noqa: E402
from convert.config import load_config  # noqa: E402
from convert.testing.images import write_corpus  # noqa: E402

MiB = 2**20


def vm_hwm(pid: int) -> float:
    """The process's peak resident set (MiB) from /proc: exec resets it, unlike ru_maxrss."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def tree_rss(pid: int) -> float:
    """Resident MiB of a process and all its descendants, now."""
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / MiB
    except psutil.NoSuchProcess:
        return 0.0


class Sampler(threading.Thread):
    """Polls the workers' process trees; `peak(t)` is each worker's highest sample up to time t."""

    def __init__(self, pids: list[int], period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pids, self.period, self.samples = pids, period, []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.samples.append((time.monotonic(), [tree_rss(p) for p in self.pids]))
            self.halt.wait(self.period)

    def peak(self, until: float) -> list[float]:
        rows = [r for t, r in self.samples if t <= until] or [[0.0] * len(self.pids)]
        return [max(col) for col in zip(*rows)]


def probe(dask_worker: Any = None, trace: bool = False) -> dict[str, Any]:
    """What one worker process holds now (runs inside the worker through client.run)."""
    import collections
    import ctypes
    import gc
    import os
    import pickle
    import threading as th
    import tracemalloc

    out: dict[str, Any] = {"pid": os.getpid(), "threads": th.active_count()}
    out["types"] = collections.Counter(type(o).__name__ for o in gc.get_objects())
    w = dask_worker
    if w is not None:
        out["deep kB"] = {
            name: deep_size(obj) // 1024
            for name, obj in (
                ("profile_history", w.profile_history),
                ("profile_keys_history", w.profile_keys_history),
                ("state.log", w.state.log),
                ("stimulus_log", w.state.stimulus_log),
            )
        }
        st = w.state
        out["dask"] = {
            "tasks": len(st.tasks),
            "state.log": len(st.log),
            "stimulus_log": len(st.stimulus_log),
            "profile_history": len(w.profile_history),
            "profile_keys_history": len(w.profile_keys_history),
            "profile_history kB": len(pickle.dumps(list(w.profile_history))) // 1024,
            "profile_keys_history kB": len(pickle.dumps(list(w.profile_keys_history))) // 1024,
            "digests_total": len(w.digests_total),
            "data": len(w.data),
            "profiler CPU s": round(sum(v for k, v in w.digests_total.items() if "profile-duration" in str(k)), 2),
            "process CPU s": round(sum(os.times()[:2]), 2),
        }
    try:
        libc = ctypes.CDLL("libc.so.6")
        buf = ctypes.create_string_buffer(1 << 20)
        libc.fmemopen.restype = ctypes.c_void_p  # a FILE*: the default int would truncate it
        stream = libc.fmemopen(buf, len(buf), b"w")
        libc.malloc_info(0, ctypes.c_void_p(stream))
        libc.fclose(ctypes.c_void_p(stream))
        xml = buf.value.decode()
        out["arenas"] = xml.count("<heap nr=")
        tail = xml[xml.rfind("</heap>") :]  # the totals after the last arena
        out["malloc_info_totals"] = " ".join(
            line.strip() for line in tail.splitlines() if "<total " in line or "<system " in line
        )
    except (OSError, AttributeError) as exc:
        out["arenas"] = f"n/a ({exc})"
    if trace and tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        out["traced MiB"] = tracemalloc.get_traced_memory()[0] / MiB
        base = getattr(tracemalloc, "_bench_rss_base", None)  # kept in the worker (this function is re-sent)
        if base is None:
            tracemalloc._bench_rss_base = snap  # type: ignore[attr-defined]
        else:
            out["grown"] = [str(s) for s in snap.compare_to(base, "traceback")[:12]]
    return out


def deep_size(root: Any) -> int:
    """Bytes of an object graph (each object once; modules, types and functions not followed)."""
    import gc
    import types

    seen, stack, total = set(), [root], 0
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj, 0)
        stack.extend(gc.get_referents(obj))
    return total


def start_trace() -> None:
    import tracemalloc

    tracemalloc.start(8)


def malloc_trim() -> int:
    import ctypes

    return ctypes.CDLL("libc.so.6").malloc_trim(0)


def _show_probes(first: dict[int, dict], now: dict[int, dict], count: int) -> None:
    for addr_pid, p in now.items():
        f = first.get(addr_pid, p)
        grown = (p["types"] - f["types"]).most_common(8)
        print(
            f"  probe pid {addr_pid} at {count}: threads {p['threads']}, arenas {p['arenas']}, dask {p.get('dask')}",
            flush=True,
        )
        print(f"    deep sizes kB {p.get('deep kB')}; malloc {p.get('malloc_info_totals', '')}")
        print(f"    live objects grown since first checkpoint: {grown}")
        if "traced MiB" in p:
            print(f"    tracemalloc {p['traced MiB']:.1f} MiB; sites that changed most since the first checkpoint:")
        for line in p.get("grown", []):
            print(f"      {line}")


def convert_config(args: argparse.Namespace, lst: Path, out: Path) -> Any:
    """The run's config: no scheduler given, so run() starts the product's own default LocalCluster."""
    return load_config(
        None,
        {
            "source.uri": str(lst),
            "output.uri": str(out),
            "image.size": args.size,
            "shard.size": args.shard_size,
            "run.overwrite": True,
            **OPEN,
            **args.set,
        },
    )


def measured_run(args: argparse.Namespace, root: Path, lst: Path, counts: list[int]) -> tuple[list, Any]:
    """One run; at each checkpoint (committed items first >= count): (count, time, VmHWM per worker)
    and the sampler. The workers are found through the run's own Client (the process default)."""
    marks: list[tuple[int, float, list[float]]] = []
    first: dict[int, dict] = {}
    state: dict[str, Any] = {}

    def hook(progress: Any) -> None:
        if "pids" not in state:
            state["client"] = client = default_client()
            state["pids"] = pids = [pid for _, pid in sorted(client.run(os.getpid).items())]
            state["sampler"] = Sampler(pids)
            state["sampler"].start()
            if args.tracemalloc:
                client.run(start_trace)
        client, pids = state["client"], state["pids"]
        while len(marks) < len(counts) and progress.items_done >= counts[len(marks)]:
            marks.append((counts[len(marks)], time.monotonic(), [vm_hwm(p) for p in pids]))
            if args.probe:
                now = {info["pid"]: info for info in client.run(probe, trace=args.tracemalloc).values()}
                first.update({k: v for k, v in now.items() if k not in first})
                _show_probes(first, now, counts[len(marks) - 1])
            if args.trim:
                client.run(malloc_trim)

    summary = run(convert_config(args, lst, root / "out"), on_progress=hook, log=lambda m: None)
    state["sampler"].halt.set()
    state["sampler"].join()
    shutil.rmtree(root / "out", ignore_errors=True)
    return marks, state["sampler"], summary


def one_run(args: argparse.Namespace, root: Path, base_url: str, names: list[str]) -> None:
    """All checkpoints in one run: peaks per worker when the committed items first reach each count."""
    counts, total = sorted(args.counts), max(args.counts)
    lst = root / f"urls-{total}.csv"
    write_list(lst, base_url, names, total)
    marks, sampler, summary = measured_run(args, root, lst, counts)
    print(f"one run of {total} items, {summary.images_per_second:.0f} img/s, {summary.cluster}:")
    base_s, base_h = None, None
    for count, t, hwm in marks:
        sampled = sampler.peak(t)
        base_s, base_h = base_s or max(sampled), base_h or max(hwm)
        print(
            f"  {count:>7} items: peak RSS per worker (sampled tree) {', '.join(f'{r:.1f}' for r in sampled)} MiB, "
            f"VmHWM {', '.join(f'{r:.1f}' for r in hwm)} MiB; max vs {counts[0]}: sampled "
            f"{max(sampled) / base_s:.3f}x, VmHWM {max(hwm) / base_h:.3f}x",
            flush=True,
        )
    verdict(marks)


def verdict(marks: list[tuple[int, float, list[float]]]) -> None:
    if len(marks) >= 2:
        ratio = max(marks[-1][2]) / max(marks[0][2])
        print(
            f"peak RSS per worker (VmHWM) {marks[-1][0]} vs {marks[0][0]} items: {ratio:.3f}x "
            f"(target within +-10%: {'met' if 0.9 <= ratio <= 1.1 else 'MISSED'})",
            flush=True,
        )


def fresh_runs(args: argparse.Namespace, root: Path, base_url: str, names: list[str]) -> None:
    """One run (and so one fresh cluster) per count: what a user sees for a run of that size."""
    marks = []
    for count in args.counts:
        lst = root / f"urls-{count}.csv"
        write_list(lst, base_url, names, count)
        [mark], sampler, summary = measured_run(args, root, lst, [count])
        marks.append(mark)
        print(
            f"  fresh run, {count:>7} items ({summary.images_per_second:.0f} img/s, {summary.cluster}): peak RSS "
            f"per worker VmHWM {', '.join(f'{r:.1f}' for r in mark[2])} MiB, sampled "
            f"{', '.join(f'{r:.1f}' for r in sampler.peak(mark[1]))} MiB",
            flush=True,
        )
    verdict(marks)


def _pairs(values: list[str]) -> dict[str, Any]:
    out = {}
    for kv in values:
        k, _, v = kv.partition("=")
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--workers", type=int, default=None, help="cluster.workers (default: sized to the machine)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--base-url", default=None, help="a running static server holding --corpus")
    parser.add_argument("--corpus", type=Path, default=None, help="JPEG folder (created with 5000 images if empty)")
    parser.add_argument("--fresh", action="store_true", help="one fresh cluster per count")
    parser.add_argument("--probe", action="store_true", help="ask the workers what they hold at each checkpoint")
    parser.add_argument("--tracemalloc", action="store_true", help="with --probe: sites that changed most")
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) in the workers at each checkpoint")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides k=v")
    parser.add_argument("--dask", nargs="*", default=[], help="dask config k=v for the cluster")
    parser.add_argument("--env", nargs="*", default=[], help="environment K=V for the worker processes")
    args = parser.parse_args()
    args.set = _pairs(args.set)
    if args.workers:
        args.set["cluster.workers"] = args.workers
    os.environ.update({k: str(v) for k, v in _pairs(args.env).items()})
    with tempfile.TemporaryDirectory() as tmp, dask.config.set(_pairs(args.dask)):
        root = Path(tmp)
        corpus = args.corpus or root / "www"
        if not list(corpus.glob("*.jpg")):
            write_corpus(corpus, 5000, 200, 600)
        names = sorted(p.name for p in corpus.glob("*.jpg"))
        server = None
        if args.base_url is None:
            (root / "srv").mkdir()
            (root / "srv" / "www").symlink_to(corpus.resolve())
            server, args.base_url, _ = serve(root / "srv" / "www")
        print(
            f"{len(names)} JPEGs cycled, shard.size {args.shard_size}, "
            f"{os.cpu_count()} cores (shared: other jobs may load the machine); set {args.set} dask {args.dask} "
            f"env {args.env}",
            flush=True,
        )
        try:
            (fresh_runs if args.fresh else one_run)(args, root, args.base_url.rstrip("/"), names)
        finally:
            if server is not None:
                server.terminate()
                server.wait(10)


if __name__ == "__main__":
    main()
