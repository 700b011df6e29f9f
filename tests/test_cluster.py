"""convert.cluster: local clusters, external schedulers (real `dask scheduler`/`dask worker`
processes on 127.0.0.1), batch job scripts, the path-reachability guard, and the deployment files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dask
import psutil
import pytest
import yaml

from convert.executor.cluster import (
    SCHEDULER_PLACEHOLDER,
    ClusterError,
    ClusterHandle,
    check_reachable_paths,
    job_script,
    local_worker_count,
    open_client,
)
from convert.config import ClusterConfig, validate
from convert.executor.dask_executor import open_dask_executor
from convert.executor.worker_settings import worker_env

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "cluster"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- local


def _wait_for_page(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                assert resp.status == 200 and b"bokeh" in resp.read().lower()
                return
        except OSError:
            assert time.monotonic() < deadline, f"{url} not served within {timeout} s"
            time.sleep(0.2)


@pytest.mark.cluster
def test_local_cluster_runs_tasks_in_worker_processes_and_serves_a_dashboard() -> None:
    cfg = ClusterConfig(workers=2, threads_per_worker=1)
    with open_client(cfg) as handle:
        pids = set(handle.client.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids  # processes=True
        assert handle.client.submit(os.getpid).result() in pids
        assert handle.description == "LocalCluster 2 workers x 1 thread"
        assert handle.scheduler_address.startswith("tcp://127.0.0.1:")
        assert handle.job_ids == [] and handle.shared_filesystem_required is False
        link = handle.dashboard_link
        assert link is not None and link.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(link.rsplit("/", 1)[0] + "/health", timeout=5) as resp:
            assert resp.status == 200
        _wait_for_page(link)  # bokeh's dashboard joins the running scheduler a moment later
        check_reachable_paths(["/local/only/data"], handle)  # every worker is on this machine
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(psutil.pid_exists(p) for p in pids), "worker processes outlived open_client"


_FIRST_VISIT = """
import sys, urllib.request
from convert.config import ClusterConfig
from convert.executor.cluster import open_client
if __name__ == "__main__":
    with open_client(ClusterConfig(workers=1)) as handle:
        handle.client.submit(sum, [1, 2]).result()  # the cluster works; nobody has looked at the page
        before = "bokeh" in sys.modules
        with urllib.request.urlopen(handle.dashboard_link, timeout=60) as resp:
            page = resp.status == 200 and b"bokeh" in resp.read().lower()
        print(before, page, "bokeh" in sys.modules)
"""


@pytest.mark.cluster
def test_the_dashboard_is_built_on_its_first_visit_not_while_the_run_converts(tmp_path: Path) -> None:
    """bokeh's import (~1.2 s of CPU) is not spent during runs nobody watches; the printed link works."""
    assert _run_script(tmp_path, _FIRST_VISIT, timeout=120).split() == ["False", "True", "True"]


def _run_script(tmp_path: Path, code: str, timeout: float) -> str:
    """stdout of `code` run as a script in a fresh interpreter (nothing imported by other tests)."""
    script = tmp_path / "script.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


_CONCURRENT_FIRST_VISITS = """
import socket
from convert.config import ClusterConfig
from convert.executor.cluster import open_client
if __name__ == "__main__":
    with open_client(ClusterConfig(workers=1)) as handle:
        handle.client.submit(sum, [1, 2]).result()
        host, port = handle.dashboard_link.split("//")[1].split("/")[0].split(":")
        socks = [socket.create_connection((host, int(port)), timeout=60) for _ in range(4)]
        for s in socks:  # four tabs (or a tab and a link preview) open the printed link at once
            s.sendall(b"GET /status HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
        for s in socks:
            while s.recv(65536):
                pass
        apps = handle.cluster.scheduler.http_application.applications
        print(sum(type(a).__name__ == "DaskBokehTornado" for a in apps))
"""


