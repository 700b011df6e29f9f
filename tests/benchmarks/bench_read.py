"""Training-read throughput: our HDF5/LMDB shards (raw and JPEG) beside PNG-file and one-HDF5-array
baselines measured in the same run, plus Mosaic streaming when it is installed.

    flock /work/wt/bench.lock python tests/benchmarks/bench_read.py [--count 20000] [--repeats 3]
        [--mosaic-python /path/to/python-with-mosaicml-streaming]

Columns (images/s): seq = in-order iteration; ds[i] = single random reads; batch = random
batches of 256 via get_batch (baselines: sorted fancy index / 256 file decodes); DL fork / DL spawn
= torch DataLoader(batch_size=256, shuffle=True, num_workers=2) over the map-style dataset;
stream = convert.torch.StreamingDataset (or Mosaic's) through a 2-worker DataLoader; disk MB.
In-process columns are medians of `--repeats` interleaved runs, DataLoader columns one epoch each
(worker start-up included, as a user sees it). The machine may be shared: compare ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
from PIL import Image

BATCH = 256
SIDE = 64


class PNGFiles:
    """Baseline: one PNG file per image, decoded with Pillow (torchvision ImageFolder style)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        with Image.open(self.paths[i]) as img:
            return {"image": np.asarray(img.convert("RGB")), "label": i % 10}

    def get_batch(self, idx: list[int]) -> list[dict[str, Any]]:
        return [self[i] for i in idx]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class OneArray:
    """Baseline: all images in one (N, 64, 64, 3) HDF5 array (contiguous), opened lazily per process."""

    def __init__(self, path: str) -> None:
        self.path, self._f, self._pid = path, None, -1
        with h5py.File(path, "r") as f:
            self.n = len(f["images"])

    def _ds(self) -> h5py.Dataset:
        if self._f is None or self._pid != os.getpid():
            self._f, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._f["images"]

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "n": self.n, "_f": None, "_pid": -1}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self._ds()[i], "label": i % 10}

    def get_batch(self, idx: list[int]) -> list[dict[str, Any]]:
        order = np.argsort(idx)
        rows = self._ds()[np.asarray(idx)[order]]  # h5py fancy indexing needs increasing indices
        out: list[dict[str, Any]] = [{}] * len(idx)
        for j, k in enumerate(order.tolist()):
            out[k] = {"image": rows[j], "label": idx[k] % 10}
        return out

    def __iter__(self):
        ds = self._ds()
        for lo in range(0, self.n, BATCH):
            for image in ds[lo : lo + BATCH]:
                yield {"image": image}


def make_source(root: Path, count: int) -> list[str]:
    """`count` photo-like 64x64 PNGs in 10 class folders (variations of 64 rendered images)."""
    from convert.testing.images import photo_like

    bases = [np.asarray(photo_like(SIDE, SIDE, seed=s).convert("RGB")) for s in range(64)]
    paths = []
    for i in range(count):
        folder = root / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:06d}.png"
        if not path.exists():
            img = np.roll(bases[i % 64], shift=(i // 64) % SIDE, axis=1)
            Image.fromarray(img).save(path, optimize=False)
        paths.append(str(path))
    return sorted(paths)


def convert_layout(src: Path, out: Path, fmt: str, encode: str) -> str:
    if (out / "manifest.json").exists():
        return str(out)
    from convert import run
    from convert.config import load_config

    cfg = load_config(
        None,
        {
            "source.uri": str(src),
            "output.uri": str(out),
            "output.format": fmt,
            "image.size": SIDE,
            "image.encode": encode,
            "shard.size": 1000,
            "cluster.workers": 2,
        },
    )
    assert run(cfg, log=lambda m: None).exit_code() == 0
    return str(out)


def one_array(paths: list[str], out: Path) -> str:
    if not out.exists():
        with h5py.File(out, "w") as f:
            ds = f.create_dataset("images", (len(paths), SIDE, SIDE, 3), np.uint8)
            for lo in range(0, len(paths), 1000):
                ds[lo : lo + 1000] = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths[lo : lo + 1000]])
    return str(out)


def rate(n: int, fn: Callable[[], Any], what: str = "") -> float:
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    if what:
        print(f"  {what}: {n / seconds:,.0f}/s ({seconds:.1f}s)", file=sys.stderr, flush=True)
    return n / seconds


