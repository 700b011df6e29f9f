"""`inspect` and `report` of an image-text dataset made by a real run: columns, captions, and the
permanent statuses `opted_out`, `hash_mismatch` and `filtered`.

The fixture serves JPEGs from a raw 127.0.0.1 HTTP server (one answers `X-Robots-Tag: noai`, one
`X-Robots-Tag: otherbot: noai`, which must be kept) and converts a parquet list with `key`, `url`,
`caption`, `similarity` and `sha256` columns through `python -m convert run` (one digest wrong, one
image below `image.min_size`), so each status comes from the pipeline itself.

Reading column values back needs `Dataset.column` (the formats' side of columns); those checks skip,
saying so, until it exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from convert.testing.images import jpeg_bytes
from convert.testing.rawhttp import ok, raw_servers

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "<script>alert(1)</script>"
LONG = "a long caption " * 20  # 300 characters: trimmed under the thumbnail
# key -> (caption, similarity, how it is served / listed, expected status)
ROWS = {
    "k00": ("a red fox", 0.9, "plain", "ok"),
    "k01": (SCRIPT, 0.5, "plain", "ok"),
    "k02": ("line one\nline two", 0.1, "plain", "ok"),
    "k03": (LONG, 0.3, "plain", "ok"),
    "k04": (None, None, "plain", "ok"),
    "k05": ("", 0.7, "plain", "ok"),
    "k06": ('emoji \U0001f98a "quotes" & <b>', 0.2, "plain", "ok"),
    "k07": ("opted out", 0.4, "noai", "opted_out"),
    "k08": ("another bot's opt-out", 0.6, "otherbot", "ok"),
    "k09": ("wrong digest", 0.8, "bad-digest", "hash_mismatch"),
    "k10": ("too small", 0.05, "small", "filtered"),
    "k11": ("last", 1.0, "plain", "ok"),
}
HEADERS = {"noai": b"X-Robots-Tag: noai\r\n", "otherbot": b"X-Robots-Tag: otherbot: noai\r\n"}
PERMANENT = ("opted_out", "hash_mismatch", "filtered")

pytestmark = pytest.mark.cluster  # `convert run` subprocesses


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}  # the summary table unwrapped, whatever the temp path's length
    return subprocess.run(
        [sys.executable, "-m", "convert", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        timeout=timeout,
        env=env,
    )


def needs_column_reads() -> None:
    from convert.dataset import Dataset

    if not hasattr(Dataset, "column"):
        pytest.skip("Dataset.column is not in this build yet (the formats' side of columns, branch columns-fmt)")


def _serve(files: dict[str, tuple[bytes, bytes]]):
    """A responder: GET /<name> -> that file with its extra header lines; anything else 404."""

    def respond(conn: socket.socket, head: bytes) -> bool:
        path = head.split(b" ", 2)[1].decode()
        found = files.get(path)
        conn.sendall(ok(*found) if found else b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        return True

    return respond


def build_image_text(
    tmp: Path, srv_factory, fmt: str = "hdf5"
) -> tuple[Path, subprocess.CompletedProcess[str], list[str]]:
    """Serve the ROWS' images, write their parquet list and convert it; (the output, the run, its flags)."""
    files: dict[str, tuple[bytes, bytes]] = {}
    urls, digests = [], []
    for i, (key, (_, _, how, _)) in enumerate(ROWS.items()):
        data = jpeg_bytes(12, 10, seed=i) if how == "small" else jpeg_bytes(32, 24, seed=i)
        files[f"/img/{key}.jpg"] = (data, HEADERS.get(how, b""))
        digests.append("0" * 64 if how == "bad-digest" else hashlib.sha256(data).hexdigest())
    srv = srv_factory(_serve(files))
    urls = [f"{srv.url}/img/{key}.jpg" for key in ROWS]
    table = pa.table(
        {
            "key": list(ROWS),
            "url": urls,
            "caption": [r[0] for r in ROWS.values()],
            "similarity": [r[1] for r in ROWS.values()],
            "sha256": digests,
        }
    )
    pq.write_table(table, tmp / "list.parquet")
    out = tmp / "out"
    settings = {
        "source.uri": str(tmp / "list.parquet"),
        "source.columns": '["similarity"]',
        "source.hash_column": "sha256",
        "output.uri": str(out),
        "output.format": fmt,
        "image.size": "[16, 16]",
        "image.resize": "stretch",
        "image.min_size": "16",
        "shard.size": "4",
        "cluster.kind": "threads",
        "fetch.allow_private_networks": "true",
        "fetch.retries": "0",
    }
    sets = [arg for k, v in settings.items() for arg in ("--set", f"{k}={v}")]
    return out, cli("run", *sets), sets


