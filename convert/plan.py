"""Planner: pure functions from input slices to frozen, constant-size shard specs, and the plan file.

Same input and config = same plan (names, slices, order), which is what makes resume and concurrent
duplicate attempts safe: a shard's identity is its name plus a fingerprint of its input slice and
the output-affecting config. Specs name slices (file, byte/row range, first row), never items, so
the plan and everything that crosses to the workers is O(shards).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import persist
from .config import ImageConfig
from .redact import redact_url
from .specs import InputSlice, ShardSpec, SourceRef, shard_name


def make_specs(groups: Sequence[tuple[InputSlice, ...]], source: SourceRef) -> list[ShardSpec]:
    """One spec per group of slices, named in order: shard-00000, shard-00001, ..."""
    return [ShardSpec(index=i, name=shard_name(i), slices=tuple(g), source=source) for i, g in enumerate(groups)]


def cut_rows(files: Sequence[tuple[str, int, str, int]], kind: str, step: int) -> list[tuple[InputSlice, ...]]:
    """Consecutive runs of `step` rows over files of (uri, rows, version, size); a run may span files."""
    if step <= 0:
        raise ValueError(f"shard_size must be positive, got {step}")
    groups: list[tuple[InputSlice, ...]] = []
    current: list[InputSlice] = []
    need, row = step, 0
    for uri, rows, version, size in files:
        at = 0
        while at < rows:
            take = min(need, rows - at)
            current.append(InputSlice(kind, uri, version, size, at, at + take, row, take))
            at, row, need = at + take, row + take, need - take
            if need == 0:
                groups.append(tuple(current))
                current, need = [], step
    if current:
        groups.append(tuple(current))
    return groups


_IMAGE_DEFAULTS = ImageConfig().model_dump(mode="json")


def output_settings(config_data: dict[str, Any]) -> dict[str, Any]:
    """The parts of a (redacted, JSON-mode) config that change shard bytes: the image settings, the
    format and every one of its options, the kept columns and the digest computed per item.

    Missing keys (a manifest written before they existed) read as their defaults then.
    """
    out, src = config_data["output"], config_data["source"]
    fmt = out["format"]
    own = {
        k: v
        for k, v in ((out.get("options") or {}).get(fmt) or {}).items()
        if k not in ("compression", "compression_level")
    }
    return {  # keys flatten to the config's own dotted names (summary.explain_changes shows them)
        "image": {**_IMAGE_DEFAULTS, **config_data["image"]},  # a key added later reads as its default
        "format": fmt,
        "compression": out["compression"],
        "compression_level": out["compression_level"],
        f"output.{fmt}": own,
        "source": {
            "caption_column": src.get("caption_column", "auto"),
            "columns": src.get("columns", []),
            "max_text_bytes": src.get("max_text_bytes", 65536),
            "hash_column": src.get("hash_column"),
        },
        "fetch.compute_hash": config_data.get("fetch", {}).get("compute_hash", "sha256"),
    }


def fingerprint(spec: ShardSpec, settings: dict[str, Any]) -> str:
    """sha256 over the shard's input slices (file, version, range, first row), the source settings
    and the output-affecting settings.

    A committed shard is reused on resume only if its record carries the same fingerprint, so a
    changed list file, image size or label table never silently mixes old shards in.
    """
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    source = spec.source
    h.update(json.dumps([source.kind, source.root, source.labels_sha, source.keys]).encode())
    if source.columns:  # the list columns read, as resolved by the planner (not the raw setting)
        h.update(json.dumps([source.columns, source.column_types]).encode())
    for sl in spec.slices:
        h.update(json.dumps(_identity(sl)).encode())
        h.update(b"\n")
    return h.hexdigest()


def _identity(sl: InputSlice) -> list[Any]:
    """What names a slice's rows: a content hash (the planner's own listing files, which live in the
    output and are rewritten by every run) or the input file's path, size and version."""
    if sl.version.startswith("sha256:"):
        return [sl.kind, sl.version, sl.first_row, sl.count]
    return [sl.kind, sl.uri, sl.size, sl.version, sl.start, sl.stop, sl.first_row, sl.count]


_SLICE_FIELDS = tuple(InputSlice.__dataclass_fields__)


def plan_columns(
    specs: Sequence[ShardSpec], fingerprints: dict[str, str], digests: Sequence[str] = ()
) -> dict[str, Any]:
    """The plan as columns, one row per slice (O(shards)); `read_plan` turns it back into specs.
    `digests`: per slice row, the text lists' slice digests (`run --append` checks them); an
    appended plan has more than one source (each generation its own label table): `sources`."""
    rows = [(spec, sl) for spec in specs for sl in spec.slices]
    sources = list(dict.fromkeys(s.source for s in specs))
    at = {src: i for i, src in enumerate(sources)}
    cols: dict[str, Any] = {
        "shards": [s.name for s in specs],
        "fingerprints": [fingerprints[s.name] for s in specs],
        "source": json.dumps(asdict(specs[0].source)) if specs else "{}",
        "shard": [spec.index for spec, _ in rows],
    }
    if len(sources) > 1:
        cols["sources"] = json.dumps([asdict(src) for src in sources])
        cols["source_of"] = [at[s.source] for s in specs]
    for name in _SLICE_FIELDS:
        cols[f"slice_{name}"] = [getattr(sl, name) for _, sl in rows]
    cols["slice_uri"] = [redact_url(u) for u in cols["slice_uri"]]  # no credentials at rest
    if digests:
        cols["slice_digest"] = list(digests)
    return cols


def dump_plan(specs: Sequence[ShardSpec], fingerprints: dict[str, str], digests: Sequence[str] = ()) -> bytes:
    buf = io.BytesIO()
    persist.dump(plan_columns(specs, fingerprints, digests), buf, compress=("gzip", 6))
    return buf.getvalue()


@dataclass(frozen=True)
class PlanFile:
    """A plan read back: specs (URIs as redacted), each shard's fingerprint, each slice's digest."""

    specs: list[ShardSpec]
    fingerprints: list[str]
    digests: list[str]  # per slice row in spec order ("" where none)


def read_plan(data: bytes) -> list[ShardSpec]:
    """Specs back from `dump_plan` bytes (convert.persist: never unpickled; URIs as redacted)."""
    return read_plan_file(data).specs


def read_plan_file(data: bytes) -> PlanFile:
    cols = persist.load(io.BytesIO(data))
    sources = [SourceRef(**d) for d in json.loads(cols.get("sources") or f"[{cols['source']}]")]
    source_of = [int(i) for i in cols.get("source_of", [0] * len(cols["shards"]))]
    groups: list[list[InputSlice]] = [[] for _ in cols["shards"]]
    for i, shard in enumerate(cols["shard"]):
        groups[int(shard)].append(InputSlice(*(_plain(cols[f"slice_{n}"][i]) for n in _SLICE_FIELDS)))
    specs = [
        ShardSpec(index=i, name=str(name), slices=tuple(g), source=sources[source_of[i]])
        for i, (name, g) in enumerate(zip(cols["shards"], groups))
    ]
    digests = [str(d) for d in cols.get("slice_digest", [""] * len(cols["shard"]))]
    return PlanFile(specs, [str(f) for f in cols["fingerprints"]], digests)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
