"""The plain install is the fast, complete product (issue 21 item 1): which fetch backend and decoder a
default config runs, what the install declares, and one-line errors for optional storage backends."""

from __future__ import annotations

import os
import subprocess
import sys
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
    from convert.fetch import policy

    monkeypatch.setattr(policy, "CURL_INSTALLED", False)  # what fetch/policy.py reads at import without pycurl
    assert policy_uses_curl(load_config(None, {"source.uri": "u.txt", "output.uri": "o"})) is False


def test_a_missing_storage_backend_is_one_line_naming_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a))
    assert missing_backend("gs://bucket/out") == "gs:// needs gcsfs: pip install gcsfs"
    assert missing_backend("s3://bucket/out") is None  # s3fs: a default dependency, installed
    assert missing_backend("/local/path") is None and missing_backend("https://host/x") is None


def _without(module: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter where `module` cannot be imported (a platform without its wheel)."""
    prelude = f"import sys; sys.modules[{module!r}] = None\n"  # `import module` now raises ImportError
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env, timeout=60)


def test_without_a_pycurl_wheel_http_falls_back_to_urllib3_with_one_notice() -> None:
    code = (
        "from convert.config import load_config\nfrom convert.task import policy_uses_curl\n"
        "import convert.fetch.curl, convert.fetch.curl_stream\n"
        "print(policy_uses_curl(load_config(None, {'source.uri': 'u.txt', 'output.uri': 'o'})))\n"
    )
    done = _without("pycurl", code)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
    notices = [line for line in done.stderr.splitlines() if "pycurl" in line]
    assert notices == ["convert: pycurl not installed, HTTP via urllib3 (pip install pycurl)"], done.stderr


def test_without_a_simplejpeg_wheel_jpegs_decode_with_pillow_with_one_notice() -> None:
    code = (
        "from convert.config import ImageConfig\nfrom convert.testing.images import jpeg_bytes\n"
        "from convert.transform import SourceFacts, transform\n"
        "for _ in range(3):\n    facts = SourceFacts(); transform(jpeg_bytes(320, 240), ImageConfig(), facts=facts)\n"
        "print(facts.decoder)\n"
    )
    done = _without("simplejpeg", code)
    assert done.returncode == 0 and done.stdout.strip() == "pillow", done.stderr
    notices = [line for line in done.stderr.splitlines() if "simplejpeg" in line]
    assert notices == ["convert: simplejpeg not installed, JPEGs decode with Pillow (pip install simplejpeg)"]
