"""List columns on the planning and reading side: every list format x compression x column type
through `plan_source` + `shard_refs`, a remote list on moto's S3 server, end to end through
`convert.run`, and each bad input as one SourceError line."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any

import pytest

from convert.config import SourceConfig, load_config
from convert.sources import SourceError, Workdir, plan_source, shard_refs
from convert.specs import Column

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

CAPTIONS = ["plain", "ünïcødé 日本語 🐱‍👤 ©", 'say "hi", then\nnext line', "", None, "a,b;c 'q' \\ end"]
INTS = [1, -(2**40), 0, None, 7, 2**62]
FLOATS = [0.5, -1.25e-3, 3.0, None, 2.5, 1e300]
BOOLS = [True, False, None, True, False, True]
ROWS: list[dict[str, Any]] = [
    {"url": f"img/{i}.jpg", "caption": cap, "n": n, "f": f, "b": b, "z": None}
    for i, (cap, n, f, b) in enumerate(zip(CAPTIONS, INTS, FLOATS, BOOLS))
]
FORMATS = ["txt", "csv", "tsv", "parquet", "jsonl"]
CODECS = {
    "": lambda b: b,
    ".gz": gzip.compress,
    ".zst": lambda b: zstandard.ZstdCompressor().compress(b),
    ".bz2": bz2.compress,
}
ARROW = {
    "url": pa.string(),
    "caption": pa.string(),
    "n": pa.int64(),
    "f": pa.float64(),
    "b": pa.bool_(),
    "z": pa.string(),
}


def _text(v: Any) -> str:
    return "" if v is None else ("true" if v else "false") if isinstance(v, bool) else str(v)


def list_bytes(fmt: str, rows: list[dict[str, Any]]) -> bytes:
    """`rows` written as a list file of format `fmt`."""
    if fmt == "txt":
        return "".join(r["url"] + "\n" for r in rows).encode()
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(
            pa.table({k: [r[k] for r in rows] for k in rows[0]}, schema=pa.schema(ARROW)), buf, row_group_size=2
        )
        return buf.getvalue()
    out = io.StringIO()
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(rows[0])
        writer.writerows([_text(v) for v in r.values()] for r in rows)
    else:  # IANA TSV: no quoting, so no tab or newline in a value
        out.write("\t".join(rows[0]) + "\n")
        out.writelines("\t".join(_text(v).replace("\n", " ") for v in r.values()) + "\n" for r in rows)
    return out.getvalue().encode()


def expected(fmt: str) -> tuple[list[Column], list[tuple[Any, ...]]]:
    """The kept columns ("*") and each row's values as a reader must give them back."""
    names = ["caption", "n", "f", "b", "z"]
    if fmt == "txt":
        return [], [()] * len(ROWS)
    if fmt in ("csv", "tsv"):  # CSV has no types: strings, an empty cell is null
        fix = (lambda s: s.replace("\n", " ")) if fmt == "tsv" else (lambda s: s)
        return ([Column(n, "string") for n in names], [tuple(fix(_text(r[n])) or None for n in names) for r in ROWS])
    types = ["string", "int64", "float64", "bool", "string"]
    return [Column(n, t) for n, t in zip(names, types)], [tuple(r[n] for n in names) for r in ROWS]


def plan(tmp_path: Path, uri: str | Path, size: int = 4, **kw: Any):  # type: ignore[no-untyped-def]
    return plan_source(SourceConfig(uri=str(uri), **kw), size, Workdir(str(tmp_path / "work")))


