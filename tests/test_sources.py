"""Sources: folder/glob listing with ImageFolder labels, URL lists, CIFAR batches, key hygiene."""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Callable
from pathlib import Path

import fsspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from convert.config import SourceConfig
from convert.sources import SourceError, detect_kind, list_source, read_member, safe_key
from convert.sources.base import MAX_KEY_BYTES
from convert.specs import ItemError, Status
from convert.testing.cifar import CIFAR10_NAMES, write_batch, write_cifar10, write_cifar100
from convert.testing.images import jpeg_bytes, write_image_folder


def listing(uri: str | Path, **kw):  # type: ignore[no-untyped-def]
    return list_source(SourceConfig(uri=str(uri), **kw))


# ---------------------------------------------------------------- folders and globs


def test_image_folder_labels_keys_and_uris(tmp_path: Path) -> None:
    paths = write_image_folder(tmp_path / "train", {"dog": 2, "cat": 3})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "cat" / "._img_0000.jpg").write_bytes(b"macOS resource fork")
    (tmp_path / "train" / "dog" / "UPPER.JPEG").write_bytes(jpeg_bytes(8, 8))
    result = listing(tmp_path / "train")
    assert result.kind == "folder"
    assert result.label_names == ["cat", "dog"]
    assert [it.key for it in result.items] == [
        "cat/img_0000.jpg",
        "cat/img_0001.jpg",
        "cat/img_0002.jpg",
        "dog/UPPER.JPEG",
        "dog/img_0000.jpg",
        "dog/img_0001.jpg",
    ]
    assert [it.label for it in result.items] == [0, 0, 0, 1, 1, 1]
    assert all(it.member is None and os.path.isabs(it.uri) and Path(it.uri).is_file() for it in result.items)
    assert {Path(it.uri) for it in result.items} >= set(paths)


def test_label_modes(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"a": 1, "b": 1})
    assert [it.label for it in listing(tmp_path, labels="none").items] == [None, None]
    assert listing(tmp_path, labels="none").label_names is None
    (tmp_path / "loose.jpg").write_bytes(jpeg_bytes(8, 8))
    auto = listing(tmp_path)
    assert auto.label_names is None and all(it.label is None for it in auto.items)
    with pytest.raises(SourceError, match=r"loose\.jpg.*labels=none"):
        listing(tmp_path, labels="folder")


def test_glob_selects_what_it_matches_relative_to_its_root(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "data" / "train", {"cat": 2, "dog": 1})
    (tmp_path / "data" / "train" / "dog" / "extra.png").write_bytes(b"png-ish")
    (tmp_path / "data" / "train" / "dog" / "readme.md").write_text("x")
    result = listing(f"{tmp_path}/data/train/**/*.jpg")
    assert [it.key for it in result.items] == ["cat/img_0000.jpg", "cat/img_0001.jpg", "dog/img_0000.jpg"]
    assert result.label_names == ["cat", "dog"]
    only_png = listing(f"file://{tmp_path}/data/train/*/*.png")
    assert [(it.key, it.uri) for it in only_png.items] == [("dog/extra.png", f"{tmp_path}/data/train/dog/extra.png")]


@pytest.mark.parametrize(
    "make, uri, match",
    [
        (lambda p: None, "missing", "does not exist"),
        (lambda p: (p / "empty").mkdir(), "empty", "no images"),
        (lambda p: (p / "docs").mkdir() or (p / "docs" / "a.txt").write_text("x"), "docs", "no images"),
        (lambda p: (p / "d").mkdir(), "d/*.jpg", "matched no files"),
    ],
)
def test_folder_errors_are_one_line_naming_the_path(
    tmp_path: Path, make: Callable[[Path], object], uri: str, match: str
) -> None:
    make(tmp_path)
    with pytest.raises(SourceError, match=match) as exc:
        listing(tmp_path / uri, kind="folder")
    assert str(tmp_path / uri) in str(exc.value) and "\n" not in str(exc.value)


def test_memory_folder_restores_protocol() -> None:
    fs = fsspec.filesystem("memory")
    root = f"/src-{uuid.uuid4().hex}"
    fs.pipe({f"{root}/x/1.jpg": b"a", f"{root}/y/2.png": b"b", f"{root}/y/skip.bin": b"c"})
    try:
        result = listing(f"memory://{root}")
        assert [(it.key, it.uri, it.label) for it in result.items] == [
            ("x/1.jpg", f"memory://{root}/x/1.jpg", 0),
            ("y/2.png", f"memory://{root}/y/2.png", 1),
        ]
        with fsspec.open(result.items[1].uri, "rb") as f:  # the fetch layer can open what we listed
            assert f.read() == b"b"
    finally:
        fs.rm(root, recursive=True)


