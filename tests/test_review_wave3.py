"""Wave 3 attacked as a hostile user would (columns, etiquette, filters, shard tasks, secrets, bad input):
each defect found is a regression test here, end to end through `convert.run` or the CLI with real files
and real 127.0.0.1 servers. A defect outside the reviewer's files is `xfail(strict=True)` so it flips
when fixed."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from convert import run
from convert.config import ConfigError, SourceConfig, load_config
from convert.fetch.robots import header_opt_out
from convert.ledger import iter_ledger
from convert.records import read_record
from convert.sources import SourceError, Workdir, plan_source
from convert.specs import Status
from convert.store import open_store
from convert.testing.http import StaticServer
from convert.testing.images import jpeg_bytes

DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")


def _images(root: Path, n: int) -> list[bytes]:
    (root / "img").mkdir(exist_ok=True)
    data = [jpeg_bytes(16, 12, seed=i) for i in range(n)]
    for i, d in enumerate(data):
        (root / "img" / f"{i}.jpg").write_bytes(d)
    return data


def _run(tmp_path: Path, source: Path, **over: Any) -> Any:
    cfg = load_config(
        None,
        {
            "source.uri": str(source),
            "output.uri": str(tmp_path / "out"),
            "image.size": [8, 8],
            "image.resize": "stretch",
            "cluster.kind": "threads",
            **over,
        },
    )
    return run(cfg, log=lambda m: None)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convert", *args], capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------ columns


@pytest.mark.parametrize("name", ["a/b", "..", ".", "x" * 300, "tab\there", "nul\x00"])
def test_a_column_name_a_shard_cannot_store_is_one_line(tmp_path: Path, name: str) -> None:
    """Found: 'a/b', '..' and a 300-character header were accepted with columns "*" and would become
    HDF5 dataset names (a '/' makes groups) and LMDB keys."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([["url", name], ["img/0.jpg", "v"]])
    (tmp_path / "l.csv").write_text(buf.getvalue())
    for columns in ("*", [name]):
        with pytest.raises(SourceError, match="cannot store as a column name") as err:
            plan_source(SourceConfig(uri=str(tmp_path / "l.csv"), columns=columns), 10, Workdir(str(tmp_path / "w")))
        assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_ordinary_column_names_are_still_kept(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("url,similarity,NSFW,ünï cøde,a.b\nimg/0.jpg,0.5,x,y,z\n")
    found = plan_source(SourceConfig(uri=str(tmp_path / "l.csv"), columns="*"), 10, Workdir(str(tmp_path / "w")))
    assert [c.name for c in found.columns] == ["similarity", "NSFW", "ünï cøde", "a.b"]


def test_a_jsonl_value_past_the_sample_of_another_type_fails_that_item_not_the_shard(tmp_path: Path) -> None:
    """Found: row 1,001 holding "str" in an int64 column raised a ShardError: the shard's other
    1,000 items were lost (and the shard retried for nothing)."""
    _images(tmp_path, 4)
    rows = [{"url": f"img/{i % 4}.jpg", "n": i} for i in range(1000)] + [{"url": "img/0.jpg", "n": "str"}]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = _run(tmp_path, tmp_path / "l.jsonl", **{"source.columns": "*", "shard.size": 2000})
    assert summary.exit_code() == 0
    found = read_record(open_store(str(tmp_path / "out")), "shard-00000")
    assert found is not None and found[0].ok == 1000 and found[0].failed == 1
    bad = [r.item for r in iter_ledger(open_store(str(tmp_path / "out"))) if r.item.status is not Status.OK]
    assert len(bad) == 1 and bad[0].status is Status.ERROR
    assert "item row 1001: column 'n' holds \"str\", not int64" in bad[0].error


def test_captions_are_read_back_from_the_dataset(tmp_path: Path) -> None:
    from convert.dataset import open_dataset

    _images(tmp_path, 2)
    (tmp_path / "l.csv").write_text("url,caption,n\nimg/0.jpg,hello,1\nimg/1.jpg,world,2\n")
    assert _run(tmp_path, tmp_path / "l.csv", **{"source.columns": ["n"]}).exit_code() == 0
    ds = open_dataset(str(tmp_path / "out"))
    assert ds[0]["caption"] == "hello" and ds[1]["n"] == "2"
    assert list(ds.column("caption")) == ["hello", "world"]  # type: ignore[attr-defined]


def test_hash_column_tolerates_case_and_spaces_and_names_a_short_digest(tmp_path: Path) -> None:
    data = _images(tmp_path, 4)
    sha = [hashlib.sha256(d).hexdigest() for d in data]
    cells = [sha[0].upper(), f" {sha[1]} ", sha[2][:63], ""]
    (tmp_path / "l.csv").write_text("url,sha256\n" + "".join(f"img/{i}.jpg,{c}\n" for i, c in enumerate(cells)))
    _run(tmp_path, tmp_path / "l.csv", **{"source.hash_column": "sha256"})
    rows = {r.item.key: r.item for r in iter_ledger(open_store(str(tmp_path / "out")))}
    statuses = [rows[k].status for k in sorted(rows)]
    assert statuses == [Status.OK, Status.OK, Status.HASH_MISMATCH, Status.OK]
    assert "is not a sha256/md5 hex digest" in rows[sorted(rows)[2]].error


# ------------------------------------------------------------------ X-Robots-Tag


@pytest.mark.parametrize(
    "values,expected",
    [
        (["MyBot: noai"], "noai"),  # a bot name in any case
        (["mybot:noai"], "noai"),  # no space after the colon
        (["otherbot:noai"], None),
        (["otherbot: noindex", "NOAI"], "noai"),  # a second header is not scoped by the first's bot
        (["otherbot: noindex, mybot: noimageai"], "noimageai"),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None),  # a valued directive is not a bot name
        (["none"], "none"),
    ],
)
def test_x_robots_tag_forms(values: list[str], expected: str | None) -> None:
    assert header_opt_out(values, "mybot", DIRECTIVES) == expected