def refs(found: Any, options: dict[str, Any] | None = None) -> list[Any]:
    return [ref for spec in found.specs for ref in shard_refs(spec, options)]


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_and_compression_round_trips(tmp_path: Path, fmt: str, codec: str) -> None:
    path = tmp_path / f"list.{fmt}{codec}"
    path.write_bytes(CODECS[codec](list_bytes(fmt, ROWS)))
    columns, values = expected(fmt)
    for size in (1, 4, 100):  # slices inside a compressed stream, across parquet row groups
        found = plan(tmp_path, path, size, columns="*")
        assert list(found.columns) == columns
        assert len(found.specs) == -(-len(ROWS) // size)
        got = refs(found)
        assert [r.uri for r in got] == [f"{tmp_path}/img/{i}.jpg" for i in range(len(ROWS))]
        assert [r.columns for r in got] == values


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_caption_choice_named_columns_and_hash_column(tmp_path: Path, fmt: str) -> None:
    rows = [
        {"URL": "a.jpg", "TEXT": "t", "text": "x", "sim": 0.25, "sha256": "ab" * 32},
        {"URL": "b.jpg", "TEXT": "u", "text": "y", "sim": 0.5, "sha256": "cd" * 32},
    ]
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), buf)
        data = buf.getvalue()
    elif fmt == "jsonl":
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    else:
        data = ("URL,TEXT,text,sim,sha256\n" + "".join(",".join(map(str, r.values())) + "\n" for r in rows)).encode()
    path = tmp_path / f"l.{fmt}"
    path.write_bytes(data)
    sim = "string" if fmt == "csv" else "float64"
    auto = plan(tmp_path, path, columns=["sim"], hash_column="sha256")  # auto: "text" comes before "TEXT"
    assert [(c.name, c.type) for c in auto.columns] == [("caption", "string"), ("sim", sim), ("sha256", "string")]
    assert auto.specs[0].source.columns == ("text", "sim", "sha256")
    assert [r.columns[0] for r in refs(auto)] == ["x", "y"]
    named = plan(tmp_path, path, caption_column="TEXT", columns="*")
    assert [c.name for c in named.columns] == ["caption", "text", "sim", "sha256"]
    assert [r.columns[:2] for r in refs(named)] == [("t", "x"), ("u", "y")]
    assert plan(tmp_path, path, caption_column="none").columns == ()


