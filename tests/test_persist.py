"""convert.persist: exact round trips, every codec and target kind, CLI interop, mmap, hostile input."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import math
import os
import pickle
import shutil
import subprocess
import sys
import tracemalloc
import uuid
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from convert import persist
from convert.persist import PersistError, _tree
from convert.persist._format import MAGIC, PREAMBLE, data_start

CODEC_NAMES = ["none", "zlib", "gzip", "bz2", "lzma", "xz", "zstd", "lz4"]
EXTENSIONS = {
    "zlib": ".z",
    "gzip": ".gz",
    "bz2": ".bz2",
    "lzma": ".lzma",
    "xz": ".xz",
    "zstd": ".zst",
    "lz4": ".lz4",
    "none": ".bin",
}


# ---------------------------------------------------------------- exact comparison


def canon(x: object) -> str:
    """Type-exact canonical text of a hashable value (sets sorted), for comparing set members."""
    if isinstance(x, (frozenset, set)):
        return f"{type(x).__name__}:[{','.join(sorted(map(canon, x)))}]"
    if isinstance(x, tuple):
        return f"tuple:({','.join(map(canon, x))})"
    return f"{type(x).__module__}.{type(x).__name__}:{x!r}"


def assert_same(a: object, b: object) -> None:
    """a and b are equal with identical types all the way down (NaN equals NaN, -0.0 != 0.0)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype.str == b.dtype.str and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
        if a.flags.f_contiguous and not a.flags.c_contiguous:
            assert b.flags.f_contiguous
    elif isinstance(a, np.generic):
        assert a.dtype.str == b.dtype.str and a.tobytes() == b.tobytes()
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    elif isinstance(a, complex):
        assert_same(a.real, b.real)
        assert_same(a.imag, b.imag)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert [canon(k) for k in a] == [canon(k) for k in b]
        for x, y in zip(a.values(), b.values()):
            assert_same(x, y)
    elif isinstance(a, (set, frozenset)):
        assert canon(a) == canon(b)
    else:
        assert a == b


# ---------------------------------------------------------------- strategies

_dtypes = (
    hnp.boolean_dtypes()
    | hnp.integer_dtypes()
    | hnp.unsigned_integer_dtypes()
    | hnp.floating_dtypes()
    | hnp.complex_number_dtypes()
    | hnp.byte_string_dtypes()
    | hnp.unicode_string_dtypes()
    | hnp.datetime64_dtypes()
    | hnp.timedelta64_dtypes()
)


@st.composite
def ndarrays(draw: st.DrawFn) -> np.ndarray:
    arr = draw(hnp.arrays(_dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
    layout = draw(st.sampled_from(["C", "F", "strided"]))
    if layout == "F":
        return np.asfortranarray(arr)
    if layout == "strided" and arr.ndim:
        return arr[::2]
    return arr


hashables = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.binary(max_size=8) | st.floats(allow_nan=False),
    lambda c: st.tuples(c, c) | st.frozensets(c, max_size=3),
    max_leaves=6,
)

leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**62)
    | st.floats()
    | st.text()
    | st.binary()
    | st.complex_numbers()
    | st.binary(min_size=_tree.INLINE_BYTES + 1, max_size=5000).map(bytearray)
    | ndarrays()
    | ndarrays().filter(lambda a: a.size > 0).map(lambda a: a.flat[0])
    | st.lists(st.integers(), min_size=2)
    | st.lists(st.floats(), min_size=2)
    | st.lists(st.text(), min_size=2)
    | st.lists(st.booleans(), min_size=2)
)

trees = st.recursive(
    leaves,
    lambda c: (
        st.lists(c, max_size=5)
        | st.lists(c, max_size=4).map(tuple)
        | st.dictionaries(hashables, c, max_size=4)
        | st.sets(hashables, max_size=4)
        | st.frozensets(hashables, max_size=3)
    ),
    max_leaves=25,
)


