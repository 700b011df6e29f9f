"""A Hugging Face `datasets.IterableDataset` over a converted dataset, without materializing it.

    from convert.hf import to_iterable_dataset
    hfds = to_iterable_dataset("s3://bucket/out", split="train[:90%]", seed=0)
    for item in hfds: ...                      # {"image": HxWxC uint8, "label": int, "key": str, ...}

Nothing is copied into Arrow: `IterableDataset.from_generator` is given the dataset URI and a list of
index ranges (RANGE_ITEMS items each); each consumer (a DataLoader worker, `hfds.shard(...)`) opens
the dataset itself and reads its ranges with `get_batch`. Items are yielded as the reader returns
them. Needs `pip install datasets`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .dataset import Dataset
from .views import view

RANGE_ITEMS = 4096  # at most this many items per generator range (the unit datasets shards by)
BATCH = 256


def to_iterable_dataset(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    split: str | None = None,
    filter: str | None = None,
    seed: int | None = 0,
    stratify: bool = False,
    decode: bool = True,
) -> Any:
    """A `datasets.IterableDataset` of the items of `uri` (or of its view: split/filter/seed as in
    convert.views); its `n_shards` is the number of index ranges."""
    try:
        import datasets
    except ImportError:
        raise ImportError("convert.hf needs the Hugging Face datasets library: pip install datasets") from None
    ds = view(Dataset(uri, storage_options=storage_options, decode=decode), split, filter, seed, stratify)
    n = len(ds)
    ranges = [(a, min(a + RANGE_ITEMS, n)) for a in range(0, n, RANGE_ITEMS)]
    spec = {
        "uri": uri,
        "storage_options": storage_options or {},
        "decode": decode,
        "split": split,
        "filter": filter,
        "seed": seed,
        "stratify": stratify,
    }
    return datasets.IterableDataset.from_generator(_generate, gen_kwargs={"ranges": ranges, "spec": spec})


def _generate(ranges: list[tuple[int, int]], spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The items of `ranges` (this consumer's share), read in batches."""
    base = Dataset(spec["uri"], storage_options=spec["storage_options"], decode=spec["decode"])
    ds = view(base, spec["split"], spec["filter"], spec["seed"], spec["stratify"])
    for a, b in ranges:
        for s in range(a, b, BATCH):
            yield from ds.get_batch(range(s, min(s + BATCH, b)))
