"""`cluster.kind: auto` (the default): a small plan runs in this process, a larger one on a LocalCluster.

A LocalCluster costs ~1.5 s of a run's wall time on a 2-core machine before the first shard runs
(scheduler, worker processes, their imports) and more to shut down; threads in this process start at
once and the decoders and libcurl release the GIL, but the per-item Python work shares one
interpreter. Measured on 2 cores (folder of 128x128 JPEGs -> 64x64 HDF5, whole process, threads vs
LocalCluster): 4,000 items 2.2-3.8 s vs 5.0-6.4 s; 16,000 items (16 shards) 4.6-5.5 s vs 4.0-6.0 s,
the break-even. Again with libcurl and the lazy dashboard (URL list of 200-600 px photos over
loopback -> 64x64, 250 per shard, medians): 5,000 URLs 1,187 vs 942 img/s (threads 1.26x), 20,000
URLs 1,379 vs 1,305 img/s (1.06x). The rule stays below the break-even (README's cluster section):

    in process  when the plan has <= SMALL_SHARDS shards to convert and <= SMALL_ITEMS items
    LocalCluster otherwise (and whenever the plan size is not known)

`choose_cluster` is a pure function of the cluster config and the plan size; the run's `cluster:`
line carries its reason. A scheduler address / file, `local`, `threads` and batch kinds are kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import ClusterConfig, SourceConfig

#: the largest plan that runs in process (shards to convert, items in them)
SMALL_SHARDS = 64
SMALL_ITEMS = 10_000

#: a local list file at least this large is obviously a large job: its LocalCluster starts while planning
LARGE_LIST_BYTES = 1 << 20  # ~15k URLs of ~70 bytes


@dataclass(frozen=True)
class Choice:
    """The cluster a run uses and why (shown on the run's `cluster:` line)."""

    config: ClusterConfig
    reason: str = ""


def usable_cpus() -> int:
    """CPUs this process may run on (affinity-aware, e.g. under taskset or a cgroup cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_cluster(cfg: ClusterConfig, shards: int | None = None, items: int | None = None) -> Choice:
    """Resolve `kind: auto` for a plan of `shards` shards holding `items` items (None: not known yet)."""
    if cfg.kind != "auto":
        return Choice(cfg)
    if cfg.scheduler or cfg.scheduler_file:
        return Choice(cfg.model_copy(update={"kind": "local"}))  # connect to it (its line names it)
    local = cfg.model_copy(update={"kind": "local"})
    if shards is None or items is None:
        return Choice(local, "auto: plan size not known")
    size = f"{shards} shard{'s' if shards != 1 else ''}, {items} items"
    if shards <= SMALL_SHARDS and items <= SMALL_ITEMS:
        threads = cfg.workers or max(1, min(shards, usable_cpus()))
        small = cfg.model_copy(update={"kind": "threads", "workers": threads})
        return Choice(small, f"auto: {size} <= {SMALL_SHARDS} shards and {SMALL_ITEMS} items")
    return Choice(local, f"auto: {size} > {SMALL_SHARDS} shards or {SMALL_ITEMS} items")


def likely_large(source: SourceConfig | None) -> bool:
    """True when the source is obviously a large job before it is planned: a local list file of at
    least LARGE_LIST_BYTES. Folders and remote sources are not guessed at (listing them is planning)."""
    if source is None or "://" in source.uri:
        return False
    try:
        return os.path.isfile(source.uri) and os.path.getsize(source.uri) >= LARGE_LIST_BYTES
    except OSError:
        return False