def in_process(ds: Any, rng: np.random.Generator, singles: int, batches: int) -> dict[str, float]:
    n = len(ds)
    single_idx = rng.integers(0, n, singles).tolist()
    batch_idx = [rng.choice(n, min(n, BATCH), replace=False).tolist() for _ in range(batches)]
    return {
        "seq": rate(n, lambda: [None for _ in ds]),
        "ds[i]": rate(singles, lambda: [ds[i] for i in single_idx]),
        "batch": rate(min(n, BATCH) * batches, lambda: [ds.get_batch(b) for b in batch_idx]),
    }


def dataloader(ds: Any, method: str) -> float:
    from torch.utils.data import DataLoader

    loader = DataLoader(
        ds, batch_size=BATCH, shuffle=True, num_workers=2, multiprocessing_context=method, collate_fn=_collate
    )
    return rate(len(ds), lambda: [None for _ in loader], f"DataLoader {method}")


def _collate(items: list[dict[str, Any]]) -> Any:
    return np.stack([it["image"] for it in items])


def streaming(uri: str, cache: str) -> float:
    from convert.torch import StreamingDataLoader, StreamingDataset

    ds = StreamingDataset(uri, seed=0, cache_dir=cache)
    loader = StreamingDataLoader(ds, batch_size=BATCH, num_workers=2)
    return rate(len(ds), lambda: [None for _ in loader], "StreamingDataset")


def disk_mb(path: str) -> float:
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def lmdb_payload_ratio(uri: str) -> tuple[float, float]:
    """(disk MB of the .lmdb shards, payload MB: the images' bytes as stored)."""
    from convert.dataset import open_dataset

    ds = open_dataset(uri, decode=False)
    payload = 0
    for lo in range(0, len(ds), 1000):
        for item in ds.get_batch(list(range(lo, min(lo + 1000, len(ds))))):
            image = item["image"]
            payload += image.nbytes if isinstance(image, np.ndarray) else len(image)
    shards = sum(f.stat().st_size for f in Path(uri, "shards").glob("*.lmdb")) / 1e6
    return shards, payload / 1e6


# torchvision is imported by Mosaic's package __init__ (for its vision datasets, unused here); when
# the installed torchvision does not match torch's ABI, a stub stands in so Mosaic's core can load.
MOSAIC = r"""
import importlib.machinery, sys, types
try:
    import torchvision
except Exception:
    for name in ["torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional",
                 "torchvision.datasets.utils", "torchvision.io"]:
        m = types.ModuleType(name); m.__spec__ = importlib.machinery.ModuleSpec(name, None); m.__path__ = []
        sys.modules[name] = m
    sys.modules["torchvision"].__version__ = "0.0"
    sys.modules["torchvision.datasets"].VisionDataset = object
    sys.modules["torchvision.transforms"].Compose = object
    sys.modules["torchvision.transforms.functional"].to_tensor = None
import json, time, numpy as np
from PIL import Image
from streaming import MDSWriter, StreamingDataset
from torch.utils.data import DataLoader
paths, out = json.load(open(sys.argv[1])), sys.argv[2]
import os
if not os.path.exists(os.path.join(out, "index.json")):
    with MDSWriter(out=out, columns={"image": "ndarray:uint8:64,64,3", "label": "int"}, size_limit=1 << 26) as w:
        for i, p in enumerate(paths):
            w.write({"image": np.asarray(Image.open(p).convert("RGB")), "label": i % 10})
res = {"disk MB": sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 1e6}
ds = StreamingDataset(local=out, shuffle=True, batch_size=256)
t = time.perf_counter(); [ds[i] for i in range(len(ds))]; res["seq"] = len(ds) / (time.perf_counter() - t)
idx = np.random.default_rng(0).integers(0, len(ds), 2000).tolist()
t = time.perf_counter(); [ds[i] for i in idx]; res["ds[i]"] = 2000 / (time.perf_counter() - t)
def coll(items): return np.stack([it["image"] for it in items])
loader = DataLoader(ds, batch_size=256, num_workers=2, collate_fn=coll)
t = time.perf_counter(); n = sum(len(b) for b in loader); res["stream"] = n / (time.perf_counter() - t)
print(json.dumps(res))
"""