# ------------------------------------------------------------------ secrets and one-line errors


@pytest.mark.parametrize("tail", ["missing.csv", "missing.csv?sig=SIGSECRET1"])
def test_an_error_line_naming_the_source_carries_no_credentials(tail: str) -> None:
    """Found: `error: URL list 'http://bob:PWSRC9@127.0.0.1:.../missing.csv' not found` printed the
    password (and a signed URL's signature) given in source.uri."""
    with StaticServer() as srv:
        host = srv.url.split("://", 1)[1]
        proc = _cli(
            "run",
            "--source",
            f"http://bob:PWSRC9@{host}/{tail}",
            "--output",
            "/nonexistent/never-made",
            "--set",
            "fetch.allowed_networks=[127.0.0.0/8]",
        )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error:" in proc.stderr and "PWSRC9" not in proc.stderr + proc.stdout
    assert "SIGSECRET1" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("value", ["abc", "{hdf5: 3}", "[1]", "7"])
def test_output_options_of_the_wrong_shape_is_one_line(value: str) -> None:
    """Found: `--set output.options=abc` ended with `error (AttributeError): 'str' object has no attribute
    'items'` and a pointer to the traceback."""
    proc = _cli(
        "plan", "--source", "/nonexistent/l.csv", "--output", "/nonexistent/o", "--set", f"output.options={value}"
    )
    assert proc.returncode == 2 and "error: output" in proc.stderr and "AttributeError" not in proc.stderr
    assert "TypeError" not in proc.stderr and "CONVERT_DEBUG" not in proc.stderr


def test_a_validation_error_never_echoes_storage_option_secrets() -> None:
    """Found: a bad value in `output` printed the whole section as given, storage_options passwords included."""
    for over in ({"output.options": "abc"}, {"output.storage_options": "PWLEAK2"}):
        with pytest.raises(ConfigError) as err:
            load_config(
                None,
                {
                    "source.uri": "/x/l.csv",
                    "output.uri": "/x/o",
                    "output.storage_options": {"password": "PWLEAK1", "key": "AKIAX"},
                    **over,
                },
            )
        assert "PWLEAK" not in str(err.value) and "AKIAX" not in str(err.value)


def test_secrets_in_storage_options_reach_no_file_of_the_output(tmp_path: Path) -> None:
    _images(tmp_path, 2)
    (tmp_path / "l.csv").write_text("url,caption\nimg/0.jpg,a\nimg/1.jpg,b\n")
    secrets = ("HUNTER2pw", "S3CR3Tuser", "OUTSECRET77", "PWINURL")
    _run(
        tmp_path,
        tmp_path / "l.csv",
        **{
            "source.storage_options": {
                "password": secrets[0],
                "client_kwargs": {"endpoint_url": f"http://bob:{secrets[1]}@127.0.0.1:9"},
            },
            "output.storage_options": {"secret": secrets[2], "endpoint_url": f"http://al:{secrets[3]}@127.0.0.1:9"},
        },
    )
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            text = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
            assert not any(s.encode() in text for s in secrets), path