def test_default_keeps_only_the_caption_and_plain_lists_have_none(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("url,caption,other\nx.jpg,hello,1\n")
    found = plan(tmp_path, tmp_path / "a.csv")
    assert found.columns == (Column("caption", "string"),) and refs(found)[0].columns == ("hello",)
    (tmp_path / "b.txt").write_text("x.jpg\n")
    plain = plan(tmp_path, tmp_path / "b.txt")
    assert plain.columns == () and refs(plain)[0].columns == ()


def test_jsonl_types_from_a_sample_and_mixed_values(tmp_path: Path) -> None:
    rows = [
        {"url": "a.jpg", "m": 1, "s": 1, "o": {"k": [1, 2]}, "late": None},
        {"url": "b.jpg", "m": 2.5, "s": "two", "o": None, "late": None},
        {"url": "c.jpg", "m": 3, "s": True, "o": [1], "late": 4},
    ]
    path = tmp_path / "l.json"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    found = plan(tmp_path, path, columns="*")
    assert [(c.name, c.type) for c in found.columns] == [
        ("m", "float64"),
        ("s", "string"),
        ("o", "string"),
        ("late", "int64"),
    ]
    assert [r.columns for r in refs(found)] == [
        (1.0, "1", '{"k": [1, 2]}', None),
        (2.5, "two", None, None),
        (3.0, "true", "[1]", 4),
    ]


def test_jsonl_value_that_does_not_fit_its_sampled_type_is_one_line(tmp_path: Path, monkeypatch: Any) -> None:
    from convert.sources import urls

    monkeypatch.setattr(urls, "SAMPLE_ROWS", 2)
    path = tmp_path / "l.jsonl"
    path.write_text('{"url": "a", "n": 1}\n{"url": "b", "n": 2}\n{"url": "c", "n": 2.5}\n')
    found = plan(tmp_path, path, columns=["n"])
    assert found.columns == (Column("n", "int64"),)
    with pytest.raises(SourceError, match=r"item row 3: column 'n' holds 2.5, not int64") as err:
        refs(found)
    assert "\n" not in str(err.value)


def test_invalid_utf8_is_replaced_and_giant_cells_are_cut_once(tmp_path: Path) -> None:
    big = "é" * 3_000_000  # 6 MB in one CSV cell: over csv's default field limit
    (tmp_path / "l.csv").write_bytes(b"url,caption\na.jpg,caf\xe9 \xff\nb.jpg," + big.encode() + b"\nc.jpg,ok\n")
    found = plan(tmp_path, tmp_path / "l.csv", max_text_bytes=1000)
    values = [r.columns[0] for r in refs(found)]
    assert values[0] == "caf\ufffd \ufffd" and values[2] == "ok"
    assert values[1] == "é" * 1001  # cut by the reader to limit + 1 characters: the worker caps and counts it
    (tmp_path / "l.jsonl").write_text(json.dumps({"url": "a.jpg", "caption": big}) + "\n")
    assert refs(plan(tmp_path, tmp_path / "l.jsonl", max_text_bytes=10))[0].columns == ("é" * 11,)


def test_parquet_other_types_and_only_needed_columns(tmp_path: Path) -> None:
    import datetime

    table = pa.table(
        {
            "url": ["a.jpg", "b.jpg"],
            "when": [datetime.date(2024, 1, 2), None],
            "tags": [["x", "y"], []],
            "raw": [b"\x00\xff", None],
            "u64": pa.array([1, 2], pa.uint64()),
            "i8": pa.array([-1, 2], pa.int8()),
            "f32": pa.array([0.5, None], pa.float32()),
            "cat": pa.array(["p", "q"]).dictionary_encode(),
        }
    )
    pq.write_table(table, tmp_path / "l.parquet")
    found = plan(tmp_path, tmp_path / "l.parquet", columns="*")
    assert [(c.name, c.type) for c in found.columns] == [
        ("when", "string"),
        ("tags", "string"),
        ("raw", "string"),
        ("u64", "string"),
        ("i8", "int64"),
        ("f32", "float64"),
        ("cat", "string"),
    ]
    assert [r.columns for r in refs(found)] == [
        ("2024-01-02", '["x", "y"]', "00ff", "1", -1, 0.5, "p"),
        (None, "[]", None, "2", 2, None, "q"),
    ]


def test_folder_of_mixed_compressed_lists_is_one_source(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "a.csv.gz").write_bytes(gzip.compress(b"url,caption\nx.jpg,one\n"))
    (tmp_path / "lists" / "b.csv.zst").write_bytes(zstandard.ZstdCompressor().compress(b"url,caption\ny.jpg,two\n"))
    (tmp_path / "lists" / "c.tsv.bz2").write_bytes(bz2.compress(b"url\tcaption\nz.jpg\tthree\n"))
    found = plan(tmp_path, tmp_path / "lists", 1)
    assert found.kind == "urls" and found.partitions == 3
    assert [r.columns for r in refs(found)] == [("one",), ("two",), ("three",)]


def test_multi_frame_zstd_and_multi_member_gzip_are_read_whole(tmp_path: Path) -> None:
    head, tail = b"url,caption\na.jpg,one\n", b"b.jpg,two\nc.jpg,three\n"
    z = zstandard.ZstdCompressor()
    (tmp_path / "l.csv.zst").write_bytes(z.compress(head) + z.compress(tail))
    (tmp_path / "m.csv.gz").write_bytes(gzip.compress(head) + gzip.compress(tail))
    for name in ("l.csv.zst", "m.csv.gz"):
        assert [r.columns for r in refs(plan(tmp_path, tmp_path / name, 2))] == [("one",), ("two",), ("three",)]


# ---------------------------------------------------------------- bad input: one line each


def _one_line(tmp_path: Path, uri: Path, match: str, **kw: Any) -> str:
    with pytest.raises(SourceError, match=match) as err:
        plan(tmp_path, uri, **kw)
    assert "\n" not in str(err.value) and str(uri) in str(err.value)
    return str(err.value)


def test_missing_column_names_the_columns_the_file_has(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("url,caption,sim\na.jpg,x,1\n")
    _one_line(tmp_path, tmp_path / "l.csv", r"no column 'nsfw'; it has 'url', 'caption', 'sim'", columns=["nsfw"])
    _one_line(tmp_path, tmp_path / "l.csv", r"no column 'alt'", caption_column="alt")
    _one_line(tmp_path, tmp_path / "l.csv", r"no column 'md5'", hash_column="md5")
    (tmp_path / "l.jsonl").write_text('{"url": "a.jpg"}\n')
    _one_line(
        tmp_path, tmp_path / "l.jsonl", r"no column 'x'; it has 'url' \(keys of its first 1000 rows\)", columns=["x"]
    )


@pytest.mark.parametrize("name", ["image", "key", "label", "Image"])
def test_reserved_names_are_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / "l.csv").write_text(f"url,{name}\na.jpg,x\n")
    columns = "*" if name == "image" else [name]
    _one_line(tmp_path, tmp_path / "l.csv", rf"column '{name}' is named like the stored item's own", columns=columns)


def test_caption_stored_twice_is_refused(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("url,caption,text\na.jpg,x,y\n")
    _one_line(tmp_path, tmp_path / "l.csv", "would be stored twice", caption_column="text", columns="*")


def test_more_than_1024_columns_with_star(tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(1025)]
    (tmp_path / "l.csv").write_text("url," + ",".join(names) + "\na.jpg" + "," * 1025 + "\n")
    _one_line(tmp_path, tmp_path / "l.csv", r"1025 columns, over the 1024", columns="*")
    assert len(plan(tmp_path, tmp_path / "l.csv", columns=names[:1024], caption_column="none").columns) == 1024


def test_schema_change_between_files_names_both(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "a.csv").write_text("url,caption,sim\na.jpg,x,1\n")
    (tmp_path / "lists" / "b.csv").write_text("url,caption,nsfw\nb.jpg,y,no\n")
    with pytest.raises(
        SourceError,
        match=r"a\.csv' and .*b\.csv' have different columns \(only the first has "
        r"'sim'; only the second has 'nsfw'\)",
    ) as err:
        plan(tmp_path, tmp_path / "lists", columns="*")
    assert "\n" not in str(err.value)
    pq.write_table(pa.table({"url": ["c.jpg"], "caption": ["z"], "sim": [0.5]}), tmp_path / "lists" / "b.parquet")
    (tmp_path / "lists" / "b.csv").unlink()
    with pytest.raises(SourceError, match=r"'sim' is string vs float64"):
        plan(tmp_path, tmp_path / "lists", columns="*")


def test_jsonl_files_merge_sampled_types(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "a.jsonl").write_text('{"url": "a", "n": 1, "m": null}\n')
    (tmp_path / "lists" / "b.jsonl").write_text('{"url": "b", "n": 1.5, "m": "x"}\n')
    found = plan(tmp_path, tmp_path / "lists", columns="*")
    assert [(c.name, c.type) for c in found.columns] == [("n", "float64"), ("m", "string")]
    assert [r.columns for r in refs(found)] == [(1.0, None), (1.5, "x")]


@pytest.mark.parametrize(
    "name, data, match",
    [
        ("l.json", b'[{"url": "a"}]\n', "not an array"),
        ("l.jsonl", b'{"url": "a"}\n{"url": \n', "item row 2 is not valid JSON"),
        ("l.jsonl", b'"a.jpg"\n', "is a JSON str, not an object"),
        ("l.csv", b"url,a,a\nx,1,2\n", "column 'a' appears twice"),
        ("l.csv.gz", b"not gzip at all", r"check that it is a valid \.gz file"),
        ("l.parquet.zst", b"\x28\xb5\x2f\xfdjunk", "not a readable parquet file"),
        ("l.csv.bz2", b"BZh9junk", r"valid \.bz2 file"),
        ("l.tsv", b"link\tcaption\nx\ty\n", "no 'url' column"),
        ("l.jsonl", b'{"link": "x"}\n', r"no 'url' column \(found: 'link'\)"),
    ],
)
def test_bad_list_files_are_one_line(tmp_path: Path, name: str, data: bytes, match: str) -> None:
    (tmp_path / name).write_bytes(data)
    _one_line(tmp_path, tmp_path / name, match, columns="*")


# ---------------------------------------------------------------- remote and end to end


@pytest.mark.s3
def test_remote_compressed_lists_on_s3(s3: Any, tmp_path: Path) -> None:
    s3.make_bucket("lists")
    opts = s3.storage_options()
    import fsspec

    fs = fsspec.filesystem("s3", **opts)
    for fmt, codec in (("csv", ".gz"), ("parquet", ""), ("jsonl", ".zst")):
        fs.pipe(f"lists/{fmt}/l.{fmt}{codec}", CODECS[codec](list_bytes(fmt, ROWS)))
        found = plan_source(
            SourceConfig(uri=f"s3://lists/{fmt}/l.{fmt}{codec}", storage_options=opts, columns="*"),
            2,
            Workdir(str(tmp_path / "work")),
        )
        got = refs(found, opts)
        assert [r.columns for r in got] == expected(fmt)[1]
        assert got[0].uri == f"s3://lists/{fmt}/img/0.jpg"


def test_end_to_end_run_records_the_columns(tmp_path: Path) -> None:
    from convert import run
    from convert.testing.images import jpeg_bytes

    (tmp_path / "img").mkdir()
    for i in range(len(ROWS)):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(16, 12))
    (tmp_path / "list.jsonl.gz").write_bytes(gzip.compress(list_bytes("jsonl", ROWS)))
    cfg = load_config(
        None,
        {
            "source.uri": str(tmp_path / "list.jsonl.gz"),
            "source.columns": "n,f,b",
            "output.uri": str(tmp_path / "out"),
            "output.format": "hdf5",
            "image.size": [8, 8],
            "image.resize": "stretch",
            "shard.size": 4,
            "cluster.kind": "threads",
        },
    )
    summary = run(cfg, log=lambda m: None)
    assert summary.exit_code() == 0
    from convert.records import read_record
    from convert.store import open_store

    store = open_store(str(tmp_path / "out"))
    records = [read_record(store, name) for name in ("shard-00000", "shard-00001")]
    stored = [("caption", "string"), ("n", "int64"), ("f", "float64"), ("b", "bool"), ("sha256", "string")]
    assert all(rec is not None and [(c.name, c.type) for c in rec[0].columns] == stored for rec in records)
    assert sum(rec[0].ok for rec in records if rec) == len(ROWS)


def test_end_to_end_counts_replaced_and_truncated_text(tmp_path: Path) -> None:
    from convert import run
    from convert.records import read_record
    from convert.store import open_store
    from convert.testing.images import jpeg_bytes

    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(16, 12))
    long = "ü" * 5000  # 10,000 bytes: over max_text_bytes
    rows = b"img/0.jpg,caf\xe9\nimg/1.jpg," + long.encode() + b"\nimg/2.jpg,ok\n"
    (tmp_path / "l.csv").write_bytes(b"url,caption\n" + rows)
    cfg = load_config(
        None,
        {
            "source.uri": str(tmp_path / "l.csv"),
            "source.max_text_bytes": 100,
            "output.uri": str(tmp_path / "out"),
            "image.size": [8, 8],
            "image.resize": "stretch",
            "shard.size": 10,
            "cluster.kind": "threads",
        },
    )
    assert run(cfg, log=lambda m: None).exit_code() == 0
    found = read_record(open_store(str(tmp_path / "out")), "shard-00000")
    assert found is not None and found[0].counters == {"text_truncated": 1, "text_replaced": 1}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["l.csv", "l.jsonl.gz", "l.parquet"])
