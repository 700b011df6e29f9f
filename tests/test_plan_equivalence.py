"""The partitioned planner gives today's inputs the same shards as the wave-1 planner.

Same keys, uris, labels and members, in the same order and the same shards, and the same label
names - for folders (classes, loose files, '.'-sorting names, hidden files, nested dirs, globs),
.txt lists (comments, blank lines, CRLF, BOM, relative paths), .csv lists (names and integer labels,
explicit keys, quoted commas and newlines), parquet lists (several row groups) and CIFAR batches.
The reference is a frozen copy of the old code (tests/old_planner.py).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from convert.config import SourceConfig
from convert.sources import Workdir, plan_source, shard_refs
from convert.testing.cifar import write_cifar10
from convert.testing.images import jpeg_bytes, write_image_folder

sys.path.insert(0, str(Path(__file__).parent))
import old_planner  # noqa: E402


def _old(uri: str, kind: str, size: int, labels: str = "auto") -> tuple[list, list[str] | None]:
    if kind == "folder":
        listing = old_planner.list_folder(uri, None, labels)
    elif kind == "cifar":
        listing = old_planner.list_cifar(uri, None)
    else:
        listing = old_planner.list_urls(uri, None)
    return [(name, list(items)) for name, items in old_planner.plan_shards(listing.items, size)], listing.label_names


def _new(uri: str, size: int, tmp: Path, labels: str = "auto") -> tuple[list, list[str] | None]:
    found = plan_source(SourceConfig(uri=uri, labels=labels), size, Workdir(str(tmp / "work")))
    # ItemRef.slice (which of the shard's slices a ref came from) did not exist in the old planner
    return [(s.name, [replace(r, slice=0) for r in shard_refs(s, None)]) for s in found.specs], found.label_names


def _same(uri: str | Path, kind: str, tmp: Path, sizes=(1, 3, 7, 1000), labels: str = "auto") -> None:  # type: ignore[no-untyped-def]
    for size in sizes:
        old, new = _old(str(uri), kind, size, labels), _new(str(uri), size, tmp, labels)
        assert new[1] == old[1], size
        assert new[0] == old[0], size
        assert sum(len(items) for _, items in new[0]) > 0


def test_folder_tree(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    write_image_folder(root, {"a": 3, "a.b": 2, "a0": 1, "Zed": 2, "b c": 1})
    (root / "a" / "deeper").mkdir()
    (root / "a" / "deeper" / "x.png").write_bytes(jpeg_bytes(8, 8))
    (root / "a" / ".hidden.jpg").write_bytes(jpeg_bytes(8, 8))
    (root / ".cache").mkdir()
    (root / ".cache" / "y.jpg").write_bytes(jpeg_bytes(8, 8))
    (root / "empty").mkdir()
    (root / "a" / "notes.txt").write_text("x")
    _same(root, "folder", tmp_path)
    (root / "loose.jpg").write_bytes(jpeg_bytes(8, 8))
    (root / "A.jpg").write_bytes(jpeg_bytes(8, 8))
    _same(root, "folder", tmp_path)
    _same(root, "folder", tmp_path, labels="none")
    _same(f"{root}/**/*.jpg", "folder", tmp_path)
    _same(root / "a" / "img_0000.jpg", "folder", tmp_path)


def test_txt_lists(tmp_path: Path) -> None:
    (tmp_path / "l").mkdir()
    lst = tmp_path / "l" / "urls.txt"
    body = "# c\n\nhttp://h/a/cat.jpg?x=1\n  rel/b.png  \n../c.jpg\n\t# indented comment\n/abs/d.jpg\n" * 5
    lst.write_bytes(b"\xef\xbb\xbf" + body.replace("\n", "\r\n").encode() + b"http://h/last-no-newline.jpg")
    _same(lst, "urls", tmp_path)
    lst.write_text("".join(f"http://h/{i}/img{i}.jpg\n" for i in range(2500)))
    _same(lst, "urls", tmp_path, sizes=(1, 999, 1000, 2500, 4000))


def test_csv_lists(tmp_path: Path) -> None:
    lst = tmp_path / "named.csv"
    lst.write_text(
        'key,url,label\nk1,imgs/a.jpg,zebra\n\n ,, \nk2,"imgs/b,comma.jpg",ant\nk3,"imgs/multi\nline.jpg",3\n'
        '"k4",imgs/d.jpg,\n'
    )
    _same(lst, "urls", tmp_path)
    ints = tmp_path / "ints.csv"
    ints.write_text("URL,label\n" + "".join(f"http://h/{i}.jpg,{i % 4}\n" for i in range(50)))
    _same(ints, "urls", tmp_path)


def test_parquet_lists(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    n = 1000
    table = pa.table(
        {
            "url": [f"rel/{i}.jpg" for i in range(n)],
            "label": [f"c{i % 7}" if i % 5 else None for i in range(n)],
            "key": [f"k{i}" if i % 3 else None for i in range(n)],
        }
    )
    pq.write_table(table, tmp_path / "list.parquet", row_group_size=128)
    _same(tmp_path / "list.parquet", "urls", tmp_path, sizes=(1, 100, 128, 300, 5000))
    pq.write_table(
        pa.table({"url": [f"http://h/{i}.jpg" for i in range(300)], "label": list(range(300))}),
        tmp_path / "ints.parquet",
        row_group_size=64,
    )
    _same(tmp_path / "ints.parquet", "urls", tmp_path, sizes=(50, 64, 1000))


def test_cifar(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=5, batches=3, test=4)
    _same(tmp_path / "cifar-10-batches-py", "cifar", tmp_path, sizes=(1, 3, 4, 7, 100))