# ------------------------------------------------------------------ resume


def test_changing_only_a_column_setting_rebuilds_naming_it(tmp_path: Path) -> None:
    _images(tmp_path, 2)
    (tmp_path / "l.csv").write_text("url,caption,n\nimg/0.jpg,a,1\nimg/1.jpg,b,2\n")
    lines: list[str] = []

    def again(**over: Any) -> None:
        lines.clear()
        cfg = load_config(
            None,
            {
                "source.uri": str(tmp_path / "l.csv"),
                "output.uri": str(tmp_path / "out"),
                "image.size": [8, 8],
                "cluster.kind": "threads",
                **over,
            },
        )
        assert run(cfg, log=lines.append).exit_code() == 0

    again()
    for over, setting in [
        ({"source.columns": ["n"]}, "source.columns"),
        ({"source.columns": ["n"], "fetch.compute_hash": "md5"}, "fetch.compute_hash"),
        ({"source.columns": ["n"], "fetch.compute_hash": "md5", "image.min_size": 4}, "image.min_size"),
    ]:
        again(**over)
        why = [line for line in lines if "will be rebuilt" in line]
        assert len(why) == 1 and f"{setting} changed" in why[0], lines
    again(**over)  # the same settings again: nothing to rebuild
    assert not any("rebuilt" in line for line in lines)


@pytest.mark.usefixtures("http_backend")
@pytest.mark.parametrize("first,expected", [(b"noai", Status.OPTED_OUT), (b"all", "ok")])
def test_a_response_with_150_header_lines_gets_the_same_outcome_on_both_backends(first: bytes, expected: Any) -> None:
    """Found: on the urllib3 backend http.client refused more than 100 header lines, so a response with
    150 X-Robots-Tag lines was a (retryable) connection_error there and opted_out / ok on libcurl."""
    from convert.fetch import FetchPolicy, fetch_bytes
    from convert.specs import ItemError
    from convert.testing.rawhttp import ok, raw_servers, reply

    image = jpeg_bytes(40, 30)
    tags = b"X-Robots-Tag: " + first + b"\r\n" + b"X-Robots-Tag: all\r\n" * 149
    with raw_servers() as make:
        srv = make(reply(ok(image, tags)))
        pol = FetchPolicy(allow_private_networks=True, timeout=1.0, retries=0, item_timeout=5)
        try:
            got: Any = fetch_bytes(srv.url + "/a.jpg", pol)
        except ItemError as exc:
            got = exc.status
    assert got == (image if expected == "ok" else expected)


