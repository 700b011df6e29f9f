"""Shard tasks for tests and tools that run one shard without the orchestrator.

`shard_task(spec, config)` makes the task the orchestrator would (convert.task.TaskMaker: the
source kind resolved as the planner does, a policy per slice, the format's options, the
fingerprint); `run_shard` executes it in this process.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import Config
from ..fetch.policy import FetchPolicy
from ..sources import resolve_kind
from ..specs import Column, InputSlice, ShardRecord, ShardSpec, SourceRef
from ..task import ShardTask, TaskMaker
from ..worker import process_shard


def shard_task(
    spec: ShardSpec, config: Config, kind: str | None = None, run_id: str = "", columns: Sequence[Column] = ()
) -> ShardTask:
    """The task for `spec` under `config`, decided as `convert.run` decides it."""
    config = config.with_absolute_paths()
    return TaskMaker(config, kind or resolve_kind(config.source), columns, run_id).task(spec)


def run_shard(spec: ShardSpec, config: Config, **kwargs: object) -> ShardRecord:
    """process_shard(shard_task(spec, config, ...)) in this process."""
    return process_shard(shard_task(spec, config, **kwargs))  # type: ignore[arg-type]


def fetch_policy(config: Config, kind: str = "urls", list_uri: str | None = None) -> FetchPolicy:
    """The fetch policy a task would carry for an item of the list `list_uri` (default: source.uri)."""
    config = config.with_absolute_paths()
    sl = InputSlice("txt", list_uri or config.source.uri, "", 0, 0, 0, 0, 0)
    return TaskMaker(config, kind).task(ShardSpec(0, "shard-00000", (sl,), SourceRef(kind))).policies[0]