def test_listings_are_deterministic(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"b": 3, "a": 2, "c": 1})
    assert listing(tmp_path) == listing(tmp_path)
    write_cifar10(tmp_path, per_batch=2, batches=2, test=2)
    assert listing(tmp_path / "cifar-10-batches-py") == listing(tmp_path / "cifar-10-batches-py")


# ---------------------------------------------------------------- URL lists


def test_txt_list_skips_comments_and_resolves_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    lst = tmp_path / "lists" / "urls.txt"
    lst.write_text("# header comment\n\nhttps://example.com/a/cat.jpg?sig=1\n  imgs/b.png  \n../c.jpg\n/abs/d.jpg\n")
    result = listing(lst)
    assert result.kind == "urls" and result.label_names is None
    assert [(it.key, it.uri, it.label) for it in result.items] == [
        ("000000-cat", "https://example.com/a/cat.jpg?sig=1", None),
        ("000001-b", f"{tmp_path}/lists/imgs/b.png", None),
        ("000002-c", f"{tmp_path}/c.jpg", None),
        ("000003-d", "/abs/d.jpg", None),
    ]


def test_csv_labels_names_keys(tmp_path: Path) -> None:
    ints = tmp_path / "ints.csv"
    ints.write_text("URL,label,key\nhttp://h/1.jpg,3,first\nhttp://h/2.jpg,,\nhttp://h/3.jpg,0,third\n")
    result = listing(ints)
    assert [(it.key, it.label) for it in result.items] == [("first", 3), ("000001-2", None), ("third", 0)]
    assert result.label_names is None
    named = tmp_path / "named.csv"
    named.write_text("key,url,label\nk1,imgs/a.jpg,zebra\nk2,imgs/b.jpg,ant\nk3,imgs/c.jpg,zebra\n")
    result = listing(named)
    assert result.label_names == ["ant", "zebra"]
    assert [(it.key, it.label, it.uri) for it in result.items] == [
        ("k1", 1, f"{tmp_path}/imgs/a.jpg"),
        ("k2", 0, f"{tmp_path}/imgs/b.jpg"),
        ("k3", 1, f"{tmp_path}/imgs/c.jpg"),
    ]