def _robots_cut_inside_a_rule() -> bytes:
    """A robots.txt whose ROBOTS_CAP-th byte falls right after "Disallow: /" of "Disallow: /private/"."""
    from convert.fetch.robots import ROBOTS_CAP

    head = b"User-agent: *\nDisallow: /nothing-here\n"
    cut = b"Disallow: /"
    pad = ROBOTS_CAP - len(head) - len(cut)
    comments = (b"# " + b"x" * 97 + b"\n") * (pad // 100)
    comments += b"#" * (pad - len(comments) - 1) + b"\n"
    body = head + comments + cut + b"private/\n" + b"# more\n" * 1000
    assert body[:ROBOTS_CAP].endswith(cut)
    return body


def test_a_robots_txt_cut_at_its_cap_does_not_turn_a_rule_into_disallow_everything() -> None:
    """Found: the line cut by ROBOTS_CAP was parsed: "Disallow: /private/" became "Disallow: /" and every
    item of the host was opted_out (a permanent status)."""
    from convert.fetch.robots import ROBOTS_CAP, rules_for

    body = _robots_cut_inside_a_rule()
    rules = rules_for(200, body[:ROBOTS_CAP], "convert")
    assert rules.allows("/a.jpg") and not rules.allows("/nothing-here/x")


@pytest.mark.usefixtures("http_backend")
def test_a_robots_txt_cut_at_its_cap_end_to_end() -> None:
    from convert.fetch import FetchPolicy, fetch_bytes, robots

    robots.cache.clear()
    image = jpeg_bytes(20, 20)
    with StaticServer(files={"/a.jpg": image, "/robots.txt": _robots_cut_inside_a_rule()}) as srv:
        pol = FetchPolicy(allow_private_networks=True, timeout=2.0, retries=0, item_timeout=10, robots_txt="respect")
        assert fetch_bytes(srv.url_for("/a.jpg"), pol) == image
    robots.cache.clear()


def test_a_malformed_jsonl_row_past_the_sample_fails_that_item_not_the_shard(tmp_path: Path) -> None:
    """Found: a broken line (or a JSON array) at row 1,201 raised a ShardError: 1,200 good items lost."""
    _images(tmp_path, 4)
    lines = [json.dumps({"url": f"img/{i % 4}.jpg"}) for i in range(1200)]
    lines += ['{"url": "img/1.jpg", broken', "[1, 2]", json.dumps({"url": "img/2.jpg"})]
    (tmp_path / "l.jsonl").write_text("\n".join(lines) + "\n")
    assert _run(tmp_path, tmp_path / "l.jsonl", **{"shard.size": 2000}).exit_code() == 0
    bad = [r.item for r in iter_ledger(open_store(str(tmp_path / "out"))) if r.item.status is not Status.OK]
    assert [b.status for b in bad] == [Status.ERROR, Status.ERROR]
    assert "item row 1201 is not valid JSON" in bad[0].error and "item row 1202 is a JSON list" in bad[1].error
    found = read_record(open_store(str(tmp_path / "out")), "shard-00000")
    assert found is not None and found[0].ok == 1201


def test_an_empty_url_cell_is_a_bad_url_saying_so(tmp_path: Path) -> None:
    """Found: a row with an empty url cell was recorded as `error` with the message ': is a directory'."""
    _images(tmp_path, 2)
    (tmp_path / "l.csv").write_text("url,caption\nimg/0.jpg,a\n,b\nimg/1.jpg,c\n")
    _run(tmp_path, tmp_path / "l.csv")
    bad = [r.item for r in iter_ledger(open_store(str(tmp_path / "out"))) if r.item.status is not Status.OK]
    assert len(bad) == 1 and bad[0].status is Status.BAD_URL and "url cell is empty" in bad[0].error


@pytest.mark.usefixtures("http_backend")
def test_a_control_character_in_a_url_is_bad_url_not_a_failed_shard(tmp_path: Path) -> None:
    """Found: a NUL in a list's path raised `ValueError: embedded null byte`: the whole shard failed
    (retried), its good items lost."""
    _images(tmp_path, 2)
    with StaticServer(files={"/a.jpg": jpeg_bytes(16, 12)}) as srv:
        rows = [
            "img/0.jpg",
            "img/1\x00.jpg",
            srv.url_for("/a\x00.jpg"),
            srv.url_for("/a.jpg\r\nX-Injected: 1"),
            srv.url_for("/a.jpg"),
        ]
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([["url"]] + [[r] for r in rows])
        (tmp_path / "l.csv").write_text(buf.getvalue())
        summary = _run(tmp_path, tmp_path / "l.csv", **{"fetch.allowed_networks": ["127.0.0.0/8"]})
    assert summary.exit_code() == 0
    statuses = [r.item.status for r in iter_ledger(open_store(str(tmp_path / "out")))]
    assert statuses == [Status.OK, Status.BAD_URL, Status.BAD_URL, Status.BAD_URL, Status.OK]


def test_a_robots_txt_redirect_to_10_0_0_1_is_refused_by_the_guard_decision() -> None:
    """The address guard's decision alone (nothing connects): opening 127.0.0.0/8 does not open 10.0.0.1,
    so a robots.txt redirected there is never fetched (the host counts as unreachable: disallowed)."""
    import ipaddress

    from convert.fetch.netguard import exempt, is_public
    from convert.fetch.robots import rules_for

    nets = (ipaddress.ip_network("127.0.0.0/8"),)
    for address in ("10.0.0.1", "::ffff:10.0.0.1", "169.254.169.254"):
        assert not is_public(address) and not exempt(address, nets)
    assert exempt("127.0.0.1", nets) and exempt("::ffff:127.0.0.2", nets)
    assert not rules_for(None, b"", "convert", "PrivateAddressError: 10.0.0.1").allows("/a.jpg")
