"""Small converted datasets for tests: an image folder written and converted in-process."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..config import load_config
from ..orchestrate import run
from . import images


def converted_folder(
    tmp: Path,
    name: str,
    classes: dict[str, int],
    fmt: str = "hdf5",
    size: int = 8,
    shard: int = 5,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """`tmp/src-<name>` (an ImageFolder of 24x20 JPEGs, `classes` = items per class, plus `extra`
    files by relative path, e.g. a broken image) converted to `tmp/<name>` (`fmt`, images `size`²,
    `shard` items per shard, the in-process thread executor; item failures are in its ledger)."""
    src = tmp / f"src-{name}"
    shutil.rmtree(src, ignore_errors=True)
    images.write_image_folder(src, classes, size=(24, 20))
    for rel, data in (extra or {}).items():
        (src / rel).write_bytes(data)
    out = tmp / name
    cfg = load_config(
        None,
        {
            "source.uri": str(src),
            "output.uri": str(out),
            "output.format": fmt,
            "image.size": size,
            "shard.size": shard,
            "cluster.kind": "threads",
        },
    )
    code = run(cfg, log=lambda m: None).exit_code()
    if code != 0:
        raise AssertionError(f"converting {src} exited {code}")
    return out