@pytest.mark.parametrize(
    "text, match",
    [
        ("path,label\na.jpg,1\n", r"no 'url' column \(found: 'path', 'label'\)"),
        ("url,key\na.jpg,same\nb.jpg,same\n", r"duplicate keys 'same'"),
        ("url,key\na.jpg,../..\n", r"row 1: key '\.\./\.\.'"),
        ("url,label\na.jpg,-1\n", "negative"),
        ("url\n\n", "has no URLs"),
        ("url,label\n,3\n", "row 1 has an empty url"),
    ],
)
def test_csv_errors(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(SourceError, match=match):
        listing(tmp_path / "bad.csv")


def test_parquet_list(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"url": ["s3://b/x.jpg", "rel/y.jpg"], "label": [1, None], "key": ["kx", None], "extra": [1, 2]})
    pq.write_table(table, tmp_path / "list.parquet")
    result = listing(tmp_path / "list.parquet")
    assert [(it.key, it.uri, it.label) for it in result.items] == [
        ("kx", "s3://b/x.jpg", 1),
        ("000001-y", f"{tmp_path}/rel/y.jpg", None),
    ]
    pq.write_table(pa.table({"link": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(SourceError, match="found: 'link'"):
        listing(tmp_path / "bad.parquet")


def test_memory_url_list_via_fsspec() -> None:
    base = f"memory://lists-{uuid.uuid4().hex}"
    with fsspec.open(f"{base}/sub/urls.csv", "w") as f:
        f.write("url,label\nimgs/a.jpg,cat\n../b.jpg,dog\nhttps://x/c.jpg,cat\n")
    try:
        result = listing(f"{base}/sub/urls.csv")
        root = base.replace("memory://", "memory:///")
        assert [it.uri for it in result.items] == [f"{root}/sub/imgs/a.jpg", f"{root}/b.jpg", "https://x/c.jpg"]
        assert result.label_names == ["cat", "dog"] and [it.label for it in result.items] == [0, 1, 0]
    finally:
        fsspec.filesystem("memory").rm(base, recursive=True)
    with pytest.raises(SourceError, match="not found"):
        listing(f"{base}/sub/urls.csv")


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("python2", [True, False])
def test_cifar10_round_trip(tmp_path: Path, python2: bool) -> None:
    written = write_cifar10(tmp_path, per_batch=3, batches=2, test=2, python2=python2)
    result = listing(tmp_path / "cifar-10-batches-py")
    assert result.kind == "cifar" and result.label_names == CIFAR10_NAMES
    assert [it.key for it in result.items][:4] == [
        "data_batch_1/00000",
        "data_batch_1/00001",
        "data_batch_1/00002",
        "data_batch_2/00000",
    ]
    assert [it.key for it in result.items][-2:] == ["test_batch/00000", "test_batch/00001"]
    for it in result.items:
        images, labels = written[it.key.split("/")[0]]
        pixels = read_member(it.uri, it.member)
        assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3) and pixels.flags.c_contiguous
        np.testing.assert_array_equal(pixels, images[it.member])
        assert it.label == labels[it.member]


def test_cifar100_round_trip_and_glob_selection(tmp_path: Path) -> None:
    written = write_cifar100(tmp_path, train=4, test=3)
    result = listing(tmp_path / "cifar-100-python")
    assert [it.key for it in result.items] == [f"train/{i:05d}" for i in range(4)] + [f"test/{i:05d}" for i in range(3)]
    assert result.label_names is not None and len(result.label_names) == 100
    assert [it.label for it in result.items] == written["train"][1] + written["test"][1]
    it = result.items[5]
    np.testing.assert_array_equal(read_member(it.uri, it.member), written["test"][0][1])

    write_cifar10(tmp_path, per_batch=2, batches=3, test=2)
    picked = listing(f"{tmp_path}/cifar-10-batches-py/data_batch_*")
    assert sorted({it.key.split("/")[0] for it in picked.items}) == ["data_batch_1", "data_batch_2", "data_batch_3"]
    single = listing(tmp_path / "cifar-10-batches-py" / "test_batch")
    assert [it.key for it in single.items] == ["test_batch/00000", "test_batch/00001"]
    assert single.label_names == CIFAR10_NAMES


def test_read_member_failures_are_item_errors(tmp_path: Path) -> None:
    path = write_batch(tmp_path / "data_batch_1", np.zeros((2, 32, 32, 3), np.uint8), [0, 1])
    with pytest.raises(ItemError) as exc:
        read_member(str(path), 2)
    assert exc.value.status is Status.ERROR and "out of range" in exc.value.message
    with pytest.raises(ItemError) as exc:
        read_member(str(tmp_path / "data_batch_9"), 0)
    assert exc.value.status is Status.NOT_FOUND
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ItemError) as exc:
        read_member(str(tmp_path / "data_batch_3"), 0)
    assert exc.value.status is Status.DECODE_ERROR


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.target}",))


class _Eval:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (eval, ("1+1",))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    target = tmp_path / "pwned"
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": _Exploit(target)}, protocol=2))
    with pytest.raises(SourceError, match=r"refusing to load (posix|nt|os)\.system from data_batch_1"):
        listing(folder)
    with pytest.raises(ItemError, match="refusing to load"):
        read_member(str(folder / "data_batch_1"), 0)
    assert not target.exists()
    (folder / "data_batch_1").write_bytes(pickle.dumps(_Eval(), protocol=2))
    with pytest.raises(SourceError, match=r"refusing to load (__builtin__|builtins)\.eval"):
        listing(folder)