@pytest.fixture(scope="module")
def image_text(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image-text")
    with raw_servers() as make:
        out, done, sets = build_image_text(tmp, make)
        assert done.returncode == 0, done.stdout + done.stderr
        yield out, done, sets


def test_each_permanent_status_comes_from_the_pipeline_and_the_summary_counts_it(image_text):
    out, done, _ = image_text
    from convert.ledger import iter_ledger
    from convert.store import open_store

    got = {row.item.key: row.item.status.value for row in iter_ledger(open_store(str(out)))}
    assert got == {key: row[3] for key, row in ROWS.items()}
    counted = re.search(r"items failed\s*│\s*3 (\{.*?\})", done.stderr)  # the run's summary (stderr)
    assert counted and json.loads(counted.group(1)) == {"opted_out": 1, "hash_mismatch": 1, "filtered": 1}
    for status, key in (("opted_out", "k07"), ("hash_mismatch", "k09"), ("filtered", "k10")):
        assert re.search(rf"│\s+{status}\s+│ 1 \(e\.g\. {key}\)", done.stderr)


def test_inspect_failures_shows_them_with_their_reasons(image_text):
    out, _, _ = image_text
    result = cli("inspect", str(out), "--failures")
    assert result.returncode == 0, result.stderr
    lines = {p[0]: p for p in (line.split("\t") for line in result.stdout.splitlines())}
    assert {k: p[2] for k, p in lines.items()} == {"k07": "opted_out", "k09": "hash_mismatch", "k10": "filtered"}
    assert "X-Robots-Tag: noai" in lines["k07"][3]
    assert "000000000000" in lines["k09"][3]  # both digests' first 12 hex digits
    assert "image.min_size 16" in lines["k10"][3]
    only = cli("inspect", str(out), "--failures", "--status", "filtered", "--status", "opted_out")
    assert sorted(line.split("\t")[0] for line in only.stdout.splitlines()) == ["k07", "k10"]


def test_retry_failed_by_default_leaves_permanent_failures_alone(image_text):
    _, _, sets = image_text
    again = cli("run", *sets, "--retry-failed")
    assert again.returncode == 0, again.stderr
    assert "3 shards (3 already committed, 0 to convert)" in again.stderr
    help_text = cli("run", "--help").stdout
    assert "--retry-failed" in help_text and not any(status in help_text for status in PERMANENT)
    named = cli("run", *sets, "--retry-failed", "opted_out")  # asked for by name, its shard is redone
    assert named.returncode == 0, named.stderr
    assert "3 shards (2 already committed, 1 to convert)" in named.stderr and "opted_out" in named.stderr


def test_inspect_lists_the_columns_and_their_types(image_text):
    out, _, _ = image_text
    human = cli("inspect", str(out))
    assert human.returncode == 0, human.stderr
    assert "columns: caption (string), similarity (float64), sha256 (string)" in human.stdout
    data = json.loads(cli("inspect", str(out), "--json").stdout)
    assert data["columns"] == [
        {"name": "caption", "type": "string"},
        {"name": "similarity", "type": "float64"},
        {"name": "sha256", "type": "string"},
    ]
    assert data["totals"]["by_status"] == {"filtered": 1, "hash_mismatch": 1, "ok": 9, "opted_out": 1}


def test_report_lists_the_columns_and_the_permanent_failures(image_text):
    from convert.dataset import Dataset
    from convert.report import render_report

    out, _, _ = image_text
    html = render_report(str(out), samples_per_label=20)
    unreadable = "The column values are not readable by this version of the readers: names and types only."
    assert (unreadable in html) is not hasattr(Dataset, "column")  # without read-back: names and types only
    assert ('<p class="caption' in html) is hasattr(Dataset, "column")  # and no "no caption" under every image
    for status in PERMANENT:
        assert f'<tr class="failure" data-status="{status}">' in html
    for name, kind in (("caption", "string"), ("similarity", "float64"), ("sha256", "string")):
        assert f'<tr class="column" data-name="{name}"><td class="mono">{name}</td><td class="mono">{kind}</td>' in html
    assert SCRIPT not in html  # nothing a list holds reaches the page unescaped


def test_report_shows_captions_trimmed_escaped_and_column_statistics(image_text):
    needs_column_reads()
    from convert.report import render_report
    from convert.report_data import caption_preview

    out, _, _ = image_text
    html = render_report(str(out), samples_per_label=20)
    assert '<p class="caption">&lt;script&gt;alert(1)&lt;/script&gt;</p>' in html
    assert '<p class="caption">line one line two</p>' in html
    assert f'<p class="caption">{caption_preview(LONG)}</p>' in html and len(caption_preview(LONG)) == 120
    assert caption_preview(LONG).endswith("\u2026")
    assert '<p class="caption null">no caption</p>' in html
    assert "&lt;b&gt;" in html and "&#34;quotes&#34;" in html
    # statistics over the 9 stored items: one null caption and one empty, one null similarity
    row = html.split('<tr class="column" data-name="caption">', 1)[1].split("</tr>", 1)[0]
    assert '<td class="num">9</td><td class="num">1</td>' in row and "1 empty" in row
    sim = html.split('<tr class="column" data-name="similarity">', 1)[1].split("</tr>", 1)[0]
    assert '<td class="num">9</td><td class="num">1</td>' in sim and "min 0.1, max 1" in sim
    assert 'alt="column similarity"' in html and 'alt="column caption"' in html


def test_column_statistics_stay_bounded_and_exact_where_promised():
    import numpy as np

    from convert.report_data import SAMPLE_CAP, ColumnStats

    stats = ColumnStats("x", "float64")
    values = np.arange(5 * SAMPLE_CAP, dtype=np.float64)
    for part in np.array_split(values, 7):
        stats.add(np.ma.masked_array(part, mask=part % 10 == 0))  # every tenth value null
    assert stats.count == values.size and stats.nulls == values.size // 10
    assert stats.sample.size <= SAMPLE_CAP and stats.stride == 8
    kept = values[values % 10 != 0]
    assert stats.low == kept.min() and stats.high == kept.max() and stats.mean == pytest.approx(kept.mean())
    np.testing.assert_array_equal(stats.sample, kept[::8])  # a systematic sample: every stride-th value
    text = ColumnStats("t", "string")
    text.add(["ab", None, "", "abc", "ab"])
    assert (text.count, text.nulls, text.empty, dict(text.lengths)) == (5, 1, 1, {2: 2, 3: 1})
    flags = ColumnStats("b", "bool")
    flags.add(np.ma.masked_array([True, False, True], mask=[False, False, True]))
    assert (flags.values, flags.true, flags.nulls) == (2, 1, 1)


def test_a_partial_lmdb_run_gets_its_column_statistics_and_captions_from_the_shards(tmp_path):
    """No manifest yet (a run still going or killed): columns come from the records, values from
    the committed shards' own readers; LMDB here, HDF5 above."""
    needs_column_reads()
    from convert.report import render_report

    with raw_servers() as make:
        out, done, _ = build_image_text(tmp_path, make, fmt="lmdb")
    assert done.returncode == 0, done.stderr
    (out / "manifest.json").unlink()
    inspected = json.loads(cli("inspect", str(out), "--json").stdout)
    assert inspected["partial"] is True and [c["name"] for c in inspected["columns"]] == [
        "caption",
        "similarity",
        "sha256",
    ]
    html = render_report(str(out), samples_per_label=20)
    assert "partial: 3 of 3 shards committed" in html
    sim = html.split('<tr class="column" data-name="similarity">', 1)[1].split("</tr>", 1)[0]
    assert '<td class="num">9</td><td class="num">1</td>' in sim and "min 0.1, max 1" in sim
    assert '<p class="caption">&lt;script&gt;alert(1)&lt;/script&gt;</p>' in html
    assert '<p class="caption null">empty caption</p>' in html


def test_a_dataset_without_columns_says_so(tmp_path):
    """An image folder stores only the source digest (no caption: no caption line under the
    thumbnails); with fetch.compute_hash: none it stores no column, and inspect and the report say so."""
    from convert.report import render_report

    digest, bare = tmp_path / "digest", tmp_path / "bare"
    for out, extra in ((digest, ()), (bare, ("--set", "fetch.compute_hash=none"))):
        done = cli("run", "configs/demo.yaml", "--output", str(out), "--set", "cluster.kind=threads", *extra)
        assert done.returncode == 0, done.stderr
    assert "columns: sha256 (string)" in cli("inspect", str(digest)).stdout
    html = render_report(str(digest), samples_per_label=2)
    assert '<tr class="column" data-name="sha256">' in html and 'class="caption' not in html
    assert "columns: none (only image, label and key)" in cli("inspect", str(bare)).stdout
    assert json.loads(cli("inspect", str(bare), "--json").stdout)["columns"] == []
    html = render_report(str(bare), samples_per_label=2)
    assert "This dataset stores no columns beside the images" in html and 'class="caption' not in html