@pytest.mark.cluster
def test_concurrent_first_visits_connect_the_dashboard_once(tmp_path: Path) -> None:
    """Visits arriving together at the lazy dashboard build it once (each had connected its own copy)."""
    out = _run_script(tmp_path, _CONCURRENT_FIRST_VISITS, timeout=180)
    assert out.split()[-1] == "1"  # one dashboard, however many tabs asked for it first


@pytest.mark.cluster
def test_local_cluster_without_dashboard_and_with_threads() -> None:
    with open_client(ClusterConfig(workers=1, threads_per_worker=2, dashboard=False)) as handle:
        assert handle.dashboard_link is None
        assert handle.description == "LocalCluster 1 worker x 2 threads"
        assert sum(handle.client.nthreads().values()) == 2


def _worker_sigint_and_env() -> tuple[bool, str | None, bool]:
    import signal as signal_

    return (
        signal_.getsignal(signal_.SIGINT) is signal_.SIG_IGN,
        os.environ.get("CONVERT_TEST_MARK"),
        "convert.worker" in sys.modules,
    )


@pytest.mark.cluster
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_local_workers_ignore_ctrl_c_even_after_a_restart_and_see_the_current_environment(monkeypatch, method) -> None:
    """A terminal's Ctrl-C goes to the whole process group: workers must leave it to the client, also
    ones a nanny restarts mid-run; and a variable set between two runs in one process reaches the workers."""
    monkeypatch.setenv("CONVERT_WORKER_START", method)
    for mark in ("first", "second"):
        monkeypatch.setenv("CONVERT_TEST_MARK", mark)
        with open_client(ClusterConfig(workers=2, threads_per_worker=1, dashboard=False)) as handle:
            states = list(handle.client.run(_worker_sigint_and_env).values())
            assert states == [(True, mark, method == "forkserver")] * 2, states  # forked workers start warm
            if mark == "second" and method == "forkserver":
                handle.client.restart()  # the nanny starts new worker processes
                states = list(handle.client.run(_worker_sigint_and_env).values())
                assert [s[:2] for s in states] == [(True, mark)] * 2, states


def test_local_worker_count_follows_cpu_affinity() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert local_worker_count(1) == cpus
    assert local_worker_count(cpus * 4) == 1  # never zero


# ---------------------------------------------------------------- external scheduler


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in reversed(procs):
        p.terminate()
    for p in reversed(procs):
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


