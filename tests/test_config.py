"""Config: YAML + overrides validated once, one-line errors naming the key and the fix."""

from __future__ import annotations

import pytest

from convert.config import ConfigError, load_config, parse_override


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "source: {uri: a}\noutput: {uri: b, format: lmdb}\nimage: {size: 32}\n"))
    assert cfg.output.format == "lmdb"
    assert cfg.image.size == (32, 32)
    assert cfg.shard.size == 1000


def test_size_height_width_order(tmp_path):
    cfg = load_config(None, {"source.uri": "a", "output.uri": "b", "image.size": [64, 48]})
    assert cfg.image.size == (64, 48)


def test_unknown_key_names_key_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "source: {uri: a}\noutput: {uri: b}\nimage: {sise: 3}\n"))
    msg = str(err.value)
    assert "image.sise" in msg and "size" in msg and "\n" not in msg


def test_bad_value_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, {"source.uri": "a", "output.uri": "b", "output.format": "tfrecord"})
    assert "output.format" in str(err.value) and "'hdf5'" in str(err.value) and "'lmdb'" in str(err.value)


def test_missing_source_says_how_to_give_it():
    with pytest.raises(ConfigError, match="source.*required"):
        load_config(None, {"output.uri": "b"})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "source: [unclosed\n"))


def test_env_interpolation_and_missing_var(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVERT_TEST_BUCKET", "mybucket")
    cfg = load_config(None, {"source.uri": "s3://${CONVERT_TEST_BUCKET}/x", "output.uri": "b"})
    assert cfg.source.uri == "s3://mybucket/x"
    with pytest.raises(ConfigError, match="CONVERT_TEST_MISSING"):
        load_config(None, {"source.uri": "${CONVERT_TEST_MISSING}", "output.uri": "b"})


def test_override_parsing():
    assert parse_override("image.size=[64, 48]") == ("image.size", [64, 48])
    assert parse_override("fetch.timeout=2.5") == ("fetch.timeout", 2.5)
    with pytest.raises(ConfigError):
        parse_override("image.size")


def test_redacted_hides_secrets():
    cfg = load_config(
        None,
        {
            "source.uri": "a",
            "output.uri": "b",
            "output.storage_options": {"key": "AKIA", "secret": "s3cr3t", "client_kwargs": {"region_name": "x"}},
        },
    )
    red = cfg.redacted()
    assert "s3cr3t" not in str(red) and "AKIA" not in str(red)
    assert red["output"]["storage_options"]["client_kwargs"] == {"region_name": "x"}


def test_config_is_frozen():
    cfg = load_config(None, {"source.uri": "a", "output.uri": "b"})
    with pytest.raises(Exception):
        cfg.image.size = (1, 1)
