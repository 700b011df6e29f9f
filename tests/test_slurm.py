"""SLURM for real: dask-jobqueue jobs through sbatch, and cluster/slurm/convert.sbatch.

Needs a running SLURM (CI: `bash cluster/slurm/setup-single-node.sh`). Everything stays on
127.0.0.1: `single_node_dask_config()` puts scheduler and workers on the loopback interface.
Reuse `slurm_available()` / `single_node_dask_config()` / `requires_slurm` for end-to-end tests
(`requires_slurm` skips without SLURM unless CONVERT_REQUIRE_SLURM=1, as in CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import pytest

from convert.executor.cluster import ClusterError, check_reachable_paths, open_client
from convert.config import ClusterConfig

ROOT = Path(__file__).resolve().parents[1]
SBATCH_SCRIPT = ROOT / "cluster" / "slurm" / "convert.sbatch"
SETUP_HINT = "start one with: sudo bash cluster/slurm/setup-single-node.sh"


def slurm_available() -> bool:
    """True when sbatch/squeue/sinfo are on PATH and a node is up (idle, mixed or allocated)."""
    if not all(shutil.which(c) for c in ("sbatch", "squeue", "sinfo", "scancel")):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(s.strip().rstrip("*") in ("idle", "mixed", "allocated", "completing") for s in out.split())


def single_node_dask_config(log_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """dask config for dask-jobqueue on the one-node test cluster: loopback only, logs in log_dir."""
    return {"jobqueue.slurm.interface": "lo", "jobqueue.slurm.log-directory": str(log_dir)}


#: CI sets CONVERT_REQUIRE_SLURM=1: then a missing SLURM fails these tests instead of skipping them
SLURM_REQUIRED = os.environ.get("CONVERT_REQUIRE_SLURM") == "1"
requires_slurm = pytest.mark.skipif(
    not SLURM_REQUIRED and not slurm_available(), reason=f"no running SLURM cluster; {SETUP_HINT}"
)
pytestmark = [pytest.mark.slurm, requires_slurm]


def _squeue(job_ids: list[str]) -> dict[str, str]:
    """{job id: state} for those of job_ids still known to squeue."""
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)], capture_output=True, text=True, timeout=15
    ).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def _wait_gone(job_ids: list[str], timeout: float = 30) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while (left := _squeue(job_ids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture
def jobqueue_config(tmp_path: Path) -> Iterator[Path]:
    with dask.config.set(single_node_dask_config(tmp_path)):
        yield tmp_path


@pytest.mark.timeout(180)
def test_open_client_runs_two_slurm_jobs_and_cancels_them_on_exit(jobqueue_config: Path) -> None:
    cfg = ClusterConfig(kind="slurm", jobs=2, cores=1, memory="1GB", walltime="00:10:00")
    with open_client(cfg, job_name="convert-test", worker_timeout=90) as handle:
        handle.client.wait_for_workers(2, timeout=90)
        ids = handle.job_ids
        assert len(ids) == 2 and handle.description == "SLURMCluster 2 jobs"
        assert set(_squeue(ids).values()) == {"RUNNING"}
        # every worker runs inside one of our SLURM jobs
        assert sorted(handle.client.run(os.getenv, "SLURM_JOB_ID").values()) == sorted(ids)
        # ... without Dask's statistical profiler (the job script's prologue turns it off)
        profiling = handle.client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
        assert list(profiling.values()) == [False, False]
        assert handle.client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
        assert handle.scheduler_address.startswith("tcp://127.0.0.1:")
        check_reachable_paths([str(jobqueue_config)], handle)  # one node: loopback scheduler
    assert _wait_gone(ids) == {}, "jobs still in squeue after open_client exited"


@pytest.mark.timeout(60)
def test_rejected_submission_fails_fast_with_sbatch_output(jobqueue_config: Path) -> None:
    cfg = ClusterConfig(kind="slurm", cores=1, memory="1GB", queue="no-such-partition")
    start = time.monotonic()
    with pytest.raises(ClusterError) as info:
        with open_client(cfg, worker_timeout=60):
            pass
    assert time.monotonic() - start < 20
    first, _, details = str(info.value).partition("\n")
    assert "invalid partition" in first.lower() and "cluster.queue" in first  # the one line a CLI shows
    for part in ("Exit code: 1", "sbatch", "stderr:", "#SBATCH -p no-such-partition"):
        assert part in details, (part, details)


@pytest.mark.timeout(90)
def test_pending_jobs_time_out_with_squeue_and_job_script_and_are_cancelled(jobqueue_config: Path) -> None:
    cfg = ClusterConfig(kind="slurm", cores=1, memory="1GB", job_extra=("--begin=now+1hour",))
    with pytest.raises(ClusterError) as info:
        with open_client(cfg, worker_timeout=3):
            pass
    message = str(info.value)
    assert "no Dask worker joined SLURMCluster 1 job within 3s" in message
    assert "PENDING" in message or "PD" in message
    assert "#SBATCH --begin=now+1hour" in message and "CONVERT_WORKER_TIMEOUT" in message
    job_id = message.split("job ids: ")[1].split(")")[0]
    assert job_id.isdigit() and _wait_gone([job_id]) == {}


def _sbatch_wait(tmp_path: Path, command: str | None, *args: str, timeout: float = 150) -> tuple[str, int]:
    """Submit convert.sbatch (client: `command`, else convert-dataset run ARGS); return (state, exit code)."""
    env = dict(os.environ, CONVERT_PYTHON=sys.executable, CONVERT_INTERFACE="lo")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # convert-dataset
    if command is not None:
        env["CONVERT_COMMAND"] = command
    submit = subprocess.run(
        ["sbatch", "--parsable", "--ntasks=2", f"--output={tmp_path}/job-%j.out", str(SBATCH_SCRIPT), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # scontrol keeps finished jobs for MinJobAge (30 s)
        info = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
        fields = dict(f.split("=", 1) for f in info.split() if "=" in f)
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return fields["JobState"], int(fields["ExitCode"].split(":")[0])
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], timeout=30)
    pytest.fail(f"job {job_id} did not finish within {timeout}s")


@pytest.mark.timeout(180)
def test_sbatch_script_runs_scheduler_workers_and_client_in_one_allocation(tmp_path: Path) -> None:
    client = tmp_path / "client.py"
    client.write_text(
        "import os\nfrom distributed import Client\n"
        "c = Client(scheduler_file=os.environ['DASK_SCHEDULER_FILE'], timeout=30)\n"
        "c.wait_for_workers(2, timeout=60)\n"
        "jobs = set(c.run(lambda: os.environ['SLURM_JOB_ID']).values())\n"
        "print('WORKERS', len(c.scheduler_info()['workers']), 'JOBS', len(jobs), 'SUM', sum(c.gather(c.map(abs, range(-4, 0)))))\n"
        "print('PROFILING', any(c.run(lambda dask_worker: 'profile' in dask_worker.periodic_callbacks).values()))\n"
    )
    state, code = _sbatch_wait(tmp_path, f"{sys.executable} {client}")
    logs = "\n".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert (state, code) == ("COMPLETED", 0), logs
    assert "WORKERS 2 JOBS 1 SUM 10" in logs
    assert "PROFILING False" in logs  # convert.sbatch starts its workers without the profiler
    assert not list(tmp_path.glob("dask-scheduler-*.json")), "scheduler file left behind"


@pytest.mark.timeout(180)
def test_sbatch_script_propagates_the_conversion_exit_code(tmp_path: Path) -> None:
    assert _sbatch_wait(tmp_path, "exit 3") == ("FAILED", 3)


@pytest.mark.timeout(240)
def test_sbatch_script_converts_the_demo_dataset(tmp_path: Path) -> None:
    out = tmp_path / "out"
    state, code = _sbatch_wait(
        tmp_path,
        None,
        str(ROOT / "configs" / "demo.yaml"),
        "--source",
        str(ROOT / "configs" / "sample-images"),
        "--output",
        str(out),
    )
    logs = "\n".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert (state, code) == ("COMPLETED", 0), logs
    assert "scheduler tcp://127.0.0.1:" in logs  # ran on the job's scheduler, not a LocalCluster
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["totals"]["ok"] == 36, manifest["totals"]


@pytest.mark.timeout(300)
def test_submit_converts_the_demo_through_sbatch_jobs(tmp_path: Path) -> None:
    """`convert-dataset submit --cluster slurm --jobs 2` end to end: workers are real sbatch jobs."""
    logs = tmp_path / "logs"
    env = {**os.environ, "DASK_JOBQUEUE__SLURM__INTERFACE": "lo", "DASK_JOBQUEUE__SLURM__LOG_DIRECTORY": str(logs)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "convert",
            "submit",
            "configs/demo.yaml",
            "--output",
            str(tmp_path / "out"),
            "--cluster",
            "slurm",
            "--jobs",
            "2",
            "--cores",
            "1",
            "--memory",
            "1GB",
            "--walltime",
            "00:10:00",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr
    line = next(ln for ln in result.stderr.splitlines() if ln.startswith("batch jobs:"))
    job_ids = line.split(":", 1)[1].split()
    assert len(job_ids) == 2 and "SLURMCluster" in result.stderr
    # each job wrote its worker log through sbatch's --output, and none is left in the queue
    assert all(list(logs.glob(f"*{job_id}*")) for job_id in job_ids), sorted(p.name for p in logs.iterdir())
    assert _wait_gone(job_ids) == {}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["ok"] == 36
