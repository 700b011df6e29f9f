"""Bad input to the readers is a one-line ValueError naming what was given and what is accepted:
split strings that do not parse, mixes that do not sum sensibly, and an elastic resume from a
checkpoint of another dataset generation (it names both generations)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from convert.formats.base import Sample
from convert.stream import Source, Stream
from convert.testing.formats import write_dataset
from convert.torch import StreamingDataLoader, StreamingDataset
from convert.views import SPLIT_SYNTAX, ViewSpec, parse_split


@pytest.fixture(scope="module")
def uris(tmp_path_factory) -> dict[str, str]:
    rng = np.random.default_rng(0)
    out = {}
    for name, n in (("a", 40), ("b", 24)):
        samples = [Sample(f"{name}{i:04d}", i % 3, rng.integers(0, 256, (4, 4, 3), np.uint8), ()) for i in range(n)]
        out[name] = write_dataset(
            Path(tmp_path_factory.mktemp(name)), "hdf5", samples, 8, image_shape=(4, 4, 3), columns=()
        )
    return out


@pytest.mark.parametrize(
    "text, why",
    [
        ("train[:90", "does not parse"),
        ("train[90%:10%]", "START is past STOP"),
        ("train[50:10]", "START is past STOP"),
        ("train[-5:-10]", "START is past STOP"),
        ("train[:150%]", "does not parse"),
        ("train[-150%:]", "does not parse"),
        ("[abc]", "does not parse"),
        ("train[1.5:]", "does not parse"),
        ("train[::2]", "does not parse"),
    ],
)
def test_a_split_that_does_not_parse(text, why):
    for parse in (parse_split, lambda t: ViewSpec(split=t)):
        with pytest.raises(ValueError) as err:
            parse(text)
        message = str(err.value)
        assert "\n" not in message
        assert repr(text) in message and why in message and SPLIT_SYNTAX in message, message


def test_negative_counts_count_from_the_end_as_documented():
    """'[-5:]' is the last five (tests/test_views.py); a negative count is not an error."""
    split = parse_split("train[-5:]")
    assert split.resolve(100) == (95, 100)
    assert parse_split("val[10%:-20]").resolve(100) == (10, 80)


@pytest.mark.parametrize(
    "spec, epoch_size, message",
    [
        ([("a", {"proportion": -0.1})], None, r"source 0 \(.*a.*\): proportion=-0.1 is negative"),
        ([("a", {"proportion": math.nan})], None, r"source 0 \(.*\): proportion=nan is not a finite number"),
        ([("b", {"repeat": math.inf})], None, r"source 0 \(.*b.*\): repeat=inf is not a finite number"),
        ([("a", {"proportion": 0.0}), ("b", {"proportion": 0.0})], 100, r"source 0 .*: the proportions sum to 0"),
        (
            [("a", {"proportion": 0.7}), ("b", {"proportion": 0.6})],
            None,
            r"source 0 .*: the proportions sum to 1.3 > 1; lower them or set epoch_size",
        ),
        ([("a", {}), ("b", {"proportion": 0.5, "repeat": 2})], None, r"source 1 \(.*b.*\): give one of proportion"),
        ([("a", {"choose": -3})], None, r"source 0 .*: choose=-3 is negative"),
        ([("a", {"repeat": 1}), ("b", {"proportion": 1.0})], None, r"proportions sum to 1 .* set epoch_size"),
    ],
)
def test_a_mix_that_does_not_sum_sensibly(uris, spec, epoch_size, message):
    with pytest.raises(ValueError, match=message) as err:
        Stream([Source(uris[n], **kw) for n, kw in spec], epoch_size=epoch_size)
    assert "\n" not in str(err.value)


def _set_generation(uri: str, generation: int) -> None:
    path = Path(uri) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["generation"] = generation
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("workers_then, workers_now", [(0, 2), (2, 2)], ids=["elastic", "same-layout"])
def test_resume_from_another_generation_names_both(uris, tmp_path, workers_then, workers_now):
    uri = str(tmp_path / "ds")

    shutil.copytree(uris["a"], uri)
    _set_generation(uri, 1)
    loader = StreamingDataLoader(
        StreamingDataset(uri, seed=1, cache_dir=tmp_path / "c1"), batch_size=4, num_workers=workers_then
    )
    for i, _ in enumerate(loader):
        if i == 2:
            break
    state = json.loads(json.dumps(loader.state_dict()))
    assert "generation 1" in state["dataset"]

    _set_generation(uri, 2)
    again = StreamingDataLoader(
        StreamingDataset(uri, seed=1, cache_dir=tmp_path / "c2"), batch_size=4, num_workers=workers_now
    )
    with pytest.raises(ValueError) as err:
        again.load_state_dict(state)
    message = str(err.value)
    assert "\n" not in message
    assert "generation 1" in message and "generation 2" in message, message
    assert message.index("generation 1") < message.index("generation 2"), message  # checkpoint's first

    _set_generation(uri, 1)  # the same generation resumes
    same = StreamingDataLoader(
        StreamingDataset(uri, seed=1, cache_dir=tmp_path / "c3"), batch_size=4, num_workers=workers_now
    )
    same.load_state_dict(state)
    assert sum(len(b["key"]) for b in same) == 40 - 12
