"""Elastic resume with real gloo ranks: a StreamingDataLoader checkpoint taken with W ranks and K
workers resumes with W' ranks and K' workers, and the epoch's remaining items are each read exactly
once; a checkpoint of another dataset is refused naming both."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from convert import run  # noqa: E402
from convert.config import load_config  # noqa: E402
from convert.dataset import open_dataset  # noqa: E402
from convert.testing import images as gen  # noqa: E402
from convert.torch import StreamingDataLoader, StreamingDataset  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.cluster]


def _convert(root: Path, out: Path) -> str:
    cfg = load_config(
        None,
        {
            "source.uri": str(root),
            "output.uri": str(out),
            "output.format": "hdf5",
            "image.size": 8,
            "shard.size": 7,
            "cluster.workers": 1,
        },
    )
    assert run(cfg, log=lambda m: None).exit_code() == 0
    return str(out)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("src")
    gen.write_image_folder(root, {"a": 25, "b": 22, "c": 16}, size=(24, 20))  # 63 items, 9 shards
    other = tmp_path_factory.mktemp("src2")
    gen.write_image_folder(other, {"a": 5, "b": 4}, size=(24, 20))
    return _convert(root, tmp_path_factory.mktemp("out")), _convert(other, tmp_path_factory.mktemp("out2"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _run(
    tmp: Path,
    uri: str,
    tag: str,
    world: int,
    workers: int,
    stop_after: int | None = None,
    states: list[Path] | None = None,
) -> list[dict]:
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
            str(Path(__file__).with_name("elastic_ranks.py")),
            str(r),
            str(world),
            str(port),
            uri,
            str(workers),
            str(outs[r]),
        ]
        cmd += ["--stop-after", str(stop_after)] if stop_after else []
        cmd += ["--state", str(states[r % len(states)])] if states else []
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0] * world
    results = [json.loads(o.read_text()) for o in outs]
    for r, res in enumerate(results):
        if res["state"] is not None:
            (tmp / f"{tag}-{r}.state").write_text(json.dumps(res["state"]))
    return results


@pytest.mark.timeout(900)
@pytest.mark.parametrize("old, new", [((2, 2), (3, 3)), ((4, 2), (2, 3))], ids=["2x2-to-3x3", "4x2-to-2x3"])
def test_elastic_resume_reads_every_remaining_item_once(datasets, tmp_path, old, new):
    uri, _ = datasets
    everything = Counter(open_dataset(uri)[i]["key"] for i in range(len(open_dataset(uri))))
    head = _run(tmp_path, uri, "head", *old, stop_after=3)
    assert all(len(r["keys"]) == 9 for r in head)  # 3 batches of 3 on every rank
    states = [tmp_path / f"head-{r}.state" for r in range(old[0])]
    tail = _run(tmp_path, uri, "tail", *new, states=states)
    seen = Counter(k for r in head + tail for k in r["keys"])
    assert seen == everything  # every item exactly once over the head and the resumed ranks
    remaining = len(everything) - 9 * old[0]
    assert sum(len(r["keys"]) for r in tail) == remaining
    assert all(r["len"] == -(-len(r["keys"]) // 3) for r in tail)  # len(loader) is the rest's batches


def test_a_checkpoint_of_another_dataset_is_refused(datasets):
    uri, other = datasets
    loader = StreamingDataLoader(StreamingDataset(uri, seed=7), batch_size=3)
    it = iter(loader)
    next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    with pytest.raises(ValueError, match="cannot resume: the checkpoint is of index .* this dataset is index") as err:
        StreamingDataLoader(StreamingDataset(other, seed=7), batch_size=3).load_state_dict(state)
    assert "\n" not in str(err.value)
    assert state["dataset"] in str(err.value)


def test_elastic_in_process_num_workers_0_to_2(datasets, monkeypatch):
    """A state of one process with 0 workers resumes in 2 ranks x 2 workers (RANK/WORLD_SIZE env)."""
    uri, _ = datasets
    loader = StreamingDataLoader(StreamingDataset(uri, seed=3), batch_size=4)
    it = iter(loader)
    head = [k for _ in range(5) for k in next(it)["key"]]
    state = json.loads(json.dumps(loader.state_dict()))
    del it
    rest = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        resumed = StreamingDataLoader(StreamingDataset(uri, seed=3), batch_size=4, num_workers=2)
        resumed.load_state_dict(state)
        rest += [k for b in resumed for k in b["key"]]
    assert sorted(head + rest) == sorted(open_dataset(uri)[i]["key"] for i in range(63))


def test_states_of_unsynchronized_ranks_are_refused(datasets, monkeypatch):
    """A list of every rank's states must be of one step: else a one-line error, not a silent gap."""
    uri, _ = datasets
    states = []
    for rank, steps in ((0, 2), (1, 3)):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = StreamingDataLoader(StreamingDataset(uri, seed=3), batch_size=4)
        it = iter(loader)
        for _ in range(steps):
            next(it)
        states.append(json.loads(json.dumps(loader.state_dict())))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"different \(epoch, batches\) \[\(0, 2\), \(0, 3\)\]"):
        StreamingDataLoader(StreamingDataset(uri, seed=3), batch_size=4).load_state_dict(states)
    states[1] = states[0] | {"rank": 1}  # one step: the list resumes like one state
    resumed = StreamingDataLoader(StreamingDataset(uri, seed=3), batch_size=4)
    resumed.load_state_dict(states)
    assert resumed.dataset.offset == 2 * 2 * 4
