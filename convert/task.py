"""The shard task: everything a worker needs, decided once on the client.

The orchestrator plans the source, resolves what the config leaves open (the source kind, where
local items may come from, every format option, the kept columns, the fingerprint, the run id that
fences publishing) and ships one frozen `ShardTask` per shard. The worker (`convert.worker`)
executes it and derives nothing: two derivations of the same decision on either side of Dask
disagreed before (a folder of URL lists lost its local-path rules on the workers).

A task holds names and small settings, never items or image bytes: its pickled size is constant
(about 1.5 kB; `tests/benchmarks/bench_task.py` prints it).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import Config, ImageConfig
from .fetch.policy import FetchPolicy
from .plan import fingerprint, output_settings
from .specs import Column, InputSlice, ShardSpec
from .store import is_local

#: how a shard's items are fetched: "curl" (one libcurl multi handle driven from the converting
#: thread), "threads" (one item per prefetch thread: GETs that take milliseconds and may hang),
#: "grouped" (several cached local files per prefetch task)
FETCH_MODES = ("curl", "threads", "grouped")


@dataclass(frozen=True, slots=True)
class OutputTarget:
    """Where and how the shard is written: the store root, its format and the format's whole section."""

    uri: str
    storage_options: dict[str, Any]  # secrets only as ${...} references (convert.secrets)
    format: str
    options: dict[str, Any]  # output.<format>.*, validated, defaults filled


@dataclass(frozen=True, slots=True)
class ItemPlan:
    """What the worker does with every item of the shard."""

    image: ImageConfig
    columns: tuple[Column, ...]  # stored beside each image, in order: the list's, then the digest
    list_columns: int  # how many leading `columns` come from the list (ItemRef.columns)
    hash: str  # "sha256" | "md5" | "": digest of the source bytes (fetch.compute_hash)
    hash_slot: int  # where in `columns` the digest is stored (a list column of that name is replaced), -1 = none
    hash_column: int  # index into ItemRef.columns of the list's expected digest, -1 = none
    max_text_bytes: int
    fetch: str  # one of FETCH_MODES
    depth: int  # fetch.threads: items in flight
    prefetch_bytes: int


@dataclass(frozen=True, slots=True)
class ShardTask:
    """One shard's work, fully decided: its slices, a fetch policy per slice, output, items, fencing."""

    spec: ShardSpec
    kind: str  # the resolved source kind: "folder" | "urls" | "cifar"
    policies: tuple[FetchPolicy, ...]  # one per spec.slices entry (local roots from that slice's own list)
    source_options: dict[str, Any]  # to read the input slices (references, resolved in the worker)
    work_options: dict[str, Any]  # to read the planner's files in the output (label table, listings)
    output: OutputTarget
    items: ItemPlan
    fingerprint: str
    run_id: str  # the fencing token: publishing succeeds only while the output's lease carries it

    @property
    def name(self) -> str:
        return self.spec.name

    def __len__(self) -> int:
        return len(self.spec)


def _local_path(uri: str) -> str:
    return os.path.abspath(uri.split("://", 1)[1] if "://" in uri else uri)


class TaskMaker:
    """Builds the shard tasks of one run: the shared decisions once, then one small value per spec.

    `columns` is the kept-column schema the planner found (list sources); `run_id` the lease's.
    """

    def __init__(self, config: Config, kind: str, columns: Sequence[Column] = (), run_id: str = "") -> None:
        self.config, self.kind, self.run_id = config, kind, run_id
        self._settings = output_settings(config.redacted())
        # The kept columns as resolved (names, types, from which list columns: SourceRef.columns in
        # the fingerprint), not the raw settings: caption_column "auto" and "caption" that pick the
        # same column make the same shards.
        self._settings["source"] = {
            "columns": [[c.name, c.type] for c in columns],
            "max_text_bytes": config.source.max_text_bytes,
        }
        self._base = _base_policy(config)
        self._policies: dict[str, FetchPolicy] = {}  # by list directory: a few per run, not per shard
        out = config.output
        self._output = OutputTarget(out.uri, dict(out.storage_options), out.format, dict(out.format_options()))
        self._items = _item_plan(config, kind, tuple(columns))

    @property
    def items(self) -> ItemPlan:
        return self._items

    def fingerprint(self, spec: ShardSpec) -> str:
        return fingerprint(spec, self._settings)

    def task(self, spec: ShardSpec, fp: str | None = None) -> ShardTask:
        policies = tuple(self._policy(sl) for sl in spec.slices)
        return ShardTask(
            spec,
            self.kind,
            policies,
            dict(self.config.source.storage_options),
            dict(self.config.output.storage_options),
            self._output,
            self._items,
            fp if fp is not None else self.fingerprint(spec),
            self.run_id,
        )

    def _policy(self, sl: InputSlice) -> FetchPolicy:
        """A URL list's items may be local files only when the list itself is local, and then only
        under that list's own directory or source.allowed_roots; a folder is listed by us."""
        if self.kind != "urls":
            return self._base
        if not is_local(sl.uri):
            key = ""
        else:
            key = os.path.dirname(_local_path(sl.uri))
        found = self._policies.get(key)
        if found is None:
            if key:
                roots = (key, *map(os.path.abspath, self.config.source.allowed_roots))
                found = dataclasses.replace(self._base, allow_local=True, local_roots=roots)
            else:
                found = dataclasses.replace(self._base, allow_local=False, local_roots=None)
            self._policies[key] = found
        return found


def _base_policy(config: Config) -> FetchPolicy:
    """FetchPolicy from fetch.*: every field named alike on both is copied (a new fetch setting
    needs one field on each side, nothing here); the source's storage options for object reads."""
    names = {f.name for f in dataclasses.fields(FetchPolicy)}
    values = {n: getattr(config.fetch, n) for n in names if n in type(config.fetch).model_fields}
    values["storage_options"] = dict(config.source.storage_options)
    return FetchPolicy(**values)


def _item_plan(config: Config, kind: str, columns: tuple[Column, ...]) -> ItemPlan:
    algo = "" if config.fetch.compute_hash == "none" else config.fetch.compute_hash
    names = [c.name for c in columns]
    wanted = config.source.hash_column
    hash_index = names.index(wanted) if wanted and wanted in names else -1
    if not algo or kind == "cifar":  # CIFAR records are pixels, not source bytes
        algo, slot, stored = "", -1, columns
    elif algo in names:  # the computed digest takes the place of a list column of that name
        slot = names.index(algo)
        stored = columns[:slot] + (Column(algo, "string"),) + columns[slot + 1 :]
    else:
        slot, stored = len(columns), columns + (Column(algo, "string"),)
    if kind == "urls" and policy_uses_curl(config):
        mode = "curl"
    elif kind == "urls" or not is_local(config.source.uri):
        mode = "threads"
    else:
        mode = "grouped"
    return ItemPlan(
        config.image,
        stored,
        len(columns),
        algo,
        slot,
        hash_index,
        config.source.max_text_bytes,
        mode,
        config.fetch.threads,
        config.fetch.prefetch_bytes,
    )


def policy_uses_curl(config: Config) -> bool:
    """Whether HTTP(S) goes through libcurl here: fetch.backend, or "auto" and pycurl is installed."""
    return _base_policy(config).uses_curl
