"""`convert-dataset report` and `inspect --failures`, as a user runs them, checked in real headless Chromium.

The fixture converts the shipped demo sample (configs/demo.yaml settings, configs/sample-images, which
includes one truncated JPEG) through a URL list served by a real 127.0.0.1 HTTP server that adds a
404, a 403 and a bad scheme, so the report has failures of several statuses. A second fixture kills a
real `python -m convert run` mid-way (later items hang on the server) for the partial-run views.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convert.testing.browser import chromium_dom, chromium_path, chromium_screenshot
from convert.testing.http import StaticServer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "configs" / "sample-images"
SCREENSHOT_COPY = Path("/work/wt/report-screenshot.png")  # where the lead looks at it (if that folder exists)

pytestmark = pytest.mark.cluster  # real dask LocalCluster processes


def cli(
    *args: str, timeout: float = 300, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convert", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=env,
        check=False,
    )


def needs_chromium() -> None:
    if chromium_path() is None:
        if os.environ.get("CONVERT_REQUIRE_CHROMIUM"):
            pytest.fail("CONVERT_REQUIRE_CHROMIUM is set but chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium not installed (apt-get install -y chromium)")


EXTRA_FAILURES = {  # key -> (url path or full URL, expected status)
    "web/missing.jpg": ("/dog/missing.jpg", "not_found"),
    "web/private.jpg": ("/private/cat.jpg", "forbidden"),
    "web/ftp.jpg": ("ftp://127.0.0.1/cat.jpg", "bad_url"),
}


def write_url_list(srv: StaticServer, path: Path, extra: dict[str, tuple[str, str]]) -> list[tuple[str, str]]:
    """The demo sample as a URL list (key = class/file, label = class) plus `extra` failing rows."""
    rows = [
        (f"{d.name}/{f.name}", srv.url_for(f"/{d.name}/{f.name}"), d.name)
        for d in sorted(SAMPLE.iterdir())
        for f in sorted(d.iterdir())
    ]
    rows += [(key, url if "://" in url else srv.url_for(url), "dog") for key, (url, _) in extra.items()]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "url", "label"])
        writer.writerows(rows)
    return [(key, label) for key, _, label in rows]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    with StaticServer(root=SAMPLE) as srv:
        srv.fault("/private/cat.jpg", statuses=[403] * 20)
        rows = write_url_list(srv, tmp / "demo.csv", EXTRA_FAILURES)
        out = tmp / "demo"
        result = cli(
            "run",
            "configs/demo.yaml",
            "--source",
            str(tmp / "demo.csv"),
            "--output",
            str(out),
            "--set",
            "fetch.retries=0",
            "--set",
            "fetch.allow_private_networks=true",
        )
    assert result.returncode == 0, result.stderr
    return tmp, out, rows


class DomIndex(HTMLParser):
    """Collects the elements the assertions need from Chromium's serialized DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.thumbs: list[dict[str, str]] = []
        self.images: list[str] = []
        self.failures: list[dict[str, str]] = []
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value) of every src/href
        self.meta: list[dict[str, str]] = []
        self._row: dict[str, str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        for name in ("src", "href", "action", "srcset", "poster", "data"):
            if name in a and tag != "figure":
                self.links.append((tag, name, a[name]))
        if tag == "figure" and "thumb" in a.get("class", ""):
            self.thumbs.append(a)
        elif tag == "img" and self.thumbs and "src" in a and a.get("alt") == self.thumbs[-1].get("data-key"):
            self.images.append(a["src"])
        elif tag == "meta":
            self.meta.append(a)
        elif tag == "tr" and "failure" in a.get("class", ""):
            self._row = {"status": a.get("data-status", ""), "cells": []}
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.failures.append(self._row)
            self._row = None


def parse_dom(html: str) -> DomIndex:
    index = DomIndex()
    index.feed(html)
    return index


def decode_data_uri(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as img:
        arr = np.asarray(img)
    return arr[:, :, None] if arr.ndim == 2 else arr


@pytest.mark.browser
def test_report_in_chromium_shows_samples_failures_and_no_external_resources(demo, tmp_path):
    needs_chromium()
    _, out, _ = demo
    result = cli("report", str(out), "--samples-per-label", "5")
    assert result.returncode == 0, result.stderr
    page = Path(result.stdout.strip().splitlines()[-1])
    assert page == out / "report.html" and page.is_file()
    dom = parse_dom(chromium_dom(page.as_uri()))

    # the grid: 5 thumbnails for each of the three labels, named, in input order
    labels = [t["data-label-name"] for t in dom.thumbs]
    assert labels == ["cat"] * 5 + ["dog"] * 5 + ["fox"] * 5
    assert [t["data-key"] for t in dom.thumbs[:2]] == ["cat/cat_000.jpg", "cat/cat_001.jpg"]
    assert len(dom.images) == 15

    # every failed item of the fixture is listed with its status
    from convert.dataset import open_dataset

    ds = open_dataset(str(out))
    ledger = ds.ledger()
    failed = {k: s for k, s in zip(ledger["key"], ledger["status"]) if s != "ok"}
    assert failed == {"dog/dog_broken.jpg": "decode_error", **{k: s for k, (_, s) in EXTRA_FAILURES.items()}}
    listed = {row["cells"][0]: (row["status"], row["cells"][1]) for row in dom.failures}
    assert {k: v[0] for k, v in listed.items()} == failed
    assert all(v[0] == v[1] for v in listed.values())  # the status column shows the status

    # self-contained: a strict CSP, and no src/href that leaves the page
    csp = [m["content"] for m in dom.meta if m.get("http-equiv", "").lower() == "content-security-policy"]
    assert csp == ["default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"]
    external = [link for link in dom.links if not link[2].startswith(("data:", "#"))]
    assert external == []

    # a thumbnail decodes to exactly the pixels a training loop gets from ds[i]
    for thumb, src in zip(dom.thumbs[::4], dom.images[::4]):
        item = ds[int(thumb["data-index"])]
        assert item["key"] == thumb["data-key"]
        np.testing.assert_array_equal(decode_data_uri(src), item["image"])
    ds.close()


def test_dataset_repr_names_items_shards_shape_labels(demo):
    from convert.dataset import open_dataset

    _, out, _ = demo
    with open_dataset(str(out)) as ds:
        assert repr(ds) == (
            f"Dataset({str(out)!r}, items=36, shards=3, format=hdf5, shape=64x64x3, labels=[cat, dog, fox])"
        )


@pytest.mark.browser
def test_report_screenshot_and_viewer(demo):
    """Keep a screenshot of the demo report (a test artifact), and one with the full-size viewer open."""
    needs_chromium()
    tmp, out, _ = demo
    assert cli("report", str(out)).returncode == 0
    page = (out / "report.html").as_uri()
    shot = chromium_screenshot(page, tmp / "report-screenshot.png")
    viewer = chromium_screenshot(page + "#item=fox/fox_003.jpg", tmp / "report-viewer.png", height=900)
    with Image.open(shot) as img:
        assert img.size == (1280, 2400)
        assert len(img.convert("RGB").getcolors(2**20) or []) > 1000  # thumbnails and charts drawn, not a blank page
    dom = parse_dom(chromium_dom(page + "#item=fox/fox_003.jpg"))
    assert dom.thumbs  # the viewer is filled by script; its text is in the DOM after load
    html = chromium_dom(page + "#item=fox/fox_003.jpg")
    assert 'id="viewer" role="dialog" aria-modal="true" class="open"' in html and "fox/fox_003.jpg</td>" in html
    if SCREENSHOT_COPY.parent.is_dir():
        shutil.copy(shot, SCREENSHOT_COPY)
        shutil.copy(viewer, SCREENSHOT_COPY.with_name("report-viewer.png"))


@pytest.mark.browser
def test_failure_filter_by_status_runs_in_the_browser(demo):
    needs_chromium()
    _, out, _ = demo
    assert cli("report", str(out)).returncode == 0
    html = chromium_dom((out / "report.html").as_uri() + "#status=not_found")
    shown = re.findall(r'<tr class="failure" data-status="([a-z_]+)"( style="display: none;")?>', html)
    assert sorted(shown) == [
        ("bad_url", ' style="display: none;"'),
        ("decode_error", ' style="display: none;"'),
        ("forbidden", ' style="display: none;"'),
        ("not_found", ""),
    ]
    assert "showing 1 not_found of 4 failed items" in html


def test_failures_are_capped_with_the_total_shown(demo):
    from convert.report import render_report

    _, out, _ = demo
    html = render_report(str(out), failure_cap=2)
    assert html.count('<tr class="failure"') == 2 and "showing 2 of 4 failed items (capped;" in html


def test_source_statistics_and_throughput_from_records(demo, tmp_path):
    """Records carrying source facts and start/finish times (what the workers record) become the
    source histograms, the items/s chart and the shard seconds; unknown values (-1/"") are skipped."""
    import dataclasses

    from convert.records import read_record, write_record
    from convert.report import render_report
    from convert.report_data import load_run, scan_ledger
    from convert.store import open_store

    _, src, _ = demo
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    (out / "manifest.json").unlink()  # a partial run: read from the records themselves
    store = open_store(str(out))
    for i, name in enumerate(["shard-00000", "shard-00001", "shard-00002"]):
        record, fp = read_record(store, name)
        ledger = tuple(
            dataclasses.replace(r, width=640, height=480 if n % 2 else 320, src_format="jpeg", src_bytes=40_000 + n)
            if r.ok
            else dataclasses.replace(r, width=-1, height=-1, src_format="", src_bytes=-1)  # unknown
            for n, r in enumerate(record.ledger)
        )
        write_record(
            store,
            dataclasses.replace(
                record, ledger=ledger, started=1e9 + i, finished=1e9 + i + 2.5, stages={"fetch": 0.5, "decode": 0.25}
            ),
            fp,
        )
    scan = scan_ledger(load_run(store), k=1, cap=10)
    assert scan.sources.width == {640: 36} and scan.sources.height == {480: 18, 320: 18}
    assert scan.sources.aspect == {1.33: 18, 2.0: 18} and scan.sources.formats == {"jpeg": 36}
    assert scan.sources.unknown == 4 and sum(scan.sources.bytes_bin.values()) == 36
    html = render_report(str(out), samples_per_label=1)
    assert 'alt="source image statistics"' in html and 'alt="items per second over the run"' in html
    assert "36 items with recorded source size; 4 without" in html
    assert '<td class="num">2.50</td>' in html and "&#34;fetch&#34;: 0.5" in html
    assert "images/s over 4.5 s" in html


def test_inspect_failures_lists_every_failed_item(demo):
    _, out, _ = demo
    result = cli("inspect", str(out), "--failures")
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert all(len(parts) == 4 for parts in lines)
    assert {p[0]: p[2] for p in lines} == {
        "dog/dog_broken.jpg": "decode_error",
        **{k: s for k, (_, s) in EXTRA_FAILURES.items()},
    }
    only = cli("inspect", str(out), "--failures", "--status", "not_found", "--status", "forbidden")
    assert sorted(line.split("\t")[0] for line in only.stdout.splitlines()) == ["web/missing.jpg", "web/private.jpg"]
    bad = cli("inspect", str(out), "--failures", "--status", "missing")
    assert bad.returncode == 2 and "expected one of" in bad.stderr and "Traceback" not in bad.stderr


# -- a run killed mid-way -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A real `convert run` killed while its third shard hangs on the server: 2 shards committed."""
    tmp = tmp_path_factory.mktemp("killed")
    with StaticServer(root=SAMPLE) as srv:
        rows = write_url_list(srv, tmp / "list.csv", {"web/missing.jpg": ("/dog/missing.jpg", "not_found")})
        keys = [key for key, _ in rows]
        for key in keys[16:-1]:  # shard size 8, the 404 moved first (below): shards 0-1 finish, shard 2 hangs
            srv.fault("/" + key, hang=60)
        # move the 404 into shard 0 so the partial run has a failure of its own
        reordered = tmp / "killed.csv"
        lines = (tmp / "list.csv").read_text().splitlines()
        reordered.write_text("\n".join([lines[0], lines[-1], *lines[1:-1]]) + "\n")
        out = tmp / "partial"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "convert",
                "run",
                "configs/demo.yaml",
                "--source",
                str(reordered),
                "--output",
                str(out),
                "--shard-size",
                "8",
                "--workers",
                "1",
                "--threads",
                "2",
                "--set",
                "fetch.timeout=60",
                "--set",
                "fetch.retries=0",
                "--set",
                "fetch.allow_private_networks=true",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while len(list((out / "shards").glob("*.record.gz"))) < 2 and time.monotonic() < deadline:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the client and its LocalCluster workers, as a kill -9 would
            proc.wait(timeout=30)
            proc.stdout.close()
    assert not (out / "manifest.json").exists()
    return out, len(list((out / "shards").glob("*.record.gz")))


def test_inspect_of_a_killed_run_reads_the_committed_records(killed):
    out, committed = killed
    assert committed == 2
    human = cli("inspect", str(out))
    assert human.returncode == 0, human.stderr
    assert "partial: 2 of 5 shards committed" in human.stdout
    rows = [line.split()[1] for line in human.stdout.splitlines() if line.startswith("│ shard-")]
    assert rows == ["shard-00000", "shard-00001"]
    assert "leftover partial" in human.stdout and ".shard-00002." in human.stdout  # the killed attempt's temp file
    failures = cli("inspect", str(out), "--failures")
    assert failures.returncode == 0, failures.stderr
    assert [line.split("\t")[0] for line in failures.stdout.splitlines()] == ["web/missing.jpg"]
    assert "partial: 2 of 5 shards committed" in failures.stderr
    data = json.loads(cli("inspect", str(out), "--json").stdout)
    assert data["partial"] is True and data["planned_shards"] == 5 and len(data["shards"]) == 2
    assert data["totals"]["by_status"] == {"not_found": 1, "ok": 15}


@pytest.mark.browser
def test_report_of_a_killed_run(killed, tmp_path):
    needs_chromium()
    out, _ = killed
    target = tmp_path / "partial.html"
    result = cli("report", str(out), "--html", str(target), "--samples-per-label", "3")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == target and "partial: 2 of 5 shards committed" in result.stderr
    html = chromium_dom(target.as_uri())
    dom = parse_dom(html)
    assert "partial: 2 of 5 shards committed" in html
    # shards 0-1 hold the 404 plus cat_000..cat_011 and dog_000..dog_002 (15 ok): 3 cats, 3 dogs
    assert [t["data-key"] for t in dom.thumbs] == [f"cat/cat_{i:03d}.jpg" for i in range(3)] + [
        f"dog/dog_{i:03d}.jpg" for i in range(3)
    ]
    assert [(row["cells"][0], row["status"]) for row in dom.failures] == [("web/missing.jpg", "not_found")]
    # the pixels come from the committed shard itself
    from convert.formats.base import open_reader

    reader = open_reader("hdf5", str(out / "shards" / "shard-00001.h5"))
    stored = {item["key"]: item["image"] for item in reader.get_batch(list(range(len(reader))))}
    reader.close()
    dog = dom.thumbs.index(next(t for t in dom.thumbs if t["data-key"] == "dog/dog_002.jpg"))
    np.testing.assert_array_equal(decode_data_uri(dom.images[dog]), stored["dog/dog_002.jpg"])


@pytest.mark.s3
def test_report_of_an_s3_dataset_is_written_locally_or_where_html_points(s3, tmp_path):
    env = dict(
        os.environ,
        AWS_ENDPOINT_URL=s3.endpoint_url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    done = cli("run", "configs/demo.yaml", "--output", "s3://test-bucket/demo", env=env)
    assert done.returncode == 0, done.stderr
    local = cli("report", "s3://test-bucket/demo", "--samples-per-label", "2", cwd=tmp_path, env=env)
    assert local.returncode == 0, local.stderr
    page = tmp_path / "demo-report.html"
    assert Path(local.stdout.strip()) == page and "wrote the report locally" in local.stderr
    html = page.read_text()
    assert html.count('<figure class="thumb"') == 6 and "dog/dog_broken.jpg" in html and "complete" in html
    remote = cli("report", "s3://test-bucket/demo", "--html", "s3://test-bucket/demo/report.html", env=env)
    assert remote.returncode == 0 and remote.stdout.strip() == "s3://test-bucket/demo/report.html"
    assert s3.filesystem().cat_file("test-bucket/demo/report.html").decode().count('<figure class="thumb"') == 16 + 8


def test_embedded_images_are_exact_up_to_the_cap_and_downscaled_above():
    from convert.report import MAX_SIDE, png_data_uri

    small = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_data_uri(png_data_uri(small)), small)
    grey = np.random.default_rng(1).integers(0, 256, (40, 40, 1), dtype=np.uint8)
    np.testing.assert_array_equal(decode_data_uri(png_data_uri(grey)), grey)
    big = np.zeros((MAX_SIDE * 3, MAX_SIDE * 2, 3), dtype=np.uint8)
    assert decode_data_uri(png_data_uri(big)).shape == (MAX_SIDE, MAX_SIDE * 2 // 3, 3)


def test_errors_and_uris_never_show_credentials_and_non_datasets_are_one_line_errors(tmp_path):
    from convert.redact import redact_text

    text = "GET https://bob:pa55@host/a.jpg?X-Amz-Signature=abc123&x=1 failed; retry s3://bucket/k"
    shown = redact_text(text)
    assert "pa55" not in shown and "abc123" not in shown and "s3://bucket/k" in shown and "x=1" in shown
    result = cli("report", str(tmp_path))
    assert result.returncode == 2 and "not a converted dataset" in result.stderr and "Traceback" not in result.stderr


def test_a_run_with_a_plan_but_no_committed_shard_yet_is_partial_zero(demo, tmp_path):
    _, src, _ = demo
    out = tmp_path / "started"
    shutil.copytree(src, out)
    (out / "manifest.json").unlink()
    for record in (out / "shards").glob("*.record.gz"):
        record.unlink()
    human = cli("inspect", str(out))
    assert human.returncode == 0 and "partial: 0 of 3 shards committed" in human.stdout
    assert cli("report", str(out)).returncode == 0 and "partial: 0 of 3" in (out / "report.html").read_text()


# -- an image-text dataset: captions ---------------------------------------------------------------
@pytest.fixture(scope="module")
def image_text(tmp_path_factory):
    """The parquet image-text run of tests/test_inspect_columns.py (captions incl. a <script>)."""
    from test_inspect_columns import build_image_text

    from convert.testing.rawhttp import raw_servers

    with raw_servers() as make:
        out, done, _ = build_image_text(tmp_path_factory.mktemp("image-text"), make)
    assert done.returncode == 0, done.stderr
    return out


class _Captions(HTMLParser):
    """The text of each thumbnail's caption, the viewer's caption cell, and every <script> element."""

    def __init__(self) -> None:
        super().__init__()
        self.captions: dict[str, str] = {}
        self.viewer = ""
        self.scripts = 0
        self._key: str | None = None
        self._into: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.scripts += tag == "script"
        if tag == "figure":
            self._key = a.get("data-key")
        elif tag == "p" and "caption" in (a.get("class") or "") and self._key:
            self._into = "caption"
            self.captions[self._key] = ""
        elif tag == "td" and a.get("id") == "viewer-caption":
            self._into = "viewer"

    def handle_endtag(self, tag):
        if tag in ("p", "td"):
            self._into = None

    def handle_data(self, data):
        if self._into == "caption" and self._key:
            self.captions[self._key] += data
        elif self._into == "viewer":
            self.viewer += data


@pytest.mark.browser
def test_captions_render_as_text_in_chromium_and_no_caption_script_runs(image_text):
    needs_chromium()
    from convert.dataset import Dataset

    if not hasattr(Dataset, "column"):
        pytest.skip("Dataset.column is not in this build yet (the formats' side of columns, branch columns-fmt)")
    from test_inspect_columns import SCRIPT

    assert cli("report", str(image_text), "--samples-per-label", "20").returncode == 0
    page = (image_text / "report.html").as_uri()
    dom = _Captions()
    dom.feed(chromium_dom(page + "#item=k01"))  # the viewer open on the item whose caption is a <script>
    assert dom.captions["k01"] == SCRIPT and dom.viewer == SCRIPT  # shown as text, where a user reads it
    assert dom.captions["k02"] == "line one line two" and dom.captions["k04"] == "no caption"
    assert len(dom.captions["k03"]) == 120 and dom.captions["k03"].endswith("\u2026")
    assert dom.scripts == 1  # the page's own script only: the caption's never became an element
