"""The columns stored beside each image: list values (caption, user columns) and the source digest.

Worker side, one `ItemColumns` per shard, built from the task's `ItemPlan`. Per item it computes
the digest of the fetched bytes (`fetch.compute_hash`), checks it against the list's digest column
(`source.hash_column`) and caps text values at `source.max_text_bytes`, counting what it cut.
A mismatch or a malformed expected digest is the item's `hash_mismatch` status, never a shard error;
a list value its column's type cannot hold (`sources.columns.Unfit`) is the item's `error` status.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from .sources.columns import Unfit
from .specs import ItemError, ItemRef, Status
from .task import ItemPlan

_HEX = re.compile(r"[0-9a-f]+")
_ALGO_BY_LENGTH = {64: "sha256", 32: "md5", 40: "sha1"}


def cap_text(text: str, limit: int) -> tuple[str, bool]:
    """`text` cut to at most `limit` UTF-8 bytes on a character boundary; (text, was_cut)."""
    if len(text) * 4 <= limit:  # a character is at most 4 bytes: no need to encode
        return text, False
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text, False
    return raw[:limit].decode("utf-8", "ignore"), True


def unfit_value(ref: ItemRef) -> Unfit | None:
    """The first of an item's list values that does not fit its column, if any."""
    return next((v for v in ref.columns if isinstance(v, Unfit)), None) if ref.columns else None


class ItemColumns:
    """Per-shard column work and its counters (`truncated`, `replaced`: text values cut or holding
    U+FFFD, the replacement of invalid UTF-8 in the list)."""

    def __init__(self, plan: ItemPlan) -> None:
        self.plan = plan
        self.truncated = 0
        self.replaced = 0
        self._text = [i for i, c in enumerate(plan.columns[: plan.list_columns]) if c.type == "string"]

    @staticmethod
    def check(ref: ItemRef) -> None:
        """ItemError(error) when the item's list row or one of its values is unusable (`Unfit`):
        this item fails, not the shard."""
        unfit = unfit_value(ref)
        if unfit is not None:
            raise ItemError(Status.ERROR, unfit.message)

    def digest(self, ref: ItemRef, data: Any) -> str:
        """The digest of the source bytes ("" when none is computed or the value is not bytes);
        ItemError(hash_mismatch) when the list's expected digest differs or is malformed,
        ItemError(error) when one of the item's list values does not fit its column."""
        plan = self.plan
        self.check(ref)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return ""
        expected = ref.columns[plan.hash_column] if 0 <= plan.hash_column < len(ref.columns) else None
        computed = hashlib.new(plan.hash, data).hexdigest() if plan.hash else ""
        if expected is None:
            return computed
        want = str(expected).strip().lower()
        algo = _ALGO_BY_LENGTH.get(len(want))
        if algo is None or not _HEX.fullmatch(want):
            raise ItemError(
                Status.HASH_MISMATCH,
                f"the list's digest {str(expected)[:40]!r} is not a sha256/md5 hex "
                "digest; fix the hash column or unset source.hash_column",
            )
        got = computed if algo == plan.hash else hashlib.new(algo, data).hexdigest()
        if got != want:
            raise ItemError(Status.HASH_MISMATCH, f"{algo} of the fetched bytes {got[:12]} != list {want[:12]}")
        return computed

    def values(self, ref: ItemRef, digest: str) -> tuple[Any, ...]:
        """The stored column values of one ok item, in the plan's column order."""
        plan = self.plan
        values = list(ref.columns[: plan.list_columns])
        values += [None] * (plan.list_columns - len(values))
        for i in self._text:
            text = values[i]
            if isinstance(text, str) and text:
                if "\ufffd" in text:
                    self.replaced += 1
                values[i], cut = cap_text(text, plan.max_text_bytes)
                self.truncated += cut
        if plan.hash_slot >= 0:
            if plan.hash_slot == len(values):
                values.append(digest or None)
            else:
                values[plan.hash_slot] = digest or None
        return tuple(values)

    def counters(self) -> dict[str, int]:
        """What the shard record carries of these counters (only the non-zero ones)."""
        found = {"text_truncated": self.truncated, "text_replaced": self.replaced}
        return {k: v for k, v in found.items() if v}
