"""Object tree <-> JSON node tree with array bodies kept out of band.

JSON-native values (str, bool, None, finite float, int within int64) are stored as themselves and
JSON lists are Python lists; every other type is a JSON object tagged {"t": <type>, ...}. Only the
tags listed in Decoder are ever constructed on load: nothing is looked up by name or executed.
Long homogeneous lists (str/int/float/bool) become array blocks, because numpy's C loops and a
NUL-joined UTF-8 blob encode and decode them far faster than a JSON list or pickle.
"""

from __future__ import annotations

import base64
import math
import re
from typing import Any

import numpy as np

from ._errors import PersistError
from ._format import check_dtype

MAX_DEPTH = 64
BLOCK_LIST_MIN = 256  # lists at least this long of one scalar type go out of band
INLINE_BYTES = 4096  # bytes longer than this go out of band
_INT64 = (-(1 << 63), (1 << 63) - 1)
_NATIVE = frozenset({str, int, float, bool, type(None)})
_LIST_DTYPES = {"int": np.dtype("<i8"), "float": np.dtype("<f8"), "bool": np.dtype("|b1")}
_HEX_RE = re.compile(r"-?0x[0-9a-f]+")
_FLOAT_SPECIAL = {"nan", "inf", "-inf"}


def _check_dump_dtype(dtype: np.dtype) -> None:
    """Apply load's dtype rule at dump time, so unloadable files are never written."""
    try:
        check_dtype(dtype.str)
    except PersistError:
        raise TypeError(
            f"convert.persist cannot store numpy dtype {dtype!r} "
            f"(only bool, numeric, datetime and fixed-width string dtypes)"
        ) from None


