"""Issue 21 acceptance: a plain `pip install -e .` is the complete product.

A fresh virtual environment (no system site-packages, so nothing of this test environment leaks in)
gets the project with no extras; then, with that environment's Python and from a folder outside the
checkout, a parquet URL list served over HTTP on 127.0.0.1 and an `s3://` folder on moto's server
both convert to HDF5 with exit code 0, with no further install.

Which fetch backend and JPEG decoder ran is not recorded by a run (neither the manifest nor
`inspect --json` names them, and the ledger keeps only the source's size and format), so each
conversion runs `python -m convert run ...` under SPY, which watches the run from inside its own
process: the fetch mode of each shard (ItemPlan.fetch), the URLs handed to libcurl
(CurlEngine.start) and the decoder of every image (SourceFacts.decoder). Defaults expected:
HTTP(S) list items on libcurl (pycurl), object-store items on the prefetch threads (s3fs), every
JPEG on simplejpeg. The venv must also lack the test-only packages (moto, pytest), so the
conversions prove that the plain install suffices. The HTTP server and moto run in this test
environment, on loopback only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from convert.testing import images as gen
from convert.testing.http import StaticServer

REPO = Path(__file__).resolve().parents[1]
PIP_TIMEOUT = 900.0  # a cold cache downloads dask, bokeh, pyarrow, botocore, ...
RUN_TIMEOUT = 300.0
pytestmark = [pytest.mark.slow, pytest.mark.timeout(PIP_TIMEOUT + 300)]  # the venv's pip outlasts the default 300 s
IMAGES = 5
SIZE = "32"
FALLBACK_NOTICES = ("pycurl not installed", "simplejpeg not installed")  # the one-line notices of a fallback

# `python -m convert ARGS` in this process (runpy, as -m does), with spies on the worker; the
# report is written from an atexit handler, which the CLI's exit (cli_common.exit_now) runs.
SPY = r"""
import atexit, json, os, runpy, sys, threading
import convert.worker as worker
from convert.fetch import curl

lock = threading.Lock()
seen = {"modes": [], "curl_urls": [], "decoders": {}}
fetch_stream, transform, start = worker._fetch_stream, worker.transform, curl.CurlEngine.start

def spy_fetch_stream(refs, task, cols, clock):
    with lock:
        seen["modes"].append(task.items.fetch)
    return fetch_stream(refs, task, cols, clock)

def spy_transform(data, cfg, clock, facts):
    out = transform(data, cfg, clock, facts)
    with lock:
        seen["decoders"][facts.decoder] = seen["decoders"].get(facts.decoder, 0) + 1
    return out

def spy_start(self, t):
    with lock:
        seen["curl_urls"].append(t.shown)
    return start(self, t)

worker._fetch_stream, worker.transform, curl.CurlEngine.start = spy_fetch_stream, spy_transform, spy_start

def report():
    with open(os.environ["SPY_REPORT"], "w") as f:
        json.dump(seen, f)