def _wait_for_file(path: Path, procs: list[subprocess.Popen[bytes]], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            _stop(procs)
            pytest.fail(f"dask scheduler did not write {path}:\n{log.read_text()}")
        time.sleep(0.1)


@pytest.fixture
def dask_scheduler(tmp_path: Path) -> Iterator[tuple[str, Path, list[subprocess.Popen[bytes]]]]:
    """A real `dask scheduler` on 127.0.0.1 (free port) without workers: (address, file, procs)."""
    sched_file, log = tmp_path / "scheduler.json", tmp_path / "scheduler.log"
    port = _free_port()
    procs = [
        _spawn(
            [
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
                "--scheduler-file",
                str(sched_file),
            ],
            log,
        )
    ]
    _wait_for_file(sched_file, procs, log)
    try:
        yield f"tcp://127.0.0.1:{port}", sched_file, procs
    finally:
        _stop(procs)


@pytest.fixture
def dask_cluster(dask_scheduler, tmp_path: Path) -> Iterator[tuple[str, Path, int]]:
    """dask_scheduler plus one `dask worker` process: (address, scheduler file, worker pid)."""
    address, sched_file, procs = dask_scheduler
    worker = _spawn(
        [
            "distributed.cli.dask_worker",
            address,
            "--nthreads",
            "1",
            "--no-nanny",
            "--no-dashboard",
            "--host",
            "127.0.0.1",
            "--local-directory",
            str(tmp_path),
        ],
        tmp_path / "worker.log",
    )
    procs.append(worker)
    yield address, sched_file, worker.pid


@pytest.mark.cluster
def test_scheduler_address_runs_on_the_external_worker_and_leaves_it_running(dask_cluster) -> None:
    address, _, worker_pid = dask_cluster
    with open_client(ClusterConfig(scheduler=address), worker_timeout=30) as handle:
        assert handle.client.submit(os.getpid).result(timeout=30) == worker_pid
        assert handle.description == f"scheduler {address}"
        assert handle.scheduler_address == address
        assert handle.shared_filesystem_required is True and handle.job_ids == []
        check_reachable_paths(["/data/on/this/host"], handle)  # loopback scheduler: same machine
    assert psutil.pid_exists(worker_pid), "closing our client must not stop the user's cluster"
    with open_client(ClusterConfig(scheduler=address)) as again:  # still usable
        assert again.client.submit(os.getpid).result(timeout=30) == worker_pid


@pytest.mark.cluster
def test_scheduler_file_mode(dask_cluster) -> None:
    address, sched_file, worker_pid = dask_cluster
    with open_client(ClusterConfig(scheduler_file=str(sched_file)), worker_timeout=30) as handle:
        assert handle.scheduler_address == address
        assert handle.description == f"scheduler {address} (from {sched_file})"
        assert handle.client.submit(os.getpid).result(timeout=30) == worker_pid


@pytest.mark.cluster
def test_scheduler_without_workers_says_how_to_start_one(dask_scheduler) -> None:
    address, _, _ = dask_scheduler
    with pytest.raises(ClusterError, match=rf"no workers after 1s; start some with `dask worker {address}`"):
        with open_client(ClusterConfig(scheduler=address), worker_timeout=1):
            pass


def test_unreachable_scheduler_fails_fast_with_address_and_fix() -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(ClusterError) as info:
        with open_client(ClusterConfig(scheduler=address), connect_timeout=1):
            pass
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert address in message and "dask scheduler" in message and "cluster.scheduler" in message
    assert "\n" not in message


def test_missing_scheduler_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ClusterError, match=rf"{missing}.*dask scheduler --scheduler-file"):
        with open_client(ClusterConfig(scheduler_file=str(missing)), connect_timeout=0.5):
            pass


# ---------------------------------------------------------------- batch job scripts


FULL = dict(cores=4, memory="16GiB", walltime="02:00:00", queue="gpu", account="proj42", threads_per_worker=2)


def test_slurm_job_script_carries_every_setting() -> None:
    cfg = ClusterConfig(kind="slurm", job_extra=("--gres=gpu:1", "#SBATCH --exclusive"), **FULL)
    lines = job_script(cfg, job_name="conv").splitlines()
    for directive in (
        "-J conv",
        "-p gpu",
        "-A proj42",
        "--cpus-per-task=4",
        "--mem=16G",
        "-t 02:00:00",
        "--gres=gpu:1",
        "--exclusive",
    ):
        assert f"#SBATCH {directive}" in lines, (directive, lines)
    command = lines[-1]
    assert command.startswith(f"{sys.executable} -m distributed.cli.dask_worker {SCHEDULER_PLACEHOLDER}")
    assert "--nworkers 2 " in command and "--nthreads 2 " in command and "--local-directory /tmp" in command


def test_pbs_job_script_carries_every_setting() -> None:
    cfg = ClusterConfig(kind="pbs", job_extra=("-l place=scatter",), **FULL)
    lines = job_script(cfg).splitlines()
    for directive in (
        "-N convert",
        "-q gpu",
        "-A proj42",
        "-l select=1:ncpus=4:mem=16GB",
        "-l walltime=02:00:00",
        "-l place=scatter",
    ):
        assert f"#PBS {directive}" in lines, (directive, lines)
    assert "-m distributed.cli.dask_worker" in lines[-1] and "--nthreads 2" in lines[-1]


