"""What crosses the Dask boundary per shard: the ShardTask's pickled size against the previous
payload (the ShardSpec plus the whole sealed Config, pickled per submission), same plan, same run.

    python tests/benchmarks/bench_task.py [--rows 100000] [--shard-size 1000]

Prints bytes per shard task for a txt list and for a folder source, the ratio new/old, and the
client CPU to build one task. The task must stay under 2 kB and constant in the number of items.
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from pathlib import Path

from convert.config import load_config
from convert.secrets import seal_config
from convert.sources import Workdir, plan_source
from convert.task import TaskMaker
from convert.testing import images as gen


def measure(source: str, tmp: Path, shard_size: int) -> tuple[int, int, float]:
    cfg = load_config(None, {"source.uri": source, "output.uri": str(tmp / "out"), "shard.size": shard_size})
    cfg = cfg.with_absolute_paths()
    plan = plan_source(cfg.source, shard_size, Workdir(str(tmp / "work")))
    shipped, _ = seal_config(cfg)
    maker = TaskMaker(shipped, plan.kind, plan.columns, "0123456789abcdef")
    specs = plan.specs[: min(len(plan.specs), 200)]
    t = time.perf_counter()
    tasks = [maker.task(s) for s in specs]
    per_task = (time.perf_counter() - t) / len(specs)
    new = max(len(pickle.dumps(task)) for task in tasks)
    old = max(len(pickle.dumps((s, shipped))) for s in specs)
    return new, old, per_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--shard-size", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lst = tmp / "urls.txt"
        lst.write_text("".join(f"https://img.example.com/{i:08d}.jpg\n" for i in range(args.rows)))
        gen.write_image_folder(tmp / "imgs", {"a": 50, "b": 50}, size=(8, 8))
        print(f"{'source':<10} {'task bytes':>10} {'spec+config bytes':>18} {'new/old':>8} {'build us':>9}")
        for name, source in (("txt list", str(lst)), ("folder", str(tmp / "imgs"))):
            new, old, per = measure(source, tmp, args.shard_size if name != "folder" else 10)
            print(f"{name:<10} {new:>10} {old:>18} {new / old:>8.2f} {per * 1e6:>9.1f}")


if __name__ == "__main__":
    main()