atexit.register(report)
sys.argv = ["convert", *sys.argv[1:]]
runpy.run_module("convert", run_name="__main__", alter_sys=True)
"""


def venv_env(bindir: Path, **extra: str) -> dict[str, str]:
    """This environment's variables for a venv process: its bin first, nothing pointing back here
    (and no AWS settings but those given)."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("AWS_")}
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1", **extra)
    return env


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python of a new venv holding `pip install -e <repo>` (no extras) and nothing else."""
    root = tmp_path_factory.mktemp("fresh-venv")
    made = subprocess.run(
        [sys.executable, "-m", "venv", str(root / "venv")], capture_output=True, text=True, timeout=300
    )
    assert made.returncode == 0, tail(made.stdout + made.stderr)
    python = root / "venv" / "bin" / "python"
    cmd = [str(python), "-m", "pip", "install", "-q", "-e", str(REPO)]
    try:
        done = subprocess.run(
            cmd, cwd=root, env=venv_env(python.parent), capture_output=True, text=True, timeout=PIP_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        output = b"".join(o if isinstance(o, bytes) else (o or "").encode() for o in (exc.stdout, exc.stderr))
        pytest.fail(f"pip install -e . took over {PIP_TIMEOUT:.0f} s:\n{tail(output.decode(errors='replace'))}")
    assert done.returncode == 0, f"pip install -e . failed ({done.returncode}):\n{tail(done.stdout + done.stderr)}"
    return python


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def in_venv(python: Path, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the venv's Python with `args` from `cwd` (outside the checkout)."""
    return subprocess.run(
        [str(python), *args],
        cwd=cwd,
        env=venv_env(python.parent, **env),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


def spied_run(python: Path, cwd: Path, args: list[str], **env: str) -> dict[str, Any]:
    """`python -m convert run ARGS` in the venv under SPY: asserts exit 0 and no fallback notice,
    returns what ran (modes, curl_urls, decoders)."""
    report = cwd.resolve() / "spy.json"
    done = in_venv(python, ["-c", SPY, "run", *args], cwd, SPY_REPORT=str(report), **env)
    text = done.stdout + done.stderr
    assert done.returncode == 0, f"convert run exited {done.returncode}:\n{tail(text)}"
    assert not [n for n in FALLBACK_NOTICES if n in text], text
    return json.loads(report.read_text())


def inspect(python: Path, cwd: Path, output: str, **env: str) -> dict[str, Any]:
    done = in_venv(python, ["-m", "convert", "inspect", output, "--json"], cwd, **env)
    assert done.returncode == 0, tail(done.stdout + done.stderr)
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def jpegs() -> dict[str, bytes]:
    return {f"img{i}.jpg": gen.jpeg_bytes(160, 120, seed=i) for i in range(IMAGES)}


@pytest.fixture(scope="module")
def served(jpegs: dict[str, bytes]) -> Iterator[list[str]]:
    """The JPEG URLs, served by a real HTTP server on 127.0.0.1 for the module."""
    with StaticServer(files=jpegs) as srv:
        yield [srv.url_for(name) for name in jpegs]


@pytest.fixture(scope="module")
def moto(jpegs: dict[str, bytes]) -> Iterator[Any]:
    """moto's S3 server (a process of this test environment) with the JPEGs under s3://fresh/imgs/{a,b}/."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from convert.testing.s3 import MotoServer

    with MotoServer() as server:
        server.make_bucket("fresh")
        fs = server.filesystem()
        for i, (name, data) in enumerate(sorted(jpegs.items())):
            fs.pipe_file(f"fresh/imgs/{'ab'[i % 2]}/{name}", data)
        yield server


def test_plain_install_has_the_product_and_no_test_packages(fresh_python: Path, tmp_path: Path) -> None:
    probe = (
        "import importlib.util as u, json, convert, convert.decoders as d, convert.fetch.curl as c\n"
        "names = ['moto', 'pytest', 'pycurl', 'simplejpeg', 'pyarrow', 's3fs']\n"
        "print(json.dumps({'file': convert.__file__, 'curl': c.AVAILABLE, 'fast_jpeg': d.FAST_JPEG,"
        " 'found': {n: u.find_spec(n) is not None for n in names}}))"
    )
    done = in_venv(fresh_python, ["-c", probe], tmp_path)
    assert done.returncode == 0, tail(done.stdout + done.stderr)
    facts = json.loads(done.stdout)
    assert Path(facts["file"]).resolve().is_relative_to(REPO)  # the editable checkout, not a copy
    expected = {"moto": False, "pytest": False, "pycurl": True, "simplejpeg": True, "pyarrow": True, "s3fs": True}
    assert facts["found"] == expected
    assert facts["curl"] and facts["fast_jpeg"]


def test_parquet_url_list_converts_on_curl_and_simplejpeg(
    fresh_python: Path, served: list[str], tmp_path: Path
) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"url": served}), tmp_path / "urls.parquet")
    args = ["--source", "urls.parquet", "--output", "out", "--size", SIZE, "--set", "fetch.allow_private_networks=true"]
    seen = spied_run(fresh_python, tmp_path, args + ["--set", "cluster.kind=threads"])  # threads: the spies see it
    assert seen["modes"] == ["curl"]  # fetch.backend: auto -> libcurl
    assert sorted(set(seen["curl_urls"])) == sorted(served)
    assert seen["decoders"] == {"simplejpeg": IMAGES}  # image.decoder: auto -> simplejpeg
    manifest = inspect(fresh_python, tmp_path, "out")
    assert manifest["format"] == "hdf5" and manifest["source_kind"] == "urls"
    assert manifest["totals"]["ok"] == IMAGES and manifest["complete"]
    assert manifest["config"]["fetch"]["backend"] == "auto" and manifest["config"]["image"]["decoder"] == "auto"


def test_s3_source_converts_on_s3fs_and_simplejpeg(fresh_python: Path, moto: Any, tmp_path: Path) -> None:
    from convert.testing.s3 import KEY, REGION, SECRET

    aws = {  # the standard AWS variables only (as tests/test_s3.py's CLI runs); no host config read
        "AWS_ENDPOINT_URL": moto.endpoint_url,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    args = ["--source", "s3://fresh/imgs/", "--output", "out", "--size", SIZE, "--set", "cluster.kind=threads"]
    seen = spied_run(fresh_python, tmp_path, args, **aws)
    assert seen["modes"] == ["threads"] and seen["curl_urls"] == []  # object reads: s3fs on the prefetch threads
    assert seen["decoders"] == {"simplejpeg": IMAGES}
    manifest = inspect(fresh_python, tmp_path, "out", **aws)
    assert manifest["format"] == "hdf5" and manifest["source_kind"] == "folder"
    assert manifest["totals"]["ok"] == IMAGES and manifest["complete"] and manifest["label_names"] == ["a", "b"]
