"""convert.torch with real torch: DataLoader workers (fork, spawn), torch.distributed (gloo) ranks,
mid-epoch resume across process restarts, and S3 (moto) streaming through a bounded cache.

Skipped when torch is missing, unless CONVERT_REQUIRE_TORCH=1 (as in CI): then they fail instead.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("CONVERT_REQUIRE_TORCH") == "1":
    import torch
else:
    torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader  # noqa: E402

from convert import run  # noqa: E402
from convert.config import load_config  # noqa: E402
from convert.dataset import open_dataset  # noqa: E402
from convert.testing import images as gen  # noqa: E402
from convert.torch import StreamingDataLoader, StreamingDataset  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.cluster]


def _convert(root: Path, out: Path, fmt: str, encode: str) -> str:
    cfg = load_config(
        None,
        {
            "source.uri": str(root),
            "output.uri": str(out),
            "output.format": fmt,
            "image.size": 8,
            "image.encode": encode,
            "shard.size": 7,
            "cluster.workers": 1,
        },
    )
    assert run(cfg, log=lambda m: None).exit_code() == 0
    return str(out)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    gen.write_image_folder(root, {"a": 25, "b": 22, "c": 16}, size=(24, 20))  # 63 items, 9 shards
    return root


@pytest.fixture(scope="module", params=[("hdf5", "raw"), ("lmdb", "jpeg")], ids=["hdf5-raw", "lmdb-jpeg"])
def dataset_dir(request, source, tmp_path_factory):
    fmt, encode = request.param
    return _convert(source, tmp_path_factory.mktemp(f"out-{fmt}-{encode}"), fmt, encode)


def _by_key(uri: str) -> dict[str, dict]:
    ds = open_dataset(uri)
    return {ds[i]["key"]: ds[i] for i in range(len(ds))}


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers_see_every_item_once(dataset_dir, method, tmp_path):
    ds = StreamingDataset(dataset_dir, seed=1, cache_dir=tmp_path / "cache")
    loader = DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context=method)
    expected = _by_key(dataset_dir)
    keys = []
    for batch in loader:
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (8, 8, 3)
        for key, image, label in zip(batch["key"], batch["image"], batch["label"]):
            np.testing.assert_array_equal(image.numpy(), expected[key]["image"])
            assert int(label) == expected[key]["label"]
        keys += batch["key"]
    assert sorted(keys) == sorted(expected) and len(keys) == len(expected)
    assert keys != sorted(keys, key=list(expected).index)  # shuffled


def test_batches_in_workers_and_chw(dataset_dir, tmp_path):
    ds = StreamingDataset(dataset_dir, seed=2, batch_size=8, chw=True, cache_dir=tmp_path / "cache")
    loader = StreamingDataLoader(ds, num_workers=2)
    batches = list(loader)
    assert all(b["image"].shape[1:] == (3, 8, 8) for b in batches)
    assert sorted(k for b in batches for k in b["key"]) == sorted(_by_key(dataset_dir))


@pytest.mark.parametrize("partition", ["exact", "drop", "pad"])
def test_len_is_true_and_only_the_last_batch_is_short(dataset_dir, partition, tmp_path, monkeypatch):
    """2 workers used to end with a short batch each (len(loader) 79, 80 batches yielded)."""
    expected = {"exact": 63, "drop": 62, "pad": 64}[partition]
    for batched_in in ("loader", "dataset"):
        keys = []
        for rank in range(2):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            ds = StreamingDataset(
                dataset_dir,
                seed=3,
                partition=partition,
                cache_dir=tmp_path / "cache",
                batch_size=8 if batched_in == "dataset" else None,
            )
            loader = StreamingDataLoader(ds, num_workers=2, **({"batch_size": 8} if batched_in == "loader" else {}))
            sizes = [len(b["key"]) for b in loader]
            assert len(sizes) == len(loader), (batched_in, rank, sizes)
            assert all(n == 8 for n in sizes[:-1]) and 0 < sizes[-1] <= 8, sizes
            keys += [k for b in loader for k in b["key"]]
        assert len(keys) == expected and len(set(keys)) == min(expected, 63) and set(keys) <= set(_by_key(dataset_dir))


def _free_port() -> int:
    """A port free on every address: gloo's TCPStore listens on all of them, and a port free on
    127.0.0.1 may still be held on 127.0.0.x by another test's client socket (EADDRINUSE)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _run_ranks(
    tmp: Path,
    uri: str,
    tag: str,
    epoch: int = 0,
    stop_after: int | None = None,
    resume: str | None = None,
    world: int = 2,
) -> list[dict]:
    """Start `world` rank processes (tests/torch_ranks.py) and return what each read."""
    port = _free_port()
    outs = [tmp / f"{tag}-{r}.json" for r in range(world)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    procs = []
    for r in range(world):
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("torch_ranks.py")),
            str(r),
            str(world),
            str(port),
            uri,
            str(epoch),
            str(outs[r]),
        ]
        cmd += ["--stop-after", str(stop_after)] if stop_after else []
        cmd += ["--state", str(tmp / f"{resume}-{r}.state")] if resume else []
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0] * world
    results = [json.loads(o.read_text()) for o in outs]
    for r, res in enumerate(results):
        if res["state"] is not None:
            (tmp / f"{tag}-{r}.state").write_text(json.dumps(res["state"]))
    return results


