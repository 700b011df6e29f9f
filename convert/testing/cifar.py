"""Write CIFAR-10/100 "python version" batch files from numpy data, for tests and demos.

By default the pickles are byte-for-byte in the style of the originals (protocol 2, written by
Python 2: byte strings as STRING opcodes, arrays via numpy.core.multiarray._reconstruct), so readers
are tested against what users download. `python2=False` writes what Python 3's pickle emits instead.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .images import photo_like

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _Python2Pickler(pickle._Pickler):  # the pure-Python pickler lets us swap single opcode writers
    """Protocol-2 pickler that writes bytes as Python 2 `str` and NumPy globals under numpy.core.

    No library writes Python-2-flavoured pickles, so these two writers are hand-made.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = str(obj.__module__).replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode("ascii"))
        self.memoize(obj)


def _dump(obj: dict[bytes, Any], path: Path, python2: bool) -> None:
    buf = io.BytesIO()
    if python2:
        _Python2Pickler(buf, protocol=2).dump(obj)
    else:
        pickle.dump(obj, buf, protocol=2)
    path.write_bytes(buf.getvalue())


def to_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) uint8 HWC images -> (N, 3072) rows of R, G, B planes (the CIFAR layout)."""
    images = np.asarray(images, dtype=np.uint8)
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ValueError(f"expected (N, 32, 32, 3) uint8 images, got {images.shape}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def sample_images(count: int, seed: int = 0) -> np.ndarray:
    """`count` photo-like 32x32 RGB images, deterministic from `seed`."""
    images = [np.asarray(photo_like(32, 32, seed + i)) for i in range(count)]
    return np.stack(images) if images else np.zeros((0, 32, 32, 3), np.uint8)


def write_batch(
    path: str | Path,
    images: np.ndarray,
    labels: Sequence[int],
    *,
    coarse_labels: Sequence[int] | None = None,
    batch_label: str = "training batch 1 of 1",
    python2: bool = True,
) -> Path:
    """Write one batch; CIFAR-100 style (fine_labels/coarse_labels) when coarse_labels is given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch: dict[bytes, Any] = {
        b"batch_label": batch_label.encode(),
        b"filenames": [f"{path.name}_{i:05d}.png".encode() for i in range(len(images))],
        b"data": to_rows(images),
    }
    if coarse_labels is None:
        batch[b"labels"] = [int(v) for v in labels]
    else:
        batch[b"fine_labels"] = [int(v) for v in labels]
        batch[b"coarse_labels"] = [int(v) for v in coarse_labels]
    _dump(batch, path, python2)
    return path


def write_cifar10(
    root: str | Path, per_batch: int = 8, batches: int = 5, test: int = 8, seed: int = 0, python2: bool = True
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """root/cifar-10-batches-py/{data_batch_1..N, test_batch, batches.meta}; returns {batch: (images, labels)}."""
    folder = Path(root) / "cifar-10-batches-py"
    rng = np.random.default_rng(seed)
    written: dict[str, tuple[np.ndarray, list[int]]] = {}
    names = [f"data_batch_{i}" for i in range(1, batches + 1)] + ["test_batch"]
    for j, name in enumerate(names):
        n = test if name == "test_batch" else per_batch
        images = sample_images(n, seed=seed + 1000 * j)
        labels = rng.integers(0, 10, n).tolist()
        write_batch(folder / name, images, labels, batch_label=f"{name} of cifar-10", python2=python2)
        written[name] = (images, labels)
    meta = {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    _dump(meta, folder / "batches.meta", python2)
    return written


def write_cifar100(
    root: str | Path, train: int = 12, test: int = 6, seed: int = 0, python2: bool = True
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """root/cifar-100-python/{train, test, meta}; returns {batch: (images, fine labels)}."""
    folder = Path(root) / "cifar-100-python"
    rng = np.random.default_rng(seed)
    written: dict[str, tuple[np.ndarray, list[int]]] = {}
    for j, (name, n) in enumerate((("train", train), ("test", test))):
        images = sample_images(n, seed=seed + 1000 * j)
        fine = rng.integers(0, 100, n).tolist()
        coarse = [f // 5 for f in fine]
        write_batch(folder / name, images, fine, coarse_labels=coarse, batch_label=name, python2=python2)
        written[name] = (images, fine)
    meta = {
        b"fine_label_names": [f"fine_{i:02d}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)],
    }
    _dump(meta, folder / "meta", python2)
    return written
