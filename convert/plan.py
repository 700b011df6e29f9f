"""Planner: a pure function from item references to frozen, picklable shard specs.

Same items + same shard size = same plan (names, membership, order), which is what makes
resume and concurrent duplicate attempts safe: a shard's identity is its name plus a fingerprint
of its contents and the output-affecting config.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

from .specs import ItemRef, ShardSpec, shard_name


def plan_shards(items: Sequence[ItemRef], shard_size: int) -> list[ShardSpec]:
    """Split `items` in input order into shards of `shard_size` (the last may be shorter)."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return [
        ShardSpec(index=i, name=shard_name(i), items=tuple(items[start : start + shard_size]))
        for i, start in enumerate(range(0, len(items), shard_size))
    ]


def output_settings(config_data: dict[str, Any]) -> dict[str, Any]:
    """The parts of a (redacted, JSON-mode) config that change shard bytes."""
    out = config_data["output"]
    return {
        "image": config_data["image"],
        "format": out["format"],
        "compression": out["compression"],
        "compression_level": out["compression_level"],
    }


def fingerprint(spec: ShardSpec, settings: dict[str, Any]) -> str:
    """sha256 over the shard's item references and the output-affecting settings.

    A committed shard is reused on resume only if its record carries the same fingerprint,
    so changing the image size or the input list never silently mixes old shards in.
    """
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    for ref in spec.items:
        h.update(json.dumps([ref.key, ref.uri, ref.label, ref.member]).encode())
        h.update(b"\n")
    return h.hexdigest()
