"""The end-of-run messages: top failure reasons, why shards are rebuilt, which old shards are removed.

Pure functions are checked directly; the run-level behaviour (a no-op rerun's rate, a settings change,
a format switch cleaning the old shards) by running the real CLI in test_cli.py.
"""

from __future__ import annotations

from convert.config import load_config
from convert.specs import ItemResult, Status
from convert.shards import stale_shard_files
from convert.summary import LedgerTally, explain_changes, rebuild_message, top_failures


def rows(*statuses: str) -> list[LedgerTally]:
    """One shard's tally of items k0, k1, ... with these statuses."""
    return [LedgerTally.of(ItemResult(f"k{i}", f"u{i}", None, Status(s)) for i, s in enumerate(statuses))]


def test_top_failures_orders_by_count_and_keeps_first_keys():
    found = top_failures(
        rows("ok", "not_found", "decode_error", "not_found", "timeout", "not_found", "decode_error", "bad_url", "ok")
    )
    assert found == [("not_found", 3, ["k1", "k3"]), ("decode_error", 2, ["k2", "k6"]), ("timeout", 1, ["k4"])]
    assert top_failures(rows("ok", "ok")) == []
    assert top_failures(rows("timeout"), n=3, examples=2) == [("timeout", 1, ["k0"])]


def test_top_failures_across_shards_keeps_shard_order_and_bounds_examples():
    first, second = rows("timeout", "ok"), rows("timeout", "timeout", "not_found")
    assert top_failures(first + second) == [("timeout", 3, ["k0", "k0"]), ("not_found", 1, ["k2"])]
    assert LedgerTally.of(ItemResult(f"k{i}", "u", None, Status.TIMEOUT) for i in range(1000)).examples == {
        "timeout": ("k0", "k1")
    }


def test_tally_counts_only_429_and_5xx_http_errors_as_transient():
    tally = LedgerTally.of(
        [
            ItemResult("a", "u", None, Status.HTTP_ERROR, "HTTP 503 Service Unavailable"),
            ItemResult("b", "u", None, Status.HTTP_ERROR, "HTTP 410 Gone"),
            ItemResult("c", "u", None, Status.NOT_FOUND, "HTTP 404"),
        ]
    )
    assert tally.counts == {"http_error": 2, "not_found": 1} and tally.transient["http_error"] == 1


def test_explain_changes_names_only_output_settings():
    old = load_config(None, {"source.uri": "in", "output.uri": "out", "image.size": 64}).redacted()
    new = load_config(
        None, {"source.uri": "in", "output.uri": "out", "image.size": 32, "fetch.timeout": 99, "cluster.workers": 3}
    ).redacted()
    assert explain_changes(old, new) == ["image.size changed: 64 → 32"]
    fmt = load_config(
        None,
        {"source.uri": "in", "output.uri": "out", "image.size": 64, "output.format": "lmdb", "image.encode": "png"},
    ).redacted()
    assert explain_changes(old, fmt) == ["image.encode changed: raw → png", "output.format changed: hdf5 → lmdb"]
    assert explain_changes(None, new) == [] and explain_changes(old, old) == []
    assert rebuild_message(old, new, 3) == "image.size changed: 64 → 32; 3 shards will be rebuilt"
    assert rebuild_message(old, new, 1).endswith("1 shard will be rebuilt")
    assert rebuild_message(old, old, 3) is None


def test_stale_shard_files_are_other_formats_and_out_of_plan_names_only():
    names = [
        "shard-00000.h5",
        "shard-00000.record.gz",
        "shard-00001.h5",
        "shard-00001.record.gz",
        "shard-00000.lmdb",
        "shard-00002.lmdb",
        "shard-00002.record.gz",
        "shard-00003.h5",
        ".shard-00001.abc.partial.h5",
        "notes.txt",
    ]
    listed = ["shard-00000.h5", "shard-00000.record.gz"]  # shard-00001 failed this run: left for the rerun
    plan = ["shard-00000", "shard-00001", "shard-00002"]
    assert stale_shard_files(names, listed, plan, ".h5") == ["shard-00000.lmdb", "shard-00002.lmdb", "shard-00003.h5"]