def test_a_100_mb_caption_is_cut_without_a_traceback(tmp_path: Path, name: str) -> None:
    big = "x" * 100_000_000
    rows = [{"url": "a.jpg", "caption": big}, {"url": "b.jpg", "caption": "ok"}]
    data = list_bytes(name.split(".")[1], rows) if "parquet" not in name else None
    if data is None:
        buf = io.BytesIO()
        pq.write_table(pa.table({"url": ["a.jpg", "b.jpg"], "caption": [big, "ok"]}), buf)
        data = buf.getvalue()
    (tmp_path / name).write_bytes(gzip.compress(data, 1) if name.endswith(".gz") else data)
    del big
    got = [r.columns for r in refs(plan(tmp_path, tmp_path / name, max_text_bytes=65536))]
    assert got == [("x" * 65537,), ("ok",)]


def test_named_caption_column_and_unnamed_header_cells(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("url,caption,sim,,\na.jpg,x,1,,\n")
    found = plan(tmp_path, tmp_path / "l.csv", columns=["caption", "sim"])  # the caption is kept once
    assert [c.name for c in found.columns] == ["caption", "sim"]
    assert [c.name for c in plan(tmp_path, tmp_path / "l.csv", columns="*").columns] == ["caption", "sim"]
    _one_line(
        tmp_path,
        tmp_path / "l.csv",
        r"'sim' would be stored twice \(source.columns names it twice\)",
        columns=["sim", "sim"],
    )


def test_end_to_end_parquet_hash_column_is_checked(tmp_path: Path) -> None:
    import hashlib

    from convert import run
    from convert.records import read_record
    from convert.store import open_store
    from convert.testing.images import jpeg_bytes

    (tmp_path / "img").mkdir()
    digests = []
    for i in range(3):
        data = jpeg_bytes(16, 12 + i)
        (tmp_path / "img" / f"{i}.jpg").write_bytes(data)
        digests.append(hashlib.sha256(data).hexdigest())
    digests[1] = "0" * 64  # a wrong digest in the list
    table = pa.table(
        {
            "url": [f"img/{i}.jpg" for i in range(3)],
            "caption": ["a", None, "c"],
            "similarity": [0.25, 0.5, None],
            "sha256": digests,
        }
    )
    pq.write_table(table, tmp_path / "l.parquet")
    cfg = load_config(
        None,
        {
            "source.uri": str(tmp_path / "l.parquet"),
            "source.columns": ["similarity"],
            "source.hash_column": "sha256",
            "output.uri": str(tmp_path / "out"),
            "image.size": [8, 8],
            "image.resize": "stretch",
            "cluster.kind": "threads",
        },
    )
    run(cfg, log=lambda m: None)
    found = read_record(open_store(str(tmp_path / "out")), "shard-00000")
    assert found is not None
    record = found[0]
    assert [(c.name, c.type) for c in record.columns] == [
        ("caption", "string"),
        ("similarity", "float64"),
        ("sha256", "string"),
    ]
    from convert.ledger import iter_ledger

    ledger = [row.item for row in iter_ledger(open_store(str(tmp_path / "out")))]
    assert [row.status.value for row in ledger] == ["ok", "hash_mismatch", "ok"]
    assert [row.digest for row in ledger] == [digests[0], ledger[1].digest, digests[2]]
    assert "000000000000" in ledger[1].error  # both digests' first 12 hex digits


def seekable_zstd(chunks: list[bytes], checksums: bool = False) -> bytes:
    """`chunks` as independent zstd frames followed by the seekable format's seek table."""
    import struct

    frames = [zstandard.ZstdCompressor().compress(c) for c in chunks]
    entry = "<III" if checksums else "<II"
    table = b"".join(struct.pack(entry, len(f), len(c), *([0] if checksums else [])) for f, c in zip(frames, chunks))
    footer = struct.pack("<IBI", len(frames), 0x80 if checksums else 0, 0x8F92EAB1)
    return b"".join(frames) + struct.pack("<II", 0x184D2A5E, len(table) + 9) + table + footer


@pytest.mark.parametrize("checksums", [False, True])
def test_seekable_zstd_shards_start_at_their_own_frame(tmp_path: Path, checksums: bool) -> None:
    def rows(a: int, b: int) -> bytes:
        return b"".join(b"img/%d.jpg,c%d\n" % (i, i) for i in range(a, b))

    chunks = [b"url,caption\n" + rows(0, 4000), rows(4000, 5000), rows(5000, 6000)]  # the header well inside frame 0
    path = tmp_path / "l.csv.zst"
    path.write_bytes(seekable_zstd(chunks, checksums))
    found = plan(tmp_path, path, 1000)
    assert [r.columns[0] for r in refs(found)] == [f"c{i}" for i in range(6000)]
    data = bytearray(path.read_bytes())
    second = len(zstandard.ZstdCompressor().compress(chunks[0]))
    data[second + 6 : second + 9] = b"\xff\xff\xff"  # break frame 1 (same size: still "as planned")
    path.write_bytes(bytes(data))
    last = [r.columns[0] for r in shard_refs(found.specs[5], None)]
    assert last == [f"c{i}" for i in range(5000, 6000)]  # read from its own frame: the broken one is skipped
    with pytest.raises(SourceError, match=r"valid \.zst file"):
        list(shard_refs(found.specs[4], None))


def test_zstd_without_a_seek_table_is_read_from_its_start(tmp_path: Path) -> None:
    from convert.sources.seekable import frame_start

    plain = zstandard.ZstdCompressor().compress(b"x" * 1000)
    assert frame_start(io.BytesIO(plain), len(plain), 500) is None
    table = seekable_zstd([b"a" * 10, b"b" * 10])
    assert frame_start(io.BytesIO(table), len(table), 15)[1] == 10
    assert frame_start(io.BytesIO(table), len(table), 25) is None  # past the end
    assert frame_start(io.BytesIO(b"junk" + table), len(table) + 4, 15) is None  # frames do not fill the file


def test_column_order_may_differ_between_files(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    pq.write_table(pa.table({"url": ["a.jpg"], "caption": ["x"], "w": [1], "h": [2]}), tmp_path / "lists" / "a.parquet")
    pq.write_table(pa.table({"h": [4], "url": ["b.jpg"], "w": [3], "caption": ["y"]}), tmp_path / "lists" / "b.parquet")
    found = plan(tmp_path, tmp_path / "lists", columns="*")
    assert [c.name for c in found.columns] == ["caption", "w", "h"]
    assert [r.columns for r in refs(found)] == [("x", 1, 2), ("y", 3, 4)]
    (tmp_path / "lists" / "c.csv").write_text("h,url,w,caption\n6,c.jpg,5,z\n")  # CSV: strings, so refused
    with pytest.raises(SourceError, match=r"\('w' is int64 vs string\)"):
        plan(tmp_path, tmp_path / "lists", columns="*")
    (tmp_path / "lists" / "c.csv").unlink()
    found = plan(tmp_path, tmp_path / "lists", columns=["h", "w"], caption_column="none")
    assert [r.columns for r in refs(found)] == [(2, 1), (4, 3)]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_bom_and_crlf(tmp_path: Path, fmt: str) -> None:
    data = list_bytes(fmt, ROWS[:2]).replace(b"\n", b"\r\n")
    (tmp_path / f"l.{fmt}.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf" + data))
    found = plan(tmp_path, tmp_path / f"l.{fmt}.gz", 1, columns="*")
    assert [r.columns for r in refs(found)] == expected(fmt)[1][:2]