def test_unset_batch_values_fall_back_to_dask_jobqueue_config() -> None:
    conf = {
        "jobqueue.slurm.cores": 3,
        "jobqueue.slurm.memory": "6GB",
        "jobqueue.slurm.queue": "from-yaml",
        "jobqueue.slurm.walltime": "00:07:00",
    }
    with dask.config.set(conf):
        script = job_script(ClusterConfig(kind="slurm"))
        assert "#SBATCH --cpus-per-task=3" in script and "#SBATCH -p from-yaml" in script
        assert "#SBATCH -t 00:07:00" in script
        assert "#SBATCH -p cli" in job_script(ClusterConfig(kind="slurm", queue="cli"))  # config wins


def test_batch_cluster_without_cores_or_memory_says_which_keys_to_set() -> None:
    with pytest.raises(ClusterError, match=r"cluster\.cores and cluster\.memory.*jobqueue\.pbs"):
        job_script(ClusterConfig(kind="pbs", cores=2))


def test_batch_cluster_without_submit_command_points_at_setup(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ClusterError, match=r"`sbatch` is not on PATH.*setup-single-node\.sh"):
        with open_client(ClusterConfig(kind="slurm", cores=1, memory="1GB")):
            pass


# ---------------------------------------------------------------- reachable paths


def _remote_handle(address: str = "tcp://10.1.2.3:8786") -> ClusterHandle:
    return ClusterHandle(
        client=None,
        description=f"scheduler {address}",
        dashboard_link=None,  # type: ignore[arg-type]
        scheduler_address=address,
        shared_filesystem_required=True,
        config=ClusterConfig(),
    )


def test_local_paths_with_a_remote_scheduler_are_refused_with_the_fix(monkeypatch) -> None:
    monkeypatch.delenv("CONVERT_SHARED_PATHS", raising=False)
    handle = _remote_handle()
    check_reachable_paths(["s3://bucket/images", "https://example.org/list.txt", "gs://b/out"], handle)
    for uri in ("/data/images", "file:///data/images", "relative/dir"):
        with pytest.raises(ValueError, match="local path.*object store.*CONVERT_SHARED_PATHS") as info:
            check_reachable_paths(["s3://bucket/x", uri], handle)
        assert repr(uri) in str(info.value)


def test_declared_shared_prefixes_allow_local_paths(monkeypatch, tmp_path: Path) -> None:
    handle = _remote_handle()
    shared = tmp_path / "shared"
    check_reachable_paths([str(shared / "in"), f"file://{shared}/out"], handle, shared_paths=[str(shared)])
    with pytest.raises(ValueError, match="sharedfoo"):  # a prefix is a directory, not a string prefix
        check_reachable_paths([str(tmp_path / "sharedfoo")], handle, shared_paths=[str(shared)])
    monkeypatch.setenv("CONVERT_SHARED_PATHS", os.pathsep.join(["/elsewhere", str(shared)]))
    check_reachable_paths([str(shared / "in")], handle)


def test_loopback_scheduler_allows_local_paths(monkeypatch) -> None:
    monkeypatch.delenv("CONVERT_SHARED_PATHS", raising=False)
    for address in ("tcp://127.0.0.1:8786", "tcp://localhost:8786", "tcp://[::1]:8786"):
        check_reachable_paths(["/data/images"], _remote_handle(address))


# ---------------------------------------------------------------- deployment files


@pytest.mark.parametrize("script", ["slurm/convert.sbatch", "slurm/setup-single-node.sh", "pbs/convert.pbs"])
def test_shell_scripts_parse(script: str) -> None:
    path = DEPLOY / script
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_script_starts_scheduler_workers_and_conversion() -> None:
    text = (DEPLOY / "slurm" / "convert.sbatch").read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "#SBATCH --ntasks=" in text
    assert "distributed.cli.dask_scheduler" in text and "--scheduler-file" in text
    assert "srun" in text and "distributed.cli.dask_worker" in text
    assert 'convert-dataset run "$CONFIG" --scheduler-file "$SCHED_FILE"' in text