@pytest.fixture(scope="module")
def raw_dir(source, tmp_path_factory):
    return _convert(source, tmp_path_factory.mktemp("out-ranks"), "hdf5", "raw")


@pytest.mark.timeout(900)
def test_distributed_ranks_partition_the_epoch(raw_dir, tmp_path):
    dataset_dir = raw_dir
    first = _run_ranks(tmp_path, dataset_dir, "a")
    ranks = [set(r["keys"]) for r in first]
    assert ranks[0] | ranks[1] == set(_by_key(dataset_dir)) and not ranks[0] & ranks[1]
    assert sum(len(r["keys"]) for r in first) == len(_by_key(dataset_dir))
    again = _run_ranks(tmp_path, dataset_dir, "b")
    assert [r["keys"] for r in again] == [r["keys"] for r in first]  # same seed: same order
    other = _run_ranks(tmp_path, dataset_dir, "c", epoch=1)
    assert [r["keys"] for r in other] != [r["keys"] for r in first]
    assert [set(r["keys"]) for r in other][0] | [set(r["keys"]) for r in other][1] == set(_by_key(dataset_dir))


@pytest.mark.timeout(900)
def test_mid_epoch_resume_after_restart(raw_dir, tmp_path):
    full = _run_ranks(tmp_path, raw_dir, "full", epoch=2)
    for stop_after in (3, 4):  # an odd and an even number of batches taken from the 2 workers
        head = _run_ranks(tmp_path, raw_dir, f"head{stop_after}", epoch=2, stop_after=stop_after)
        assert all(len(r["keys"]) == 3 * stop_after for r in head)
        tail = _run_ranks(tmp_path, raw_dir, f"tail{stop_after}", epoch=2, resume=f"head{stop_after}")
        assert [h["keys"] + t["keys"] for h, t in zip(head, tail)] == [f["keys"] for f in full]


def test_in_process_state_dict(dataset_dir, tmp_path):
    ds = StreamingDataset(dataset_dir, seed=4, cache_dir=tmp_path / "cache")
    full = [s["key"] for s in ds]
    it = iter(ds)
    head = [next(it)["key"] for _ in range(10)]
    state = json.loads(json.dumps(ds.state_dict()))
    resumed = StreamingDataset(dataset_dir, seed=4, cache_dir=tmp_path / "cache")
    resumed.load_state_dict(state)
    assert head + [s["key"] for s in resumed] == full
    with pytest.raises(ValueError, match="seed"):
        StreamingDataset(dataset_dir, seed=5).load_state_dict(state)


@pytest.mark.s3
def test_s3_streaming_through_a_cache_smaller_than_the_dataset(s3, source, tmp_path):
    local = _convert(source, tmp_path / "local", "hdf5", "raw")
    fs = s3.filesystem()
    fs.put(local + "/", "test-bucket/ds/", recursive=True)
    shard_bytes = [s["bytes"] for s in open_dataset(local).manifest["shards"]]
    limit = 3 * max(shard_bytes)
    assert limit < sum(shard_bytes)
    cache = tmp_path / "cache"
    remote = StreamingDataset(
        "s3://test-bucket/ds",
        seed=9,
        storage_options=s3.storage_options(),
        cache_dir=cache,
        cache_limit=limit,
        prefetch_shards=1,
    )
    peak, done = [0], threading.Event()

    def size(p: Path) -> int:
        try:
            return p.stat().st_size if p.is_file() and not p.name.endswith(".lock") else 0
        except FileNotFoundError:  # a .partial renamed (or an evicted shard deleted) since the glob
            return 0

    def watch() -> None:  # (a watcher that died on such a race would have stopped updating the peak)
        while not done.is_set():
            peak[0] = max(peak[0], sum(size(p) for p in cache.glob("*")))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        got = [b for b in StreamingDataLoader(remote, batch_size=4, num_workers=2)]
    finally:
        done.set()
        watcher.join()
    want = list(StreamingDataLoader(StreamingDataset(local, seed=9), batch_size=4, num_workers=2))
    assert [b["key"] for b in got] == [b["key"] for b in want]
    for a, b in zip(got, want):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert 0 < peak[0] <= limit
