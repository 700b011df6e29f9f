"""The Dask settings every worker convert starts or submits runs with, and how each kind of worker gets them.

Dask's statistical profiler adds two call trees per worker per second of run time (all tasks and per
task prefix, ~50 kB a second here) and keeps 1000 of them: a worker grew ~13 MiB per 100k images until
~1000 s had passed (bench_rss.py: peak RSS 1.13x at 150k vs 10k images; off: 1.01x). Shard records
carry our own per-stage CPU account (convert.timing), so no worker of ours profiles. Dask also keeps
bounded logs per worker/scheduler; at 10^5 tasks the defaults still hold every task's transitions for
a long time, so these are shortened too (issue 9 item 7).

How each worker gets them:
* LocalCluster workers: `dask.config.set(WORKER_CONFIG)` around the cluster (dask_executor.py);
* SLURM/PBS jobs (dask-jobqueue): `export DASK_...` lines in the job script's prologue (`prologue()`);
* cluster/slurm/convert.sbatch, cluster/pbs/convert.pbs, cluster/kubernetes, `dask worker` over SSH:
  the same variables (`worker_env()`), exported by the scripts / set in the manifests;
* any other worker of an external scheduler: `ProfilerOff`, a WorkerPlugin registered for the run,
  stops the profiler's periodic callbacks on every current and future worker and restarts them when
  the run ends (the workers are shared; their owner's settings come back).
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

WORKER_CONFIG: dict[str, Any] = {
    "distributed.admin.low-level-log-length": 1000,
    "distributed.diagnostics.computations.max-history": 10,
    "distributed.worker.profile.enabled": False,
}

#: the worker's periodic callbacks that sample (profile) and roll up (profile-cycle) call stacks
PROFILER_CALLBACKS = ("profile", "profile-cycle")


def env_name(key: str) -> str:
    """The environment variable dask reads for a dotted config key (DASK_ + '__' between levels)."""
    return "DASK_" + "__".join(part.upper().replace("-", "_") for part in key.split("."))


def worker_env() -> dict[str, str]:
    """WORKER_CONFIG as environment variables (dask parses 'False' / '1000' back into values)."""
    return {env_name(key): str(value) for key, value in WORKER_CONFIG.items()}


def prologue(existing: list[str] | None = None) -> list[str]:
    """A job script prologue: the user's own lines (jobqueue's job-script-prologue/env-extra), then ours."""
    return [*(existing or ()), *(f"export {name}={value}" for name, value in worker_env().items())]


class ProfilerOff(WorkerPlugin):
    """Stops Dask's profiler on the workers of a scheduler convert did not start; restarts it on teardown."""

    name = "convert-profiler-off"

    def __init__(self) -> None:
        self._stopped: list[str] = []

    def setup(self, worker: Any) -> None:
        for key in PROFILER_CALLBACKS:
            callback = worker.periodic_callbacks.get(key)
            if callback is not None and callback.is_running():
                callback.stop()
                self._stopped.append(key)

    def teardown(self, worker: Any) -> None:
        for key in self._stopped:
            callback = worker.periodic_callbacks.get(key)
            if callback is not None:
                callback.start()
        self._stopped.clear()