def test_not_a_cifar_batch(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": [1, 2, 3]}, protocol=2))
    with pytest.raises(SourceError, match=r"data_batch_1: 'data' must be an \(N, 3072\) uint8 array"):
        listing(folder)
    (folder / "data_batch_1").unlink()
    (folder / "readme.html").write_text("<html>")
    with pytest.raises(SourceError, match="no CIFAR batch files"):
        listing(folder)


# ---------------------------------------------------------------- kind detection and keys


@pytest.mark.parametrize(
    "uri, kind",
    [
        ("lists/urls.txt", "urls"),
        ("s3://bucket/list.CSV", "urls"),
        ("gs://b/part-0.parquet", "urls"),
        ("data/cifar-10-batches-py", "cifar"),
        ("data/cifar-10-batches-py/", "cifar"),
        ("/x/cifar-100-python/train", "cifar"),
        ("/x/cifar-10-batches-py/data_batch_*", "cifar"),
        ("/elsewhere/data_batch_3", "cifar"),
        ("/elsewhere/test_batch", "cifar"),
        ("/imagenet/train", "folder"),
        ("data/train/**/*.jpg", "folder"),
        ("s3://bucket/prefix/", "folder"),
    ],
)
def test_detect_kind(uri: str, kind: str) -> None:
    assert detect_kind(uri) == kind


def test_kind_forced_by_config(tmp_path: Path) -> None:
    (tmp_path / "photos.txt").mkdir()  # a folder whose name looks like a list
    (tmp_path / "photos.txt" / "a.jpg").write_bytes(jpeg_bytes(8, 8))
    assert [it.key for it in listing(tmp_path / "photos.txt", kind="folder").items] == ["a.jpg"]


@pytest.mark.parametrize(
    "text, key",
    [
        ("cat/img_0001.jpg", "cat/img_0001.jpg"),
        ("../../etc/passwd", "etc/passwd"),
        ("/abs/path.jpg", "abs/path.jpg"),
        ("a//b/./c", "a/b/c"),
        ("a\\..\\b", "a/b"),
        ("bad\x00name\n.jpg", "bad_name_.jpg"),
        ("ünï/çødé.png", "ünï/çødé.png"),
    ],
)
def test_safe_key_hostile_inputs(text: str, key: str) -> None:
    assert safe_key(text) == key


@pytest.mark.parametrize("text", ["", "/", "..", "../..", " / ", "./."])
def test_safe_key_rejects_empty(text: str) -> None:
    with pytest.raises(SourceError, match="no usable characters"):
        safe_key(text)


@pytest.mark.parametrize("char", ["x", "é", "😀"])
def test_safe_key_long_inputs_stay_short_and_distinct(char: str) -> None:
    a, b = safe_key(char * 5000 + "a"), safe_key(char * 5000 + "b")
    assert len(a.encode()) <= MAX_KEY_BYTES and len(b.encode()) <= MAX_KEY_BYTES and a != b
    assert a.startswith(char * 10)


@given(st.text(max_size=300))
def test_safe_key_invariants(text: str) -> None:
    try:
        key = safe_key(text)
    except SourceError:
        return
    segments = key.split("/")
    assert key and len(key.encode("utf-8")) <= MAX_KEY_BYTES and not key.startswith("/")
    assert all(s.strip() and s not in (".", "..") for s in segments)
    assert all(ord(c) >= 32 and c not in "\x7f\u2028\u2029" for c in key)


def test_derived_keys_never_carry_credentials_from_the_url(tmp_path: Path) -> None:
    lst = tmp_path / "urls.txt"
    lst.write_text("https://user:hunter2@example.com\nhttps://h/p/cat.jpg?X-Amz-Signature=s3cr3t\n")
    keys = [it.key for it in listing(lst).items]
    assert keys == ["000000-example", "000001-cat"]
    assert not any("hunter2" in k or "s3cr3t" in k for k in keys)


def test_a_local_folder_lists_as_fsspec_types_it_links_and_loose_images_between_subfolders(tmp_path: Path) -> None:
    """The local listing (os.scandir, no stat per entry) keeps fsspec's typing: a symlinked image is
    an image, a symlinked folder is not descended into; loose images between subfolders keep the
    order of one sorted listing of full paths."""
    root, b = tmp_path / "tree", jpeg_bytes(8, 8)
    for name in ("a.jpg", "a0.jpg", "b.png", "z.jpg", ".hidden.jpg", "notes.txt", "a/1.jpg", "a.b/1.jpg", "c/1.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b)
    (tmp_path / "elsewhere.jpg").write_bytes(b)
    os.symlink(tmp_path / "elsewhere.jpg", root / "linked.jpg")
    os.symlink(root / "c", root / "d_link")
    keys = [ref.key for ref in list_source(SourceConfig(uri=str(root), labels="none")).items]
    assert keys == ["a.b/1.jpg", "a.jpg", "a/1.jpg", "a0.jpg", "b.png", "c/1.jpg", "linked.jpg", "z.jpg"]
