"""S3 end to end against moto's S3 server (a separate process on 127.0.0.1): sources, shards and
manifest on S3, read back equal to the same conversion done locally; faults, resume, secrets.

One LocalCluster is shared through its scheduler address. `auth_moto` is a second moto server
that enforces IAM: a real user, real keys, a policy that can deny single keys.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from convert.lease import clean_debris
from convert.store import open_store
from convert.store import s3 as s3_store
from convert.config import load_config
from convert.dataset import open_dataset
from convert import run
from convert.manifest import ManifestError, read_manifest
from convert.shards import leftovers, verify
from convert.testing import images as gen
from convert.testing.proxy import FaultProxy
from convert.testing.s3 import REGION, MotoServer

pytestmark = [pytest.mark.s3, pytest.mark.cluster]

SIZE = (24, 32)
CLASSES = {"ant": 6, "bee": 7, "cow": 5}
ENV_SECRET = "CONVERT_TEST_OUTPUT_SECRET"
ENV_SECRET_VALUE = f"env-secret-{uuid.uuid4().hex}"
QUIET = {"log": lambda m: None}


# -- servers, cluster, corpus ---------------------------------------------------------------
@pytest.fixture(scope="module")
def auth_moto():
    """moto with IAM enforced: only user 'conv' with its key pair gets in.

    (moto's server mode mis-verifies signatures of requests whose query holds a '/', such as
    prefix listings, so only GET/PUT/HEAD of single objects go to it.)"""
    pytest.importorskip("moto.server")
    import boto3

    old = os.environ.get("INITIAL_NO_AUTH_ACTION_COUNT")
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "4"  # user, key, policy, attach: unauthenticated
    try:
        server = MotoServer().start()
    finally:
        os.environ.pop("INITIAL_NO_AUTH_ACTION_COUNT") if old is None else os.environ.update(
            INITIAL_NO_AUTH_ACTION_COUNT=old
        )
    iam = boto3.client(
        "iam", endpoint_url=server.endpoint_url, region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
    )
    iam.create_user(UserName="conv")
    key = iam.create_access_key(UserName="conv")["AccessKey"]
    doc = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
    arn = iam.create_policy(PolicyName="conv", PolicyDocument=doc)["Policy"]["Arn"]
    iam.attach_user_policy(UserName="conv", PolicyArn=arn)
    server.key, server.secret = key["AccessKeyId"], key["SecretAccessKey"]
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster():
    """LocalCluster whose workers inherit ENV_SECRET (so a ${VAR} reference resolves there)."""
    from distributed import LocalCluster

    os.environ[ENV_SECRET] = ENV_SECRET_VALUE
    try:
        with LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as c:
            yield c
    finally:
        os.environ.pop(ENV_SECRET, None)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    paths = gen.write_image_folder(root, CLASSES, size=(80, 60))
    return root, paths


def make_config(source: Any, output: Any, cluster: Any = None, **overrides: Any):
    base = {
        "source.uri": str(source),
        "output.uri": str(output),
        "image.size": list(SIZE),
        "image.resize": "stretch",
        "image.draft": False,
        "shard.size": 7,
        "fetch.threads": 4,
        "cluster.task_retries": 1,
        "fetch.allow_private_networks": True,
    }
    if cluster is not None:
        base["cluster.scheduler"] = cluster.scheduler_address
    base.update(overrides)
    return load_config(None, base)


@pytest.fixture(scope="module")
def local_hdf5(folder, cluster, tmp_path_factory):
    """The reference: the same folder converted local -> local."""
    out = tmp_path_factory.mktemp("local") / "out"
    assert run(make_config(folder[0], out, cluster), **QUIET).exit_code() == 0
    return open_dataset(str(out))


def upload_tree(fs: Any, root: Path, target: str) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{target}/{path.relative_to(root).as_posix()}", path.read_bytes())


def assert_same(ds: Any, ref: Any) -> None:
    assert len(ds) == len(ref) and ds.label_names == ref.label_names
    for a, b in zip(ds, ref):
        assert (a["key"], a["label"]) == (b["key"], b["label"])
        np.testing.assert_array_equal(a["image"], b["image"])


class RequestFaults(FaultProxy):
    """A FaultProxy that also cuts *uploads*: the first `times` requests whose head matches
    `pattern` are reset after `after` request bytes (the base proxy only cuts responses)."""

    def __init__(self, upstream: str, pattern: bytes, after: int, times: int) -> None:
        super().__init__(upstream)
        self.pattern, self.after, self.times, self.cuts = re.compile(pattern), after, times, 0
        self._budget = threading.Lock()

    def _claim(self, data: bytes) -> bool:
        with self._budget:
            if self.cuts < self.times and self.pattern.search(data):
                self.cuts += 1
                return True
        return False

    def _requests(self, conn: Any) -> None:
        sent = None  # request bytes forwarded since a matching request began
        try:
            while data := conn.client.recv(1 << 16):
                if sent is None and self._claim(data):
                    sent = 0
                if sent is not None and sent + len(data) > self.after:
                    conn.upstream.sendall(data[: self.after - sent])
                    conn.close(reset=True)
                    return
                sent = None if sent is None else sent + len(data)
                conn.upstream.sendall(data)
        except OSError:
            pass
        conn.close()


# -- tests -----------------------------------------------------------------------------------
def test_folder_glob_on_s3_to_hdf5_on_s3_equals_local(s3, folder, cluster, local_hdf5, tmp_path, monkeypatch):
    fs = s3.filesystem()
    upload_tree(fs, folder[0], "test-bucket/in")
    fs.pipe_file("test-bucket/in/README.txt", b"not an image")  # the glob must skip it
    opts = s3.storage_options()
    cfg = make_config(
        "s3://test-bucket/in/*/*.jpg",
        "s3://test-bucket/out/",
        cluster,
        **{"source.storage_options": opts, "output.storage_options": opts},
    )
    summary = run(cfg, **QUIET)
    assert summary.exit_code() == 0 and summary.items_ok == sum(CLASSES.values()) and summary.shards == 3
    assert not any(p.endswith(".partial.h5") for p in fs.find("test-bucket/out"))
    cache = tmp_path / "cache"
    ds = open_dataset("s3://test-bucket/out/", storage_options=opts, cache_dir=str(cache))
    assert_same(ds, local_hdf5)
    np.testing.assert_array_equal(ds[11]["image"], local_hdf5[11]["image"])  # random access
    assert not cache.exists()  # HDF5 is read in blocks, never downloaded whole unless asked
    whole = open_dataset("s3://test-bucket/out/", storage_options=opts, cache_dir=str(cache), download=True)
    assert whole[5]["key"] == local_hdf5[5]["key"] and len(list(cache.glob("*.h5"))) == 1
    # `convert-dataset verify` with the endpoint and keys from the standard AWS variables only
    env = dict(
        os.environ,
        AWS_ENDPOINT_URL=s3.endpoint_url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION=REGION,
    )
    done = cli("verify", "s3://test-bucket/out/", env=env)
    assert done.returncode == 0 and "3/3 shards match the manifest" in done.stdout
    # ... and with nothing but an AWS profile (endpoint and keys from ~/.aws-style files)
    (tmp_path / "config").write_text(f"[profile conv]\nendpoint_url = {s3.endpoint_url}\nregion = {REGION}\n")
    (tmp_path / "credentials").write_text("[conv]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    assert all(c.ok for c in verify(open_store("s3://test-bucket/out/", {"profile": "conv"})))
    shard = "test-bucket/out/shards/shard-00001.h5"
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 1
    fs.pipe_file(shard, bytes(data))
    assert [c.ok for c in verify(open_store("s3://test-bucket/out/", opts))] == [True, False, True]


def test_url_list_on_s3_to_lmdb_on_s3_equals_local(s3, folder, cluster, http_server, tmp_path):
    root, paths = folder
    fs = s3.filesystem()
    upload_tree(fs, root, "test-bucket/img")
    http_server.put("extra.jpg", gen.jpeg_bytes(70, 50, seed=7))
    rows = [
        (f"s3://test-bucket/img/{p.relative_to(root).as_posix()}", p.parent.name, f"{p.parent.name}-{p.stem}")
        for p in paths
    ]
    rows += [("s3://test-bucket/img/missing.jpg", "ant", "missing"), (http_server.url_for("extra.jpg"), "bee", "extra")]
    local_rows = [(str(root / r[0].split("/img/", 1)[1]) if r[0].startswith("s3://") else r[0], *r[1:]) for r in rows]
    (tmp_path / "local.csv").write_text(_csv(local_rows))
    fs.pipe_file("test-bucket/lists/urls.csv", _csv(rows).encode())
    opts = s3.storage_options()
    settings = {"output.format": "lmdb", "shard.size": 8, "fetch.retries": 0}
    local = {**settings, "source.allowed_roots": [str(root)]}  # the list names files outside its own folder
    assert run(make_config(tmp_path / "local.csv", tmp_path / "local", cluster, **local), **QUIET).exit_code() == 0
    cfg = make_config(
        "s3://test-bucket/lists/urls.csv",
        "s3://test-bucket/lmdb",
        cluster,
        **settings,
        **{"source.storage_options": opts, "output.storage_options": opts},
    )
    summary = run(cfg, **QUIET)
    assert summary.by_status == {"ok": len(paths) + 1, "not_found": 1}
    cache = tmp_path / "cache"
    ds = open_dataset("s3://test-bucket/lmdb", storage_options=opts, cache_dir=str(cache))
    assert_same(ds, open_dataset(str(tmp_path / "local")))
    assert ds[len(ds) - 1]["key"] == "extra"
    cached = sorted(cache.glob("*.lmdb"))
    assert [p.name.split(".")[0] for p in cached] == sorted(s["sha256"] for s in ds.manifest["shards"])
    fs.rm("test-bucket/lmdb/shards", recursive=True)  # a second open must not download again
    again = open_dataset("s3://test-bucket/lmdb", storage_options=opts, cache_dir=str(cache))
    assert_same(again, ds)
    fs.pipe_file("test-bucket/lmdb/shards/shard-00000.lmdb", b"tampered")
    first = ds.manifest["shards"][0]["sha256"]
    (cache / f"{first}.lmdb").write_bytes(b"truncated copy")  # a damaged cache entry is fetched again, then refused
    with pytest.raises(ManifestError, match="checksum does not match"):
        open_dataset("s3://test-bucket/lmdb", storage_options=opts, cache_dir=str(cache))[0]


def _csv(rows: list[tuple[str, str, str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["url", "label", "key"])
    w.writerows(rows)
    return buf.getvalue()


def test_upload_cut_mid_body_is_retried_and_killed_run_is_not_trusted(s3, folder, cluster, local_hdf5):
    fs = s3.filesystem()
    upload_tree(fs, folder[0], "test-bucket/in")
    proxy = RequestFaults(s3.endpoint_url, rb"PUT /test-bucket/out/shards/shard-0000[01]\.h5", after=4096, times=2)
    with proxy:
        cfg = make_config(
            "s3://test-bucket/in",
            "s3://test-bucket/out",
            cluster,
            **{"source.storage_options": s3.storage_options(), "output.storage_options": s3.storage_options(proxy.url)},
        )
        summary = run(cfg, **QUIET)
    assert proxy.cuts == 2 and summary.exit_code() == 0 and summary.converted == 3
    out = open_store("s3://test-bucket/out", s3.storage_options())
    assert all(c.ok for c in verify(out)) and leftovers(out) == []
    assert_same(open_dataset(out.uri, out.storage_options), local_hdf5)
    # a job killed after its uploads but before the manifest: readers refuse, a rerun completes
    fs.rm_file("test-bucket/out/manifest.json")
    with pytest.raises(ManifestError, match="rerun"):
        open_dataset(out.uri, out.storage_options)
    cfg = make_config(
        "s3://test-bucket/in",
        out.uri,
        cluster,
        **{"source.storage_options": out.storage_options, "output.storage_options": out.storage_options},
    )
    summary = run(cfg, **QUIET)
    assert (summary.skipped, summary.converted) == (3, 0)
    assert_same(open_dataset(out.uri, out.storage_options), local_hdf5)


class _GraphSpy:
    """Scheduler plugin: serialises every submitted task (what workers receive) for inspection."""

    def __init__(self) -> None:
        self.blobs: list[bytes] = []

    def update_graph(self, scheduler: Any, *, keys: Any, **kwargs: Any) -> None:
        from distributed.protocol.pickle import dumps

        for key in keys:
            ts = scheduler.tasks.get(key)
            if ts is not None and ts.run_spec is not None:
                self.blobs.append(dumps(ts.run_spec) + repr(ts.run_spec).encode())


def test_failure_after_upload_secrets_and_resume(auth_moto, s3, folder, cluster, local_hdf5):
    """Source: a URL list on an IAM-enforcing S3 with a literal secret in the config (workers can
    fetch only if it reached them out of band). Output: S3 with a ${VAR} secret; every PUT of
    shard-00001's record is cut, i.e. the task fails after its shard uploaded. Nothing untrusted
    is listed, no secret leaks into the task graph, logs or outputs, the rerun converts only it."""
    from distributed import Client
    from distributed.diagnostics.plugin import SchedulerPlugin

    src = {
        "key": auth_moto.key,
        "secret": auth_moto.secret,
        "client_kwargs": {"endpoint_url": auth_moto.endpoint_url, "region_name": REGION},
    }
    src_fs, root = _fs(src), folder[0]
    if not src_fs.exists("auth-bucket"):
        src_fs.call_s3("create_bucket", Bucket="auth-bucket")
    upload_tree(src_fs, root, "auth-bucket/img")
    rows = [
        (f"s3://auth-bucket/img/{p.relative_to(root).as_posix()}", p.parent.name, p.relative_to(root).as_posix())
        for p in folder[1]
    ]
    src_fs.pipe_file("auth-bucket/urls.csv", _csv(rows).encode())
    proxy = RequestFaults(s3.endpoint_url, rb"PUT /test-bucket/out/shards/shard-00001\.record\.gz", after=0, times=99)
    proxy.start()
    out_opts = dict(s3.storage_options(proxy.url), secret="${" + ENV_SECRET + "}")
    spy = type("Spy", (_GraphSpy, SchedulerPlugin), {})()
    cluster.scheduler.add_plugin(spy, name="graph-spy")
    lines: list[str] = []
    cfg = make_config(
        "s3://auth-bucket/urls.csv",
        "s3://test-bucket/out",
        cluster,
        **{"source.storage_options": src, "output.storage_options": out_opts},
    )
    try:
        summary = run(cfg, log=lines.append)
        proxy.times = 0  # the fault is over
        first_failed = dict(summary.failed_shards)
        out = open_store("s3://test-bucket/out", s3.storage_options())
        fs = s3.filesystem()
        assert summary.by_status == {"ok": 11, "shard_failed": 7}  # fetched: the secret reached the workers
        assert list(first_failed) == ["shard-00001"] and proxy.cuts >= 2
        assert fs.exists("test-bucket/out/shards/shard-00001.h5")  # uploaded, but never trusted:
        assert [s["name"] for s in read_manifest(out)["shards"]] == ["shard-00000", "shard-00002"]
        assert len(open_dataset(out.uri, out.storage_options)) == len(local_hdf5) - 7
        assert [(x.kind, x.url.rsplit("/", 1)[-1]) for x in leftovers(out)] == [("unlisted", "shard-00001.h5")]
        fs.call_s3("create_multipart_upload", Bucket="test-bucket", Key="out/shards/shard-00002.h5")
        assert [x.kind for x in leftovers(out)] == ["multipart", "unlisted"]
        rerun = run(cfg, log=lines.append)  # resumes: only the failed shard; the stale upload goes
    finally:
        cluster.scheduler.remove_plugin(name="graph-spy")
        proxy.stop()
    assert (rerun.skipped, rerun.converted, rerun.exit_code()) == (2, 1, 0)
    assert leftovers(out) == [] and all(c.ok for c in verify(out))
    assert_same(open_dataset(out.uri, out.storage_options), local_hdf5)
    # the secrets are nowhere: submitted tasks, scheduler and worker logs, messages, stored files
    with Client(cluster.scheduler_address) as client:
        logs = json.dumps([client.get_scheduler_logs(n=1000), client.get_worker_logs(n=1000)])
    assert "Compute Failed" in logs  # the failed attempt was logged (dask logs the task there)
    assert not [p for p in cluster.scheduler.worker_plugins if p.startswith("convert-secrets")]
    stored = b"".join(fs.cat_file(p) for p in fs.find("test-bucket/out") if not p.endswith(".h5"))
    texts = "\n".join(lines + list(first_failed.values())).encode() + logs.encode() + stored
    assert any(b"${secret:" in b for b in spy.blobs) and b"***" in stored  # references only
    for secret in (auth_moto.secret.encode(), ENV_SECRET_VALUE.encode()):
        assert not any(secret in b for b in spy.blobs) and secret not in texts


def _fs(options: dict[str, Any]) -> Any:
    import fsspec

    return fsspec.filesystem("s3", **options)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convert", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env or dict(os.environ),
    )


def test_cli_wrong_credentials_and_missing_bucket_are_one_line(auth_moto, s3, folder, tmp_path):
    wrong = "WRONG-secret-0123456789"
    cases = {
        "wrong-credentials": (
            {
                "uri": "s3://secret-bucket/in",
                "storage_options": {
                    "key": auth_moto.key,
                    "secret": wrong,
                    "client_kwargs": {"endpoint_url": auth_moto.endpoint_url},
                },
            },
            {"uri": str(tmp_path / "out")},
            r"source s3://secret-bucket/in: access to bucket 'secret-bucket' denied",
        ),
        "missing-output-bucket": (
            {"uri": str(folder[0])},
            {"uri": "s3://no-such-bucket/out", "storage_options": s3.storage_options()},
            r"output s3://no-such-bucket/out: bucket 'no-such-bucket' does not exist",
        ),
        "missing-source-bucket": (
            {"uri": "s3://no-such-bucket/in/", "storage_options": s3.storage_options()},
            {"uri": str(tmp_path / "out")},
            r"'s3://no-such-bucket/in/' does not exist",
        ),
    }
    for name, (source, output, expected) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"source": source, "output": output, "cluster": {"workers": 1}}))
        done = cli("run", str(path))
        text = done.stdout + done.stderr
        assert done.returncode == 2, (name, text)
        assert re.search(expected, text), (name, text)
        assert "Traceback" not in text and len(text.strip().splitlines()) == 1, (name, text)
        assert wrong not in text


def test_multipart_upload_is_whole_or_aborted(s3, tmp_path, monkeypatch):
    monkeypatch.setattr(s3_store, "PART_SIZE", 5 * 2**20)  # S3's minimum part: 3 parts for 12 MiB
    blob = os.urandom(12 * 2**20 + 123)
    path = tmp_path / "big.bin"
    path.write_bytes(blob)
    size, digest = len(blob), hashlib.sha256(blob).hexdigest()
    out = open_store("s3://test-bucket/mp", s3.storage_options())
    out.publish(str(path), "shards/big.bin", size, digest)
    fs = s3.filesystem()
    assert fs.cat_file("test-bucket/mp/shards/big.bin") == blob
    assert fs.info("test-bucket/mp/shards/big.bin")["ETag"].endswith('-3"')  # really multipart
    with RequestFaults(s3.endpoint_url, rb"PUT /test-bucket/mp/shards/again\.bin\?[^ ]*partNumber=2", 0, 99) as proxy:
        with pytest.raises(Exception, match="again.bin"):
            open_store(out.uri, s3.storage_options(proxy.url)).publish(str(path), "shards/again.bin", size, digest)
    assert proxy.cuts >= 1 and not fs.exists("test-bucket/mp/shards/again.bin")
    assert out.incomplete_uploads() == []  # the failed upload was aborted, nothing billed or listed


def test_local_partial_files_are_reported_then_cleaned(local_hdf5):
    out = open_store(local_hdf5.uri)
    stale = Path(out.path("shards")) / ".shard-00009.0123abcd.partial.h5"
    stale.write_bytes(b"killed writer")
    assert [(x.kind, x.url) for x in leftovers(out)] == [("partial", str(stale))]
    assert [x.url for x in clean_debris(out)] == [str(stale)] and not stale.exists()