class Encoder:
    """Turns an object into a JSON-able node tree, collecting arrays to write after the header."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []
        self._path: set[int] = set()  # ids of containers being encoded, to refuse cycles

    def _block(self, arr: np.ndarray) -> int:
        self.arrays.append(arr)
        return len(self.arrays) - 1

    def encode(self, obj: Any, depth: int = 0) -> Any:
        """Encode obj; raises TypeError for unsupported types, ValueError for cycles/depth."""
        t = type(obj)
        if t is str or t is bool or obj is None:
            return obj
        if t is int:
            return obj if _INT64[0] <= obj <= _INT64[1] else {"t": "int", "v": hex(obj)}
        if t is float:
            return obj if math.isfinite(obj) else {"t": "float", "v": repr(obj)}
        if t is np.ndarray or t is np.memmap:
            _check_dump_dtype(obj.dtype)
            return {"t": "ndarray", "b": self._block(obj)}
        if t in (list, tuple, set, frozenset, dict):
            return self._container(obj, depth)
        if t is bytes or t is bytearray:
            if len(obj) > INLINE_BYTES:
                return {"t": t.__name__, "b": self._block(np.frombuffer(obj, np.uint8))}
            return {"t": t.__name__, "v": base64.b64encode(obj).decode("ascii")}
        if t is complex:
            return {"t": "complex", "v": [self.encode(obj.real), self.encode(obj.imag)]}
        if isinstance(obj, np.generic):
            _check_dump_dtype(obj.dtype)
            # numpy reports itemsize 0 for empty str/bytes scalars yet tobytes() gives a NUL
            raw = base64.b64encode(obj.tobytes()[: obj.dtype.itemsize]).decode("ascii")
            return {"t": "npscalar", "dtype": obj.dtype.str, "v": raw}
        raise TypeError(f"convert.persist cannot store {t.__module__}.{t.__qualname__} objects")

    def _container(self, obj: Any, depth: int) -> Any:
        if depth >= MAX_DEPTH:
            raise ValueError(f"object nesting deeper than {MAX_DEPTH} levels")
        if id(obj) in self._path:
            raise ValueError("cannot store self-referencing (cyclic) containers")
        self._path.add(id(obj))
        try:
            t = type(obj)
            if t is list:
                return self._seq(obj, depth)
            if t is dict:
                keys, values = self._seq(list(obj), depth), self._seq(list(obj.values()), depth)
                return {"t": "dict", "k": keys, "v": values}
            return {"t": t.__name__, "v": self._seq(list(obj), depth)}
        finally:
            self._path.discard(id(obj))

    def _seq(self, items: list, depth: int) -> Any:
        """A list of items as a JSON list, or as a block node when long and homogeneous."""
        types = set(map(type, items))
        if len(types) == 1 and len(items) >= BLOCK_LIST_MIN:
            node = self._block_list(items, types.pop())
            if node is not None:
                return node
        elif types <= {str, bool, type(None)}:
            return list(items)
        return [self.encode(x, depth + 1) for x in items]

    def _block_list(self, items: list, t: type) -> dict | None:
        if t is str:
            joined = "\x00".join(items)
            if joined.count("\x00") != len(items) - 1:
                return None  # a string contains NUL: keep it in JSON
            blob = np.frombuffer(joined.encode("utf-8", "surrogatepass"), np.uint8)
            return {"t": "list", "of": "str", "n": len(items), "b": self._block(blob)}
        kind = {int: "int", float: "float", bool: "bool"}.get(t)
        if kind is None:
            return None
        try:
            arr = np.array(items, dtype=_LIST_DTYPES[kind])
        except OverflowError:
            return None  # ints beyond int64: tagged one by one
        return {"t": "list", "of": kind, "b": self._block(arr)}


class Decoder:
    """Rebuilds objects from a validated header's node tree and the loaded array blocks."""

    def __init__(self, blocks: list[np.ndarray]) -> None:
        self._blocks = blocks
        self._used = [False] * len(blocks)

    def decode_root(self, node: Any) -> Any:
        """Decode the whole tree; every block must be used exactly once."""
        obj = self.decode(node, 0)
        if not all(self._used):
            raise PersistError("header lists array blocks that nothing refers to")
        return obj

    def decode(self, node: Any, depth: int) -> Any:
        if depth > 2 * MAX_DEPTH:
            raise PersistError("object tree is nested too deeply")
        t = type(node)
        if t is list:
            return self._list(node, depth)
        if t is not dict:
            return node  # str, int, float, bool, None straight from JSON
        handler = _HANDLERS.get(node.get("t")) if isinstance(node.get("t"), str) else None
        if handler is None:
            raise PersistError(f"header names a type that is not allowed: {node.get('t')!r}")
        fields = handler[0]
        if set(node) - {"t"} not in fields:
            raise PersistError(f"malformed {node['t']!r} node in header")
        return handler[1](self, node, depth)

    def _list(self, node: list, depth: int) -> list:
        if set(map(type, node)) <= _NATIVE:
            return node
        return [self.decode(x, depth + 1) for x in node]

    def _seq(self, node: Any, depth: int) -> list:
        if type(node) is list:
            return self._list(node, depth)
        if type(node) is dict and node.get("t") == "list":
            return self.decode(node, depth)
        raise PersistError("malformed sequence in header")

    def _take(self, index: Any) -> np.ndarray:
        if type(index) is not int or not 0 <= index < len(self._blocks) or self._used[index]:
            raise PersistError(f"invalid or reused block reference {index!r}")
        self._used[index] = True
        block, self._blocks[index] = self._blocks[index], None  # the caller's is the last ref
        return block

    def _byte_block(self, index: Any) -> np.ndarray:
        arr = self._take(index)
        if arr.dtype != np.uint8 or arr.ndim != 1:
            raise PersistError("byte block has the wrong dtype or shape")
        return arr

    def _tuple(self, node: dict, depth: int) -> Any:
        return tuple(self._seq(node["v"], depth + 1))

    def _set(self, node: dict, depth: int) -> Any:
        items = self._seq(node["v"], depth + 1)
        return set(items) if node["t"] == "set" else frozenset(items)

    def _dict(self, node: dict, depth: int) -> dict:
        keys, values = self._seq(node["k"], depth + 1), self._seq(node["v"], depth + 1)
        out = dict(zip(keys, values))
        if len(keys) != len(values) or len(out) != len(keys):
            raise PersistError("dict node has mismatched or duplicate keys")
        return out

    def _block_list(self, node: dict, depth: int) -> list:
        kind = node["of"]
        if kind == "str":
            if type(node.get("n")) is not int:
                raise PersistError("string list node lacks its length")
            text = str(memoryview(self._byte_block(node["b"])), "utf-8", "surrogatepass")
            items = text.split("\x00")  # the UTF-8 blob is already freed, the text is next
            del text
            if len(items) != node["n"]:
                raise PersistError("string list length does not match the header")
            return items
        arr = self._take(node["b"])
        if kind not in _LIST_DTYPES or arr.dtype != _LIST_DTYPES[kind] or arr.ndim != 1:
            raise PersistError(f"list block of kind {kind!r} has the wrong dtype or shape")
        return arr.tolist()

    def _bytes(self, node: dict, depth: int) -> Any:
        if "b" in node:
            raw = self._byte_block(node["b"]).tobytes()
        elif isinstance(node["v"], str):
            raw = base64.b64decode(node["v"], validate=True)
        else:
            raise PersistError("bytes node value is not base64 text")
        return raw if node["t"] == "bytes" else bytearray(raw)

    def _int(self, node: dict, depth: int) -> int:
        if not isinstance(node["v"], str) or not _HEX_RE.fullmatch(node["v"]):
            raise PersistError("malformed big integer in header")
        return int(node["v"], 16)

    def _float(self, node: dict, depth: int) -> float:
        if node["v"] not in _FLOAT_SPECIAL:
            raise PersistError("malformed special float in header")
        return float(node["v"])

    def _complex(self, node: dict, depth: int) -> complex:
        parts = node["v"]
        if type(parts) is not list or len(parts) != 2:
            raise PersistError("malformed complex number in header")
        real, imag = (self.decode(p, depth + 1) for p in parts)
        if type(real) is not float or type(imag) is not float:
            raise PersistError("malformed complex number in header")
        return complex(real, imag)

    def _npscalar(self, node: dict, depth: int) -> Any:
        dtype = check_dtype(node["dtype"])
        if not isinstance(node["v"], str):
            raise PersistError("malformed numpy scalar in header")
        raw = base64.b64decode(node["v"], validate=True)
        if len(raw) != dtype.itemsize:
            raise PersistError("numpy scalar size does not match its dtype")
        return np.frombuffer(raw, dtype)[0] if dtype.itemsize else dtype.type()

    def _ndarray(self, node: dict, depth: int) -> np.ndarray:
        return self._take(node["b"])


_V, _B = frozenset({"v"}), frozenset({"b"})
_HANDLERS: dict[str, tuple[tuple[frozenset, ...], Any]] = {
    "tuple": ((_V,), Decoder._tuple),
    "set": ((_V,), Decoder._set),
    "frozenset": ((_V,), Decoder._set),
    "dict": ((frozenset({"k", "v"}),), Decoder._dict),
    "list": ((frozenset({"of", "b"}), frozenset({"of", "b", "n"})), Decoder._block_list),
    "bytes": ((_V, _B), Decoder._bytes),
    "bytearray": ((_V, _B), Decoder._bytes),
    "int": ((_V,), Decoder._int),
    "float": ((_V,), Decoder._float),
    "complex": ((_V,), Decoder._complex),
    "npscalar": ((frozenset({"dtype", "v"}),), Decoder._npscalar),
    "ndarray": ((_B,), Decoder._ndarray),
}