def _k8s_docs() -> list[dict]:
    docs: list[dict] = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _containers(pod_spec: dict) -> dict[str, dict]:
    return {c["name"]: c for c in pod_spec["containers"]}


def test_kubernetes_daskjob_runs_convert_on_the_configmap_config() -> None:
    docs = _k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert {"DaskCluster", "DaskJob", "ConfigMap"} <= kinds
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    ((key, text),) = configmap["data"].items()
    config = yaml.safe_load(text)
    assert {"source", "output", "cluster"} <= set(config)
    job = next(d for d in docs if d["kind"] == "DaskJob")
    assert job["apiVersion"] == "kubernetes.dask.org/v1"
    runner_spec = job["spec"]["job"]["spec"]
    runner = _containers(runner_spec)["job"]
    mount = next(m for m in runner["volumeMounts"])
    volume = next(v for v in runner_spec["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    cmd = runner.get("command", []) + runner["args"]
    assert cmd[:3] == ["convert-dataset", "run", f"{mount['mountPath']}/{key}"]
    assert "$(DASK_SCHEDULER_ADDRESS)" in cmd
    image = runner["image"]
    cluster_spec = job["spec"]["cluster"]["spec"]
    worker = _containers(cluster_spec["worker"]["spec"])["worker"]
    scheduler = _containers(cluster_spec["scheduler"]["spec"])["scheduler"]
    assert worker["image"] == scheduler["image"] == image
    assert worker["args"][:2] == ["dask", "worker"] and scheduler["args"][:2] == ["dask", "scheduler"]
    assert worker["resources"]["limits"]["memory"] and worker["resources"]["requests"]["cpu"]
    assert "--memory-limit" in worker["args"] and "--nthreads" in worker["args"]


def test_kubernetes_daskcluster_uses_the_same_image() -> None:
    docs = _k8s_docs()
    cluster = next(d for d in docs if d["kind"] == "DaskCluster")
    job = next(d for d in docs if d["kind"] == "DaskJob")
    image = _containers(job["spec"]["job"]["spec"])["job"]["image"]
    worker = _containers(cluster["spec"]["worker"]["spec"])["worker"]
    assert worker["image"] == image and worker["resources"]["limits"]["memory"]
    assert cluster["spec"]["worker"]["replicas"] >= 1


def test_configmap_config_is_valid_and_needs_no_shared_filesystem() -> None:
    configmap = next(d for d in _k8s_docs() if d["kind"] == "ConfigMap")
    config = validate(yaml.safe_load(configmap["data"]["convert.yaml"]))
    check_reachable_paths([config.source.uri, config.output.uri], _remote_handle())


def test_dockerfile_installs_convert_with_existing_extras_and_bokeh() -> None:
    text = (DEPLOY / "kubernetes" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert not any(line.startswith("ENTRYPOINT") for line in lines)  # containers pick their command
    install = next(line for line in lines if "pip install" in line)
    extras = install.split("[", 1)[1].split("]", 1)[0].split(",")
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) <= set(optional) and "bokeh" in install
    ignore = (DEPLOY / "kubernetes" / "Dockerfile.dockerignore").read_text().split()
    assert {"*", "!pyproject.toml", "!convert"} <= set(ignore)


def test_every_deployment_folder_has_a_readme() -> None:
    for name in ("slurm", "pbs", "kubernetes", "ssh"):
        assert (DEPLOY / name / "README.md").stat().st_size > 500, name


@pytest.mark.cluster
def test_workers_we_start_keep_no_profile_history() -> None:
    """Dask's profiler keeps a call tree per worker per second for 1000 s (a worker grew ~13 MiB per
    100k images); the workers convert starts run without it, so their memory stays flat (bench_rss.py)."""
    with open_dask_executor(ClusterConfig(workers=1, dashboard=False)) as ex:
        profiling = ex.client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
        assert list(profiling.values()) == [False]


def _profiling(client) -> list[bool]:
    return list(client.run(lambda dask_worker: dask_worker.periodic_callbacks["profile"].is_running()).values())


@pytest.mark.cluster
def test_external_workers_run_without_the_profiler_during_a_run_and_get_it_back(dask_cluster) -> None:
    address, _, _ = dask_cluster
    with open_client(ClusterConfig(scheduler=address), worker_timeout=30) as handle:
        assert _profiling(handle.client) == [True]  # the user's worker, as they started it
    with open_dask_executor(ClusterConfig(scheduler=address)) as ex:
        assert _profiling(ex.client) == [False]
    with open_client(ClusterConfig(scheduler=address)) as handle:
        assert _profiling(handle.client) == [True]  # the run is over: their setting is back


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_batch_job_script_turns_the_profiler_off_after_the_users_own_prologue(kind: str, tmp_path: Path) -> None:
    with dask.config.set({f"jobqueue.{kind}.job-script-prologue": ["module load python"]}):
        lines = job_script(ClusterConfig(kind=kind, cores=1, memory="1GB")).splitlines()
    exports = [ln for ln in lines if ln.startswith("export DASK_")]
    assert lines.index("module load python") < lines.index(exports[0]) < len(lines) - 1  # before the worker
    assert "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False" in exports
    # what a worker started after these lines reads from dask's config
    probe = "import dask.config, distributed; print(dask.config.get('distributed.worker.profile.enabled'))"
    shell = "; ".join([*exports, f'{sys.executable} -c "{probe}"'])
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_deployment_scripts_and_manifests_start_workers_without_the_profiler() -> None:
    name = "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"
    assert worker_env()[name] == "False"
    for script in ("slurm/convert.sbatch", "pbs/convert.pbs"):  # exported before any worker starts
        text = (DEPLOY / script).read_text()
        assert text.index(f"{name}=False") < text.index("distributed.cli.dask_worker"), script
    assert 'WORKER_CMD="export $DASK_SETTINGS && ' in (DEPLOY / "pbs" / "convert.pbs").read_text()  # pbsdsh: no env
    for doc in _k8s_docs():
        specs = [doc["spec"].get("worker", {}).get("spec")] if doc["kind"] == "DaskCluster" else []
        if doc["kind"] == "DaskJob":
            specs = [doc["spec"]["cluster"]["spec"]["worker"]["spec"]]
        for spec in filter(None, specs):
            env = {e["name"]: e["value"] for e in _containers(spec)["worker"].get("env", [])}
            assert env.get(name) == "False", doc["kind"]


def test_pbs_worker_command_carries_the_settings_through_pbsdsh_which_passes_no_environment(tmp_path: Path) -> None:
    text = (DEPLOY / "pbs" / "convert.pbs").read_text()
    settings = text[text.index("DASK_SETTINGS=") : text.index("# shellcheck disable=SC2086  # a word list")]
    cmd_at = text.index("WORKER_CMD=")
    worker_cmd = text[cmd_at : text.index("\n", text.index("--death-timeout", cmd_at))]  # the real two lines
    probe = "import dask.config, distributed; print(dask.config.get('distributed.worker.profile.enabled'))"
    fake_python = tmp_path / "python"  # stands in for $PY: prints what a worker would read, starts nothing
    fake_python.write_text(f'#!/bin/sh\nexec {sys.executable} -c "{probe}"\n')
    fake_python.chmod(0o755)
    node = f"WORKDIR={tmp_path}; PY={fake_python}; SCHED_FILE=x; THREADS=1; IFACE=()\n{settings}{worker_cmd}\n"
    # what pbsdsh runs on a node: `bash -c "$WORKER_CMD"`, in an environment without the job's variables
    script = node + 'env -i PATH="$PATH" PYTHONPATH="$PYTHONPATH" bash -c "$WORKER_CMD"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