def mosaic(python: str, paths: list[str], work: Path) -> dict[str, float] | str:
    listing = work / "paths.json"
    listing.write_text(json.dumps(paths))
    proc = subprocess.run(
        [python, "-c", MOSAIC, str(listing), str(work / "mosaic")], capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="reuse a folder between runs (default: a temp dir)")
    parser.add_argument("--mosaic-python", default=sys.executable)
    parser.add_argument("--no-dataloader", action="store_true")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-read-"))
    work.mkdir(parents=True, exist_ok=True)
    paths = make_source(work / "png", args.count)
    from convert.dataset import open_dataset

    layouts: dict[str, Any] = {
        "PNG file per image": PNGFiles(paths),
        "one HDF5 array": OneArray(one_array(paths, work / "one.h5")),
    }
    uris = {}
    for fmt in ("hdf5", "lmdb"):
        for encode in ("raw", "jpeg"):
            uris[f"convert {fmt} {encode}"] = convert_layout(work / "png", work / f"{fmt}-{encode}", fmt, encode)
            layouts[f"convert {fmt} {encode}"] = open_dataset(uris[f"convert {fmt} {encode}"])
    rng = np.random.default_rng(0)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in layouts}
    for _ in range(args.repeats):  # interleaved: every layout once per round
        for name, ds in layouts.items():
            runs[name].append(in_process(ds, rng, singles=2000, batches=8))
    table = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    for name, ds in layouts.items():
        table[name]["disk MB"] = disk_mb(
            uris.get(name) or (str(work / "one.h5") if "array" in name else str(work / "png"))
        )
        if not args.no_dataloader:
            print(name, file=sys.stderr, flush=True)
            for method in ("fork", "spawn"):
                table[name][f"DL {method}"] = dataloader(ds, method)
            if name in uris:
                table[name]["stream"] = streaming(uris[name], str(work / "cache"))
    moz = mosaic(args.mosaic_python, paths, work) if not args.no_dataloader else "skipped"
    if isinstance(moz, dict):
        table["Mosaic streaming raw"] = moz
    report(table, uris, moz, args)


def report(table: dict[str, dict[str, float]], uris: dict[str, str], moz: Any, args: Any) -> None:
    cols = ["seq", "ds[i]", "batch", "DL fork", "DL spawn", "stream", "disk MB"]
    print(f"{args.count} images {SIDE}x{SIDE}, 2 DataLoader workers, medians of {args.repeats} (images/s)")
    print(f"| layout | {' | '.join(cols)} |\n|---|" + "---:|" * len(cols))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:,.0f}" if c in row else "—" for c in cols) + " |")
    if not isinstance(moz, dict):
        print(f"Mosaic streaming: not measured ({moz})")
    png, arr = table["PNG file per image"], table["one HDF5 array"]
    print("\ntargets:")
    for name in uris:
        row = table[name]
        ok = row["batch"] >= 10 * png["batch"] and row["batch"] >= arr["batch"]
        print(
            f"  {name}: random batch {row['batch'] / png['batch']:.1f}x PNG (>= 10x), "
            f"{row['batch'] / arr['batch']:.2f}x one-array (>= 1x): {'met' if ok else 'MISSED'}"
        )
        if name.endswith("raw"):
            ok = row["seq"] >= 20 * png["seq"]
            print(
                f"  {name}: sequential {row['seq'] / png['seq']:.1f}x PNG (>= 20x): {'met' if ok else 'MISSED'}; "
                f"{row['seq'] / arr['seq']:.2f}x one-array"
            )
        if "stream" in row and isinstance(moz, dict):
            ok = row["stream"] >= moz["stream"]
            print(
                f"  {name}: StreamingDataset 2 workers {row['stream'] / moz['stream']:.2f}x Mosaic: {'met' if ok else 'MISSED'}"
            )
        if "lmdb" in name:
            disk, payload = lmdb_payload_ratio(uris[name])
            ok = disk <= 1.1 * payload
            print(
                f"  {name}: shards {disk:.1f} MB for {payload:.1f} MB payload (+{100 * (disk / payload - 1):.1f}%, "
                f"<= 10%): {'met' if ok else 'MISSED'}"
            )


if __name__ == "__main__":
    main()
