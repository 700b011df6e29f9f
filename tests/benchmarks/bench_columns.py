"""Reading columns: a whole caption column vs the same rows as full items, and what captions add
to a StreamingDataLoader epoch. Ratios measured in one run (the machine may be shared).

    flock /tmp/bench.lock python tests/benchmarks/bench_columns.py [--count 20000] [--repeats 5]

Each figure is the best of `--repeats` (a shared machine adds noise, never speed).

Per format (HDF5, LMDB), JPEG 64x64 images and LAION-like columns (caption with Unicode, emoji,
newlines, empty and null values; a float similarity; the sha256), written by the real writers:
- `column`: `open_dataset(uri).column("caption")` on a fresh dataset (shard opens included) vs
  `get_batch` over the same rows in batches of 256 (images decoded, as training reads them).
  Target: >= 50x faster.
- `epoch`: one StreamingDataLoader epoch (batch 256, 2 workers, worker start-up included) reading
  every column vs `columns=[]` (images, labels, keys only). Target: <= 10 % more time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

from convert.dataset import open_dataset
from convert.formats.base import Sample
from convert.specs import Column
from convert.testing import images as gen
from convert.testing.formats import write_dataset

SHARD = 2000
BATCH = 256
SCHEMA = (Column("caption", "string"), Column("similarity", "float64"), Column("sha256", "string"))
CAPTIONS = [
    "a photo of a cat on a sofa",
    "ñandú über 日本語の画像",
    "emoji 🐱🚀 party",
    "two\nlines",
    "",
    None,
    "a long caption " * 40,
]


def make_dataset(root: Path, fmt: str, count: int) -> str:
    jpegs = [gen.jpeg_bytes(64, 64, seed=i) for i in range(64)]
    samples = [
        Sample(
            f"{i:08d}",
            i % 10,
            jpegs[i % 64],
            (CAPTIONS[i % len(CAPTIONS)], None if i % 11 == 0 else i / count, f"{i:064x}"),
        )
        for i in range(count)
    ]
    return write_dataset(root, fmt, samples, SHARD, encoding="jpeg", columns=SCHEMA)


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def column(uri: str) -> None:
    open_dataset(uri).column("caption")


def full_rows(uri: str) -> None:
    ds = open_dataset(uri)
    for lo in range(0, len(ds), BATCH):
        ds.get_batch(list(range(lo, min(lo + BATCH, len(ds)))))


def epoch(uri: str, cache: str, columns: list[str] | None) -> None:
    from convert.torch import StreamingDataLoader, StreamingDataset

    ds = StreamingDataset(uri, seed=0, cache_dir=cache, columns=columns)
    for _ in StreamingDataLoader(ds, batch_size=BATCH, num_workers=2):
        pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("hdf5", "lmdb"):
            uri = make_dataset(Path(tmp) / fmt, fmt, a.count)
            os.sync()  # no write-back of the new shards during the reads
            column(uri)  # warm-up
            cache = str(Path(tmp) / f"cache-{fmt}")
            with_cols: list[float] = []
            images_only: list[float] = []
            # in-process reads first (no DataLoader worker still winding down), columns before rows:
            # right after 20,000 decoded rows are freed a column read ran 2x slower for a while
            col = [timed(partial(column, uri)) for _ in range(a.repeats)]
            rows = [timed(partial(full_rows, uri)) for _ in range(a.repeats)]
            epoch(uri, cache, None)  # warm-up: page cache, imports
            for k in range(a.repeats):  # interleaved, alternating which goes first
                pair = [(with_cols, None), (images_only, [])]
                for out, cols in pair if k % 2 == 0 else pair[::-1]:
                    out.append(timed(partial(epoch, uri, cache, cols)))
            c, r = min(col), min(rows)
            w, i = min(with_cols), min(images_only)
            print(
                f"{fmt}: {a.count} items | column('caption') {c * 1e3:.1f} ms vs full rows {r * 1e3:.0f} ms: "
                f"{r / c:.0f}x faster (target >= 50x) | epoch with columns {w:.2f} s vs images only {i:.2f} s: "
                f"{(w / i - 1) * 100:+.1f} % (target <= +10 %)",
                flush=True,
            )


if __name__ == "__main__":
    main()
