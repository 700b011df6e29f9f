"""Submission (convert.submit): tiny shards travel several to an engine task where tasks cost the engine
milliseconds, and every shard still ends alone: its own record, its own retries and failure line.

`Grouping` is the real in-process ThreadExecutor with the capability flag a Dask executor has, so
the batch path runs here without a cluster; tests/test_cluster.py runs it on real Dask processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from convert import run
from convert.config import load_config
from convert.dataset import open_dataset
from convert.executor import Completion
from convert.executor.threads import ThreadExecutor
from convert.sources import Workdir, plan_source
from convert.submit import BATCH_SHARDS, IN_FLIGHT_PER_THREAD, Progress, _Sender, execute, shards_per_task
from convert.testing import images as gen
from convert.testing.tasks import shard_task


class Grouping(ThreadExecutor):
    """Threads that say they cost per task (as Dask does), logging what each engine task carried."""

    groups_small_tasks = True

    def __init__(self, threads: int) -> None:
        super().__init__(threads)
        self.sent: list[tuple[str, int]] = []  # (engine task name, shards in it)

    def submit(self, name: str, fn: Any, *args: Any, retries: int = 0) -> None:
        self.sent.append((name, len(args[0]) if isinstance(args[0], tuple) else 1))
        super().submit(name, fn, *args, retries=retries)


def _config(source: Path, out: Path, **extra: Any) -> Any:
    base = {"source.uri": str(source), "output.uri": str(out), "image.size": 16, "cluster.kind": "threads"}
    return load_config(None, {**base, "shard.size": 2, "cluster.task_retries": 1, **extra}).with_absolute_paths()


def _specs(config: Any, tmp_path: Path) -> list[Any]:
    return plan_source(config.source, config.shard.size, Workdir(str(tmp_path / "work"))).specs


def test_batch_size_follows_the_shards_size_and_the_engine() -> None:
    with Grouping(2) as grouping, ThreadExecutor(2) as plain:
        assert shards_per_task(grouping, 10_000, 100_000) == 40  # 10-item shards: ~400 items a task
        assert shards_per_task(grouping, 10_000, 10_000) == BATCH_SHARDS  # 1-item shards: at most 64
        assert shards_per_task(grouping, 2_000, 2_000_000) == 1  # 1000-item shards travel alone
        assert shards_per_task(grouping, 40, 400) == 40 // (2 * IN_FLIGHT_PER_THREAD * 2)  # every worker fed
        assert shards_per_task(plain, 10_000, 100_000) == 1  # no per-task cost in this process


def test_tiny_shards_travel_in_batches_and_each_is_committed_and_reported(tmp_path: Path) -> None:
    gen.write_image_folder(tmp_path / "src", {"a": 40, "b": 40}, size=(20, 20))
    config = _config(tmp_path / "src", tmp_path / "out")
    specs = _specs(config, tmp_path)
    kept: list[str] = []
    seen: list[Progress] = []
    with Grouping(2) as ex:
        tasks = (shard_task(s, config) for s in specs)
        execute(ex, tasks, len(specs), 80, 1, lambda r: kept.append(r.name), {}, seen.append)
    assert len(specs) == 40 and sorted(kept) == [s.name for s in specs]  # every shard's record, once
    assert max(n for _, n in ex.sent) > 1 and len(ex.sent) < len(specs)  # several shards per engine task
    assert [p.shards_done for p in seen] == list(range(1, 41)) and seen[-1].items_done == 80
    assert sorted(p.name for p in seen) == sorted(kept)  # progress per shard, named


def test_a_shard_failing_in_a_batch_is_retried_alone_and_the_others_stand(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "a.txt").write_text("".join(f"http://127.0.0.1:9/{i}.jpg\n" for i in range(68)))
    (lists / "b.txt").write_text("http://127.0.0.1:9/b0.jpg\nhttp://127.0.0.1:9/b1.jpg\n")
    opts = {"fetch.allow_private_networks": True, "fetch.retries": 0, "shard.size": 1}
    config = _config(lists, tmp_path / "out", **opts)
    specs = _specs(config, tmp_path)
    (lists / "b.txt").write_text("http://127.0.0.1:9/b0.jpg\n")  # the last two shards' list changed
    kept: list[str] = []
    failed: dict[str, str] = {}
    with Grouping(2) as ex:
        tasks = (shard_task(s, config) for s in specs)
        execute(ex, tasks, len(specs), 70, 1, lambda r: kept.append(r.name), failed, None)
    last = [s.name for s in specs[-2:]]
    assert len(specs) == 70 and sorted(failed) == last and all("changed" in e for e in failed.values()), failed
    assert sorted(kept) == [s.name for s in specs[:-2]]  # (port 9 refuses: items fail, shards commit)
    assert (f"{last[0]}+1", 2) in ex.sent  # they travelled together in a batch ...
    assert [name for name, _ in ex.sent if name in last] == last  # ... then each once more, alone


def test_a_batch_lost_as_a_whole_reruns_each_of_its_shards_alone(tmp_path: Path) -> None:
    """A worker that dies mid-batch (the engine's error, not a shard's) costs no shard a retry."""
    gen.write_image_folder(tmp_path / "src", {"a": 8}, size=(20, 20))
    config = _config(tmp_path / "src", tmp_path / "out")
    tasks = [shard_task(s, config) for s in _specs(config, tmp_path)]
    with Grouping(2) as ex:
        sender = _Sender(ex, iter(tasks), 4, retries=0)
        sender.top_up()
        first = ex.sent[0][0]
        assert list(sender.outcomes(Completion(first, error=RuntimeError("worker lost")))) == []
        sender.top_up()  # the lost batch's four shards go out alone, with the retries they had
        assert [n for _, n in ex.sent[-4:]] == [1, 1, 1, 1]
        assert [name for name, _ in ex.sent[-4:]] == [t.name for t in tasks[:4]]
        list(ex.completions())


@pytest.mark.cluster
def test_a_local_cluster_run_of_tiny_shards_batches_and_reads_back(tmp_path: Path) -> None:
    gen.write_image_folder(tmp_path / "src", {"a": 30, "b": 30}, size=(20, 20))
    config = load_config(
        None,
        {
            "source.uri": str(tmp_path / "src"),
            "output.uri": str(tmp_path / "out"),
            "image.size": 16,
            "shard.size": 1,
            "cluster.kind": "local",
            "cluster.workers": 2,
        },
    )
    summary = run(config, log=lambda m: None)
    assert (summary.shards, summary.converted, summary.items_ok, summary.exit_code()) == (60, 60, 60, 0)
    ds = open_dataset(str(tmp_path / "out"))
    assert len(ds) == 60 and sorted(ds[i]["label"] for i in range(60)) == [0] * 30 + [1] * 30
