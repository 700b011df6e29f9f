"""The plain install is the fast, complete product (issue 21 item 1): which fetch backend and decoder a
default config runs, what the install declares, and one-line errors for optional storage backends."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from convert.backends import missing_backend
from convert.config import load_config
from convert.fetch import curl
from convert.task import policy_uses_curl
from convert.testing.images import jpeg_bytes
from convert.transform import SourceFacts, transform

ROOT = Path(__file__).resolve().parents[1]


def test_default_install_declares_the_fast_libraries_and_keeps_the_old_extras() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("[")[0] for d in project["dependencies"]}
    assert {"pycurl", "simplejpeg", "pyarrow", "s3fs", "urllib3"} <= names
    assert {"s3", "parquet", "fast-jpeg", "fast-http", "gcs", "azure"} <= set(project["optional-dependencies"])


def test_a_default_config_fetches_http_with_libcurl_and_decodes_jpegs_with_simplejpeg() -> None:
    config = load_config(None, {"source.uri": "urls.txt", "output.uri": "out"})
    assert config.fetch.backend == "auto" and policy_uses_curl(config) is curl.AVAILABLE is True
    facts = SourceFacts()
    pixels = transform(jpeg_bytes(320, 240), config.image, facts=facts)
    assert facts.decoder == "simplejpeg" and pixels.shape == (64, 64, 3)


def test_without_pycurl_auto_falls_back_to_urllib3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(curl, "AVAILABLE", False)
    assert policy_uses_curl(load_config(None, {"source.uri": "u.txt", "output.uri": "o"})) is False


def test_a_missing_storage_backend_is_one_line_naming_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a))
    assert missing_backend("gs://bucket/out") == "gs:// needs gcsfs: pip install gcsfs"
    assert missing_backend("s3://bucket/out") is None  # s3fs: a default dependency, installed
    assert missing_backend("/local/path") is None and missing_backend("https://host/x") is None
