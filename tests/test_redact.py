"""Credentials at rest and on screen: the one redaction rule (convert.redact) as a hostile URL list and
config meet it - userinfo without a path, unencoded '#', '/', '?' in a password, token fragments,
URLs with userinfo inside storage_options values - checked in every file of the output and in what
`plan`, `run`, `inspect` and `report` print."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from convert import persist
from convert.redact import redact_options, redact_text, redact_url
from convert.testing import images as gen
from convert.testing.http import StaticServer

SECRETS = ("s3cretA", "s3cretB", "s3cretC", "s3cretD", "s3cretE", "s3cretF", "s3cretG")


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://bob:s3cretA@host", "http://host"),
        ("http://bob:pa#s3cretB@host/x.jpg", "http://host/x.jpg"),
        ("http://bob:pa/s3cretD@host/x.jpg", "http://host/x.jpg"),
        ("http://bob:pa?s3cretE@host/x.jpg?a=1&token=s3cretF", "http://host/x.jpg?a=1&token=***"),
        ("http://bob:12/s3cretE@host/x.jpg", "http://host/x.jpg"),
        ("https://host/a.jpg#access_token=s3cretC&state=1", "https://host/a.jpg#access_token=***&state=1"),
        ("https://medium.com/@user/post.jpg", "https://medium.com/@user/post.jpg"),  # '@' in a path stays
        ("http://127.0.0.1:8081\\@example.com/img.png", "http://127.0.0.1:8081\\@example.com/img.png"),  # host kept
        ("/data/img#1.jpg", "/data/img#1.jpg"),
    ],
)
def test_redact_url_drops_userinfo_and_secret_values(url, shown):
    assert redact_url(url) == shown
    assert redact_text(f"GET {url} failed") == f"GET {shown} failed"


def test_option_values_lose_credentials_at_any_depth():
    opts = {
        "client_kwargs": {"endpoint_url": "http://ak:s3cretA@minio:9000"},
        "token": "s3cretB",
        "secret": None,
        "list": ["https://u:s3cretC@h/p"],
    }
    assert redact_options(opts) == {
        "client_kwargs": {"endpoint_url": "http://minio:9000"},
        "token": "***",
        "secret": None,
        "list": ["https://h/p"],
    }


def _texts(out: Path) -> str:
    """Everything the output holds, decoded: JSON, persist columns (records, index, plan), HDF5."""
    parts = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        if path.suffix == ".h5":
            with h5py.File(path, "r") as f:
                parts.append(repr(dict(f.attrs)))
                f.visititems(lambda name, obj: parts.append(repr(obj[()] if isinstance(obj, h5py.Dataset) else name)))
        elif path.name.endswith(".gz"):
            parts.append(repr(persist.load(str(path))))
        else:
            parts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(parts)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convert", *args], capture_output=True, text=True, timeout=300)


def test_no_credential_reaches_the_output_or_the_terminal(tmp_path):
    root = tmp_path / "www"
    paths = gen.write_image_folder(root, {"x": 3}, size=(20, 20))
    with StaticServer(root=root) as server:
        host = server.url.split("://", 1)[1]
        lst = tmp_path / "urls.txt"
        lst.write_text(
            f"http://bob:s3cretA@{host}\n"
            f"http://bob:pa#s3cretB@{host}/x/{paths[0].name}\n"
            f"{server.url}/x/{paths[1].name}#access_token=s3cretC\n"
            f"http://bob:pa/s3cretD@{host}/x/{paths[2].name}\n"
        )
        out = tmp_path / "out"
        opts = [
            "--set",
            "source.storage_options.client_kwargs.endpoint_url=http://ak:s3cretE@127.0.0.1:9/",
            "--set",
            "cluster.kind=threads",
            "--size",
            "16",
        ]
        planned = cli("plan", "--source", str(lst), *opts)
        assert planned.returncode == 0, planned.stderr
        done = cli("run", "--source", str(lst), "--output", str(out), *opts)
        assert done.returncode == 0, done.stderr
        shown = [planned.stdout + planned.stderr, done.stdout + done.stderr]
        for args in (
            ("inspect", str(out)),
            ("inspect", "--json", str(out)),
            ("inspect", "--failures", str(out)),
            ("report", "--html", str(tmp_path / "r.html"), str(out)),
        ):
            result = cli(*args)
            assert result.returncode == 0, result.stderr
            shown.append(result.stdout + result.stderr)
    shown.append((tmp_path / "r.html").read_text())
    stored = _texts(out)
    assert "000000-" in stored and "access_token=***" in stored  # the rows are there, cleaned
    for secret in SECRETS[:5]:
        assert secret not in stored, f"{secret} stored in the output"
        for text in shown:
            assert secret not in text, f"{secret} shown: {text[:2000]}"


def test_inspect_cleans_an_older_manifest_that_still_holds_credentials(tmp_path):
    out = tmp_path / "out"
    src = tmp_path / "src"
    gen.write_image_folder(src, {"a": 2}, size=(20, 20))
    assert cli("run", "--source", str(src), "--output", str(out), "--set", "cluster.kind=threads").returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config"]["output"]["storage_options"] = {
        "client_kwargs": {"endpoint_url": "http://ak:s3cretF@h:9/"},
        "key": "s3cretG",
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    for args in (("inspect", str(out)), ("inspect", "--json", str(out))):
        result = cli(*args)
        assert result.returncode == 0 and "http://h:9/" in result.stdout, result.stdout + result.stderr
        assert "s3cretF" not in result.stdout + result.stderr and "s3cretG" not in result.stdout + result.stderr