def roundtrip(obj: object, compress: object = None) -> object:
    buf = io.BytesIO()
    persist.dump(obj, buf, compress=compress)
    buf.seek(0)
    return persist.load(buf)


@pytest.mark.parametrize("codec", CODEC_NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=trees, block_min=st.sampled_from([1, 256]))
def test_roundtrip_generated_objects_exactly(codec: str, obj: object, block_min: int) -> None:
    old, _tree.BLOCK_LIST_MIN = _tree.BLOCK_LIST_MIN, block_min  # 1: every list goes out of band
    try:
        assert_same(obj, roundtrip(obj, compress=codec))
    finally:
        _tree.BLOCK_LIST_MIN = old


def _ledger(n: int = 2000) -> dict:
    rng = np.random.default_rng(0)
    return {
        "keys": [f"img/{i:07d}.jpg" for i in range(n)],
        "key_array": np.array([f"img/{i:07d}.jpg" for i in range(n)], dtype="S15"),
        "labels": rng.integers(0, 1000, n),
        "status": rng.integers(0, 4, n, dtype=np.uint8),
        "shapes": rng.integers(1, 4000, (n, 3), dtype=np.int32),
        "plan": {0: ("shard-0000", 0, n // 2), 1: ("shard-0001", n // 2, n)},
        "floats": [0.5, -0.0, math.nan, math.inf, -math.inf, 1e-320] * 50,
        "big": [2**64, -(2**200), 2**63 - 1, -(2**63)],
        "ints": list(range(-300, 300)),
        "text": ["ünïcødé ✓", "日本語", "\ud800 lone surrogate", "nul\x00inside"] * 100,
        "empty": ([], (), {}, set(), frozenset(), "", b"", np.empty((0, 3), "<f4")),
        "scalars": (
            np.float16(1.5),
            np.int64(-3),
            np.bool_(True),
            np.str_("é"),
            np.bytes_(b"ab"),
            np.datetime64("2024-01-01T00:00:00", "s"),
            np.uint8(255),
        ),
        "arrays": (
            np.asfortranarray(np.arange(12.0).reshape(3, 4)),
            np.arange(10, dtype=">i4"),
            np.array(3.0),
            np.arange(30).reshape(5, 6)[::2, 1::2],
            np.array(["a", "ßç"]),
            np.array([1 + 2j], "<c8"),
        ),
        "bools": [True, False] * 200,
        "blob": bytes(range(256)) * 40,
        "cx": 1.5 - 2j,
    }


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_ledger_roundtrip_every_codec(codec: str, tmp_path: Path) -> None:
    obj = _ledger()
    path = tmp_path / f"ledger{EXTENSIONS[codec]}"
    persist.dump(obj, path)  # codec chosen from the extension
    assert_same(obj, persist.load(path))
    assert persist.load(str(path))["arrays"][0].flags.f_contiguous


def test_targets_path_url_and_file_object(tmp_path: Path) -> None:
    obj = _ledger(300)
    url = f"memory://persist-{uuid.uuid4().hex}/ledger.xz"
    persist.dump(obj, url)
    assert fsspec.filesystem("memory").cat(url)[:6] == b"\xfd7zXZ\x00"  # .xz extension honoured
    assert_same(obj, persist.load(url))
    file_url = f"file://{tmp_path}/ledger.gz"
    persist.dump(obj, file_url)
    assert_same(obj, persist.load(tmp_path / "ledger.gz"))
    with open(tmp_path / "obj.bin", "wb") as fh:
        fh.write(b"prefix")
        persist.dump(obj, fh, compress=("bz2", 9))
    with open(tmp_path / "obj.bin", "rb") as fh:
        assert fh.read(6) == b"prefix"
        assert_same(obj, persist.load(fh))  # loads from the current position


@pytest.mark.parametrize("codec", ["none", "gzip", "zstd"])
def test_unseekable_stream_source(codec: str, tmp_path: Path) -> None:
    obj = _ledger(300)
    persist.dump(obj, tmp_path / "f", compress=codec)
    with subprocess.Popen(["cat", str(tmp_path / "f")], stdout=subprocess.PIPE) as proc:
        assert_same(obj, persist.load(proc.stdout))


def test_compress_argument_forms(tmp_path: Path) -> None:
    data = {"x": np.zeros(10000)}
    starts = [
        (3, b"\x78"),
        (True, b"\x78"),
        (("zlib", 9), b"\x78"),
        ("gzip", b"\x1f\x8b"),
        (("lz4",), b"\x04\x22"),
        (0, MAGIC),
        (False, MAGIC),
        (("bz2", 1), b"BZh"),
    ]
    for compress, magic in starts:
        path = tmp_path / "f.gz"  # an explicit compress always beats the extension
        persist.dump(data, path, compress=compress)
        assert path.read_bytes().startswith(magic), compress
        assert_same(data, persist.load(path))
    for bad in ["rar", ("zlib", 10), ("bz2", 0), -1, ("gzip", 1, 2), 1.5]:
        with pytest.raises(ValueError):
            persist.dump(data, tmp_path / "g", compress=bad)


def test_magic_detection_ignores_misleading_extension(tmp_path: Path) -> None:
    obj = _ledger(300)
    for codec in CODEC_NAMES:
        wrong = "zst" if codec != "zstd" else "gz"
        path = tmp_path / f"{codec}-really.{wrong}"
        persist.dump(obj, path, compress=codec)
        assert_same(obj, persist.load(path))


def test_missing_optional_package_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` fail
    with pytest.raises(ImportError, match="pip install zstandard"):
        persist.dump([1], tmp_path / "f.zst")


# ---------------------------------------------------------------- command-line interop

_CLI = {  # codec: (decompress argv, compress argv)
    "gzip": (["gzip", "-d", "-c"], ["gzip", "-c"]),
    "bz2": (["bzip2", "-d", "-c"], ["bzip2", "-c"]),
    "xz": (["xz", "-d", "-c"], ["xz", "-c"]),
    "lzma": (["xz", "--format=lzma", "-d", "-c"], ["xz", "--format=lzma", "-c"]),
    "zstd": (["zstd", "-q", "-d", "-c"], ["zstd", "-q", "-c"]),
    "lz4": (["lz4", "-d", "-c"], ["lz4", "-c"]),
}


@pytest.mark.parametrize("codec", sorted(_CLI))
def test_files_are_standard_streams_for_cli_tools(codec: str, tmp_path: Path) -> None:
    unzip, zip_ = _CLI[codec]
    if shutil.which(unzip[0]) is None:
        pytest.skip(f"{unzip[0]} not installed")
    obj = _ledger(500)
    persist.dump(obj, tmp_path / "plain", compress=None)
    persist.dump(obj, tmp_path / "packed", compress=codec)
    out = subprocess.run([*unzip, str(tmp_path / "packed")], capture_output=True, check=True)
    assert out.stdout == (tmp_path / "plain").read_bytes()
    packed = subprocess.run([*zip_, str(tmp_path / "plain")], capture_output=True, check=True)
    (tmp_path / "cli.any").write_bytes(packed.stdout)
    assert_same(obj, persist.load(tmp_path / "cli.any"))


def test_zlib_files_are_raw_zlib_streams(tmp_path: Path) -> None:
    persist.dump([1, "a"], tmp_path / "plain")
    persist.dump([1, "a"], tmp_path / "f.z")
    assert zlib.decompress((tmp_path / "f.z").read_bytes()) == (tmp_path / "plain").read_bytes()


# ---------------------------------------------------------------- mmap


def test_mmap_modes(tmp_path: Path) -> None:
    arr = np.arange(1000, dtype=np.float64).reshape(100, 10)
    obj = {"a": arr, "f": np.asfortranarray(arr), "s": np.array([b"x", b"yz"]), "n": [1, 2]}
    path = tmp_path / "m.bin"
    persist.dump(obj, path)
    ro = persist.load(path, mmap_mode="r")
    assert isinstance(ro["a"], np.memmap) and not ro["a"].flags.writeable
    assert ro["a"].ctypes.data % 64 == 0 and ro["f"].flags.f_contiguous
    assert_same(obj["s"], np.asarray(ro["s"]))
    np.testing.assert_array_equal(ro["f"], arr)
    del ro
    cow = persist.load(path, mmap_mode="c")
    cow["a"][0, 0] = -1.0
    del cow
    assert persist.load(path)["a"][0, 0] == 0.0  # copy-on-write never reaches the file
    rw = persist.load(path, mmap_mode="r+")
    rw["a"][0, 0] = -1.0
    rw["a"].flush()
    del rw
    assert persist.load(path)["a"][0, 0] == -1.0


def test_mmap_rejects_remote_and_warns_for_compressed(tmp_path: Path) -> None:
    url = f"memory://persist-{uuid.uuid4().hex}/m.bin"
    persist.dump({"a": np.arange(3)}, url)
    with pytest.raises(PersistError, match="local file"):
        persist.load(url, mmap_mode="r")
    with pytest.raises(PersistError, match="local file"):
        persist.load(io.BytesIO(fsspec.filesystem("memory").cat(url)), mmap_mode="r")
    with pytest.raises(ValueError):
        persist.load(url, mmap_mode="w+")
    persist.dump({"a": np.arange(3)}, tmp_path / "m.gz")
    with pytest.warns(UserWarning, match="memory-mapped"):
        out = persist.load(tmp_path / "m.gz", mmap_mode="r")
    assert type(out["a"]) is np.ndarray


# ---------------------------------------------------------------- dump errors and atomicity


class _Custom:
    pass


@pytest.mark.parametrize(
    "bad",
    [
        _Custom(),
        np.array([object()]),
        np.zeros(2, dtype=[("a", "<i4")]),
        {1, _Custom()},
        np.ma.masked_array([1, 2]),
        lambda: 1,
        type("S", (str,), {})("sub"),
    ],
)
def test_dump_refuses_unsupported_types_without_touching_target(bad: object, tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        persist.dump({"x": [bad]}, path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["t.bin"]


def test_dump_refuses_cycles_and_deep_nesting(tmp_path: Path) -> None:
    cyclic: list = [1]
    cyclic.append(cyclic)
    deep: list = []
    for _ in range(_tree.MAX_DEPTH + 1):
        deep = [deep]
    for bad in (cyclic, deep):
        with pytest.raises(ValueError):
            persist.dump(bad, tmp_path / "t.bin")
    shared = [1, 2]
    assert roundtrip([shared, shared]) == [[1, 2], [1, 2]]  # shared, not cyclic: fine


def test_failed_local_write_leaves_old_file_and_no_partial(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "t.gz"
    persist.dump({"v": 1}, path)
    before = path.read_bytes()

    def failing_chunks(arr: np.ndarray):  # fault injection: the disk "fills up" mid-array
        yield memoryview(arr.view(np.uint8).reshape(-1)[:100])
        raise OSError("No space left on device")

    monkeypatch.setattr("convert.persist._stream._array_chunks", failing_chunks)
    with pytest.raises(OSError, match="No space"):
        persist.dump({"v": np.arange(1000)}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["t.gz"]


# ---------------------------------------------------------------- hostile input


def craft(
    doc: object,
    body: bytes = b"",
    *,
    version: int = 1,
    header_len: int | None = None,
    crc: int | None = None,
    raw_header: bytes | None = None,
) -> bytes:
    """A hand-built payload: preamble, header (JSON of doc unless raw_header), padding, body."""
    header = raw_header if raw_header is not None else json.dumps(doc).encode()
    pre = PREAMBLE.pack(
        MAGIC, version, 0, zlib.crc32(header) if crc is None else crc, len(header) if header_len is None else header_len
    )
    return pre + header + bytes(data_start(len(header)) - len(pre) - len(header)) + body


def _doc(root: object, blocks: list | None = None, data_size: int = 0) -> dict:
    return {"root": root, "blocks": blocks or [], "data_size": data_size}


def _block(
    dtype: str = "<f8", shape: object = (4,), nbytes: int | None = None, offset: int = 0, order: str = "C"
) -> dict:
    size = np.dtype(dtype).itemsize * int(np.prod(shape)) if nbytes is None else nbytes
    return {"dtype": dtype, "shape": list(shape), "order": order, "offset": offset, "nbytes": size}


_ARR = {"t": "ndarray", "b": 0}
HOSTILE = {
    "empty file": b"",
    "random bytes": bytes(range(7, 200)),
    "bad version": craft(_doc(1), version=2),
    "bad crc": craft(_doc(1), crc=123),
    "header longer than file": craft(_doc(1), header_len=10**6),
    "header over the cap": craft(_doc(1), header_len=1 << 40),
    "not json": craft(None, raw_header=b"{root: pickle}"),
    "NaN literal": craft(None, raw_header=b'{"root": NaN, "blocks": [], "data_size": 0}'),
    "not utf-8": craft(None, raw_header=b'{"root": "\xff", "blocks": [], "data_size": 0}'),
    "deep json": craft(None, raw_header=b"[" * 100000),
    "huge int literal": craft(None, raw_header=b'{"root": 1' + b"0" * 6000 + b', "blocks": [], "data_size": 0}'),
    "unknown type tag": craft(_doc({"t": "pickle", "v": "gASVAAAA"})),
    "import-like tag": craft(_doc({"t": "__reduce__", "v": ["os.system", ["touch x"]]})),
    "extra node field": craft(_doc({"t": "tuple", "v": [], "cls": "os.system"})),
    "object dtype": craft(_doc(_ARR, [_block("|O", (1,), nbytes=8)], 8), bytes(8)),
    "void dtype": craft(_doc(_ARR, [_block("|V8", (1,))], 8), bytes(8)),
    "structured dtype": craft(_doc(_ARR, [dict(_block(), dtype="<f8,<i4")], 32), bytes(32)),
    "negative shape": craft(_doc(_ARR, [_block(shape=(-4,), nbytes=-32)], 0)),
    "overflowing shape": craft(_doc(_ARR, [_block(shape=(2**40, 2**40), nbytes=2**83)], 2**83)),
    "float shape": craft(_doc(_ARR, [_block(shape=(1.5,), nbytes=8)], 8), bytes(8)),
    "too many dims": craft(_doc(_ARR, [_block(shape=(1,) * 40)], 8), bytes(8)),
    "nbytes lies": craft(_doc(_ARR, [_block(nbytes=8)], 8), bytes(8)),
    "bad offset": craft(_doc(_ARR, [_block(offset=64)], 96), bytes(96)),
    "size beyond file": craft(_doc(_ARR, [_block(shape=(10**8,))], 8 * 10**8), bytes(64)),
    "truncated body": craft(_doc(_ARR, [_block()], 32), bytes(16)),
    "trailing garbage": craft(_doc(_ARR, [_block()], 32), bytes(32) + b"extra"),
    "nonzero padding": craft(
        _doc(_ARR, [_block("|u1", (1,)), _block(offset=64)], 96), b"\x01" + b"\xff" * 63 + bytes(32)
    ),
    "block used twice": craft(_doc([_ARR, _ARR], [_block()], 32), bytes(32)),
    "unused block": craft(_doc(1, [_block()], 32), bytes(32)),
    "block index out of range": craft(_doc({"t": "ndarray", "b": 5})),
    "unhashable dict key": craft(_doc({"t": "dict", "k": [[1]], "v": [1]})),
    "duplicate dict keys": craft(_doc({"t": "dict", "k": [1, 1], "v": [1, 2]})),
    "bad big int": craft(_doc({"t": "int", "v": "__import__('os')"})),
    "bad special float": craft(_doc({"t": "float", "v": "1e999999"})),
    "bad base64": craft(_doc({"t": "bytes", "v": "!!notbase64"})),
    "scalar size mismatch": craft(_doc({"t": "npscalar", "dtype": "<f8", "v": "AAAA"})),
    "object scalar": craft(_doc({"t": "npscalar", "dtype": "|O", "v": "AAAAAAAAAAA="})),
    "str list count lies": craft(_doc({"t": "list", "of": "str", "n": 5, "b": 0}, [_block("|u1", (3,))], 3), b"a\x00b"),
    "list block wrong dtype": craft(_doc({"t": "list", "of": "int", "b": 0}, [_block()], 32), bytes(32)),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("wrap", ["path", "gzip", "zstd"])
def test_hostile_input_raises_persist_error(name: str, wrap: str, tmp_path: Path) -> None:
    data = HOSTILE[name]
    if wrap == "gzip":
        data = gzip.compress(data)
    elif wrap == "zstd":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path = tmp_path / "hostile.bin"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(PersistError):
            persist.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20  # lying sizes never turn into large allocations


@pytest.mark.parametrize("compress", [None, "gzip", "xz"])
def test_pickle_payloads_are_never_executed(compress: str | None, tmp_path: Path) -> None:
    import joblib

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payloads = [pickle.dumps(Exploit(), protocol=p) for p in (0, 2, 5)]
    joblib.dump(Exploit(), tmp_path / "j.pkl", compress=compress and (compress, 3))
    payloads.append((tmp_path / "j.pkl").read_bytes())
    for payload in payloads[:-1]:
        if compress == "gzip":
            payload = gzip.compress(payload)
        elif compress == "xz":
            payload = lzma.compress(payload)
        with pytest.raises(PersistError):
            persist.load(io.BytesIO(payload))
    with pytest.raises(PersistError):
        persist.load(tmp_path / "j.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_truncated_and_corrupted_files_raise_persist_error(codec: str) -> None:
    buf = io.BytesIO()
    persist.dump(_ledger(500), buf, compress=codec)
    data = buf.getvalue()
    for cut in (1, 10, len(data) // 3, len(data) // 2, len(data) - 1):
        with pytest.raises(PersistError):
            persist.load(io.BytesIO(data[:cut]))
    if codec in ("none", "lzma"):  # no whole-stream checksum to catch a flipped body byte
        return
    rng = np.random.default_rng(1)
    for pos in rng.integers(20, len(data) - 8, 5):
        bad = bytearray(data)
        bad[pos] ^= 0x55
        with pytest.raises(PersistError):
            persist.load(io.BytesIO(bytes(bad)))


_SAMPLES: dict[str, bytes] = {}


def _sample(codec: str) -> bytes:
    if codec not in _SAMPLES:
        buf = io.BytesIO()
        obj = {
            "k": [f"key{i}" for i in range(300)],
            "a": np.arange(50, dtype="<i4"),
            "t": (1, "x"),
            "b": b"x" * 5000,
            "big": 2**70,
            "f": [0.5, math.nan],
        }
        persist.dump(obj, buf, compress=codec)
        _SAMPLES[codec] = buf.getvalue()
    return _SAMPLES[codec]


@pytest.mark.parametrize("codec", CODEC_NAMES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_mutated_files_load_or_raise_persist_error_only(codec: str, data: st.DataObject) -> None:
    blob = bytearray(_sample(codec))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "zero"]))
        if action == "flip":
            blob[pos] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del blob[pos:]
            if not blob:
                break
        elif action == "insert":
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            blob[pos : pos + 8] = bytes(len(blob[pos : pos + 8]))
    try:
        persist.load(io.BytesIO(bytes(blob)))
    except PersistError:
        pass  # anything else (TypeError, OSError, zlib.error, ...) fails the test


@pytest.mark.parametrize("compress", ["gzip", "bz2", "xz", "zstd", "lz4", "none"])
def test_lying_size_in_stream_is_bounded_by_real_content(compress: str) -> None:
    """An 8 GiB array claimed by a ~1 KiB stream: fails at end of data, allocating little."""
    fake = craft(_doc(_ARR, [_block("<u8", (1 << 30,))], 8 << 30), bytes(1024))
    codec = persist.CODECS[compress]  # the same compressors dump() uses
    if codec.compressor:
        c = codec.compressor(codec.default_level)
        fake = c.compress(fake) + c.flush()
    with subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        proc.stdin.write(fake)  # an unseekable pipe: no file size to check against
        proc.stdin.close()
        tracemalloc.start()
        try:
            with pytest.raises(PersistError, match="truncated"):
                persist.load(proc.stdout)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 40 << 20


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize("compress", [None, "lz4", pytest.param(("zlib", 1), marks=pytest.mark.slow)])
def test_peak_memory_stays_flat_for_200mb_array(compress: object, tmp_path: Path) -> None:
    n = 200 * 2**20 // 8
    tracemalloc.start()
    try:
        arr = np.arange(n, dtype=np.float64)
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        persist.dump({"a": arr, "meta": [1, 2]}, tmp_path / "big", compress=compress)
        dump_extra = tracemalloc.get_traced_memory()[1] - base
        del arr
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = persist.load(tmp_path / "big")
        load_extra = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert out["a"][-1] == n - 1 and out["a"].nbytes == n * 8
    assert dump_extra < 24 << 20, dump_extra
    assert load_extra < n * 8 + (24 << 20), load_extra - n * 8


@pytest.mark.s3
def test_s3_roundtrip_and_aborted_upload_leaves_old_object(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    opts = s3.storage_options()
    obj = _ledger(300)
    url = "s3://test-bucket/meta/ledger.zst"
    persist.dump(obj, url, storage_options=opts)
    assert s3.filesystem().cat(url)[:4] == b"\x28\xb5\x2f\xfd"
    assert_same(obj, persist.load(url, storage_options=opts))

    def failing_chunks(arr: np.ndarray):
        yield memoryview(arr.view(np.uint8).reshape(-1)[:100])
        raise OSError("connection reset")

    monkeypatch.setattr("convert.persist._stream._array_chunks", failing_chunks)
    with pytest.raises(OSError):
        persist.dump({"new": np.arange(10)}, url, storage_options=opts)
    with pytest.raises(OSError):
        persist.dump({"new": np.arange(10)}, "s3://test-bucket/meta/fresh.gz", storage_options=opts)
    monkeypatch.undo()
    fs = s3.filesystem()
    fs.invalidate_cache()
    assert not fs.exists("s3://test-bucket/meta/fresh.gz")
    assert_same(obj, persist.load(url, storage_options=opts))


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_freak_compression_ratio_loads_through_growing_buffer(compress: str, tmp_path: Path) -> None:
    """48 MiB of zeros compress >64x, beyond the up-front allocation budget: the block is read
    into a buffer grown as data arrives, and still costs no more than its own size."""
    arr = np.zeros((3, 2 * 2**20), dtype=np.float64, order="F")
    persist.dump({"z": arr}, tmp_path / "z", compress=compress)
    assert (tmp_path / "z").stat().st_size * 64 < arr.nbytes
    tracemalloc.start()
    try:
        out = persist.load(tmp_path / "z")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_same(arr, out["z"])
    assert peak < arr.nbytes + (8 << 20)
