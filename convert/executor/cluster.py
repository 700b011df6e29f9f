"""Connect to the Dask cluster a ClusterConfig describes, and tear it down afterwards.

`open_client(cfg)` is the single entry point the pipeline uses:

* ``kind: local`` or ``auto`` (no scheduler) -> a `distributed.LocalCluster` of worker processes on 127.0.0.1;
* ``scheduler: tcp://host:8786`` / ``scheduler_file: path`` -> a `Client` to a running scheduler;
* ``kind: slurm|pbs`` -> a dask-jobqueue cluster that submits ``cluster.jobs`` batch jobs.
  Only values set in the config are passed; dask's ``jobqueue.yaml`` config fills in the rest.

`job_script(cfg)` renders the batch script without submitting anything (``submit --dry-run``).
`check_reachable_paths(uris, handle)` refuses local paths that remote workers cannot obviously see.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.config
from distributed import Client, LocalCluster
from distributed.core import Status

from ..config import ClusterConfig
from .warm import claim_preload, ensure_forkserver, start_method
from .auto import usable_cpus
from .worker_settings import prologue
from .reach import SHARED_PATHS_ENV, check_reachable_paths, is_loopback  # noqa: F401  (part of this API)


def _jobqueue() -> Any:
    """dask_jobqueue, imported only when a batch cluster is asked for (its runner module installs a
    SIGINT handler calling sys.exit, which would turn Ctrl-C of a local run into exit status 0).

    Its jobqueue.* config defaults are (re)applied here: an import inside a dask.config.set()
    block would otherwise lose them when the block exits.
    """
    try:
        import dask_jobqueue
    except ImportError:  # optional extra `convert[cluster]`
        return None
    import yaml

    path = os.path.join(os.path.dirname(dask_jobqueue.__file__), "jobqueue.yaml")
    if os.path.isfile(path) and dask.config.get("jobqueue", None) is None:
        with open(path) as f:
            dask.config.update(dask.config.config, yaml.safe_load(f), priority="old")
    return dask_jobqueue


logger = logging.getLogger(__name__)

#: seconds to wait for a batch cluster's first worker (jobs may queue); env overrides
WORKER_TIMEOUT_ENV = "CONVERT_WORKER_TIMEOUT"

#: scheduler address shown by job_script(): the real one exists only once the cluster starts
SCHEDULER_PLACEHOLDER = "tcp://<scheduler-address>:8786"

_BATCH = {"slurm": ("sbatch", "squeue", "#SBATCH"), "pbs": ("qsub", "qstat", "#PBS")}


class ClusterError(RuntimeError):
    """The cluster could not be reached or started; the message says what to run to fix it."""


@dataclass(frozen=True)
class ClusterHandle:
    """A connected client plus what the caller needs to report on and reason about the cluster."""

    client: Client
    description: str
    dashboard_link: str | None
    scheduler_address: str
    shared_filesystem_required: bool
    config: ClusterConfig
    cluster: Any = field(default=None, repr=False)  # LocalCluster / JobQueueCluster we own, if any

    @property
    def job_ids(self) -> list[str]:
        """Batch job ids submitted so far (empty for local clusters and external schedulers)."""
        workers = getattr(self.cluster, "workers", None) or {}
        ids = {str(j.job_id) for j in workers.values() if getattr(j, "job_id", None)}
        return sorted(ids, key=lambda i: (len(i), i))


@contextmanager
def open_client(
    cfg: ClusterConfig,
    *,
    job_name: str = "convert",
    connect_timeout: float = 10.0,
    worker_timeout: float | None = None,
) -> Iterator[ClusterHandle]:
    """Yield a ClusterHandle for `cfg`; on exit close the client and any cluster/jobs we started.

    `connect_timeout` bounds reaching an existing scheduler; `worker_timeout` bounds waiting for
    the first worker (default 60 s for an existing scheduler, $CONVERT_WORKER_TIMEOUT or 600 s
    for batch jobs, which may sit in the queue).
    """
    if cfg.scheduler or cfg.scheduler_file:
        with _open_existing(cfg, connect_timeout, worker_timeout or 60.0) as handle:
            yield handle
    elif cfg.kind in ("local", "auto"):
        with _open_local(cfg) as handle:
            yield handle
    else:
        timeout = worker_timeout or float(os.environ.get(WORKER_TIMEOUT_ENV, "600"))
        with _open_batch(cfg, job_name, timeout) as handle:
            yield handle


def local_worker_count(threads_per_worker: int = 1) -> int:
    """Worker processes that fit this machine: usable CPUs (affinity-aware) / threads per worker."""
    return max(1, usable_cpus() // max(1, threads_per_worker))


@contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """While worker processes are spawned, ignore SIGINT: they inherit SIG_IGN (Python keeps an
    ignored SIGINT at startup), so a terminal's Ctrl-C, sent to the whole process group, stops
    only the client, which then shuts the workers down itself - no worker tracebacks."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _open_local(cfg: ClusterConfig) -> Iterator[ClusterHandle]:
    n = cfg.workers or local_worker_count(cfg.threads_per_worker)
    method = start_method()
    with ExitStack() as stack:
        # read at every worker (re)start, so it holds for the cluster's life
        stack.enter_context(dask.config.set({"distributed.worker.multiprocessing-method": method}))
        if method == "forkserver":
            claim_preload()
            ensure_forkserver()  # workers fork from it with SIGINT ignored, from any thread
        with _children_ignore_sigint():  # spawn: the constructor returns once the workers are up
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=n,
                    threads_per_worker=cfg.threads_per_worker,
                    processes=True,
                    memory_limit=cfg.memory_limit,
                    dashboard_address=":0",  # the HTTP server (/health) always runs; on a free port
                    scheduler_kwargs={"dashboard": False},  # attached below, off the start-up path
                    host="127.0.0.1",
                )
            )
            client = Client(cluster)  # not as a context: that binds it to this thread's context (early.py)
            stack.callback(client.close)
        if cfg.dashboard:
            _attach_dashboard(cluster)
        size = f"{_plural(n, 'worker')} x {_plural(cfg.threads_per_worker, 'thread')}"
        yield _make_handle(cfg, client, f"LocalCluster {size}", cluster=cluster, shared=False)


def _attach_dashboard(cluster: LocalCluster) -> None:
    """Serve Dask's dashboard from the running scheduler's HTTP server on its first visit.

    Importing bokeh and building the dashboard costs ~1.2 s of CPU; on a 2-core machine, spent while
    a run converts, that is 10-15 % of a 5,000-image run - for a page most runs never show. So the
    server (it already answers /health and the JSON routes) gets one extra fallback application
    that, on the first request no other route takes, connects the dashboard (what
    Scheduler(dashboard=True) does while starting), removes itself and redirects to the same URL.
    """
    scheduler, loop = cluster.scheduler, cluster.loop
    app = getattr(scheduler, "http_application", None)
    if loop is None or app is None or not hasattr(app, "applications"):
        return
    with contextlib.suppress(Exception):  # a cluster closing meanwhile: no dashboard needed
        loop.add_callback(app.add_application, _lazy_dashboard(scheduler))


def _lazy_dashboard(scheduler: Any) -> Any:
    """A tornado application matching any path, which connects the dashboard on its first request."""
    from tornado import web

    connected: list[bool] = []  # once: visits arriving together must not build it twice

    class FirstVisit(web.RequestHandler):
        def get(self, *_: Any) -> None:
            if not connected:
                connected.append(True)
                routing = scheduler.http_application
                with contextlib.suppress(ValueError):
                    routing.applications.remove(lazy)
                try:
                    import distributed.dashboard.scheduler as dashboard
                except ImportError:  # no bokeh: /health and the JSON routes only
                    raise web.HTTPError(404) from None
                dashboard.connect(routing, scheduler.http_server, scheduler)
            self.redirect(self.request.uri or "/status")

    lazy = web.Application([(r"/(.*)", FirstVisit)])
    return lazy


def _make_handle(
    cfg: ClusterConfig, client: Client, what: str, *, shared: bool, cluster: Any = None, address: str | None = None
) -> ClusterHandle:
    """A ClusterHandle described as `what`; the scheduler address is `address` or that of our `cluster`."""
    return ClusterHandle(
        client=client,
        description=what,
        dashboard_link=_dashboard(client, cfg),
        scheduler_address=cluster.scheduler_address if address is None else address,
        shared_filesystem_required=shared,
        config=cfg,
        cluster=cluster,
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _dashboard(client: Client, cfg: ClusterConfig) -> str | None:
    """The scheduler's dashboard URL, or None when disabled or not served."""
    if not cfg.dashboard:
        return None
    try:
        return client.dashboard_link or None
    except (KeyError, AttributeError, OSError):
        return None


def read_scheduler_file(path: str, timeout: float) -> str:
    """The scheduler address from a `dask scheduler --scheduler-file` JSON file, waiting for it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return str(json.loads(Path(path).read_text())["address"])
        except (OSError, ValueError, KeyError) as exc:
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"scheduler file {path!r} not readable after {timeout:g}s ({exc.__class__.__name__}: {exc}); "
                    f"start a scheduler with `dask scheduler --scheduler-file {path}` or fix cluster.scheduler_file"
                ) from None
            time.sleep(0.2)


@contextmanager
def _open_existing(cfg: ClusterConfig, connect_timeout: float, worker_timeout: float) -> Iterator[ClusterHandle]:
    if cfg.scheduler:
        address, origin = cfg.scheduler, ""
    else:
        assert cfg.scheduler_file is not None
        address = read_scheduler_file(cfg.scheduler_file, connect_timeout)
        origin = f" (from {cfg.scheduler_file})"
    try:
        client = Client(address, timeout=connect_timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address}{origin} within {connect_timeout:g}s "
            f"({exc.__class__.__name__}); start one with `dask scheduler --host HOST --port 8786` and "
            f"`dask worker {address}`, or fix cluster.scheduler / --scheduler"
        ) from None
    with client:
        try:
            client.wait_for_workers(1, timeout=worker_timeout)
        except TimeoutError:
            raise ClusterError(
                f"the scheduler at {address} has no workers after {worker_timeout:g}s; "
                f"start some with `dask worker {address}`"
            ) from None
        yield _make_handle(cfg, client, f"scheduler {address}{origin}", address=address, shared=True)


def jobqueue_kwargs(cfg: ClusterConfig, job_name: str = "convert") -> dict[str, Any]:
    """Keyword arguments for SLURMCluster/PBSCluster: only what `cfg` sets, plus python/local dir.

    Anything left out is read by dask-jobqueue from ``jobqueue.<kind>.*`` in dask's config.
    """
    kind = cfg.kind
    _jobqueue()  # registers the jobqueue.* defaults read below
    conf = lambda key: dask.config.get(f"jobqueue.{kind}.{key}", None)  # noqa: E731
    kw: dict[str, Any] = {"job_name": job_name}
    for key in ("cores", "memory", "walltime", "queue", "account"):
        value = getattr(cfg, key)
        if value is not None:
            kw[key] = value
    if cfg.job_extra:
        prefix = _BATCH[kind][2]  # accept "--gres=gpu:1" and "#SBATCH --gres=gpu:1" alike
        kw["job_extra_directives"] = [d.strip().removeprefix(prefix).strip() for d in cfg.job_extra]
    if conf("python") is None:
        kw["python"] = sys.executable
    if conf("local-directory") is None:
        kw["local_directory"] = "/tmp"
    cores = cfg.cores or conf("cores")
    if cores and conf("processes") is None:
        kw["processes"] = max(1, int(cores) // cfg.threads_per_worker)
    # the workers' Dask settings (profiler off, short logs) as exports, after the user's own prologue
    kw["job_script_prologue"] = prologue(list(conf("job-script-prologue") or conf("env-extra") or []))
    options = dict(conf("scheduler-options") or {})
    options.setdefault("dashboard_address", ":0")
    options.setdefault("dashboard", cfg.dashboard)
    kw["scheduler_options"] = options
    return kw


def _batch_object(cfg: ClusterConfig, job_name: str, *, job_only: bool = False) -> Any:
    """A started SLURMCluster/PBSCluster, or with job_only its job object (nothing started)."""
    dask_jobqueue = _jobqueue()
    if dask_jobqueue is None:
        raise ClusterError(f"cluster.kind={cfg.kind!r} needs dask-jobqueue: pip install 'convert[cluster]'")
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[cfg.kind]
    kw = jobqueue_kwargs(cfg, job_name)
    try:
        if job_only:  # what JobQueueCluster.job_script() renders, without starting a scheduler
            del kw["scheduler_options"]
            return cls.job_cls(SCHEDULER_PLACEHOLDER, name=f"{job_name}-worker", **kw)
        return cls(**kw)
    except ValueError as exc:
        if "cores and memory" not in str(exc):
            raise
        raise ClusterError(
            f"cluster.kind={cfg.kind}: set cluster.cores and cluster.memory (e.g. --set cluster.cores=4 --set "
            f"cluster.memory=16GB) or jobqueue.{cfg.kind}.cores/memory in ~/.config/dask/jobqueue.yaml"
        ) from None


def job_script(cfg: ClusterConfig, *, job_name: str = "convert") -> str:
    """The batch script dask-jobqueue would submit for `cfg`; nothing is started or submitted."""
    if cfg.kind not in _BATCH:
        raise ClusterError(f"job_script needs cluster.kind slurm or pbs, not {cfg.kind!r}")
    return str(_batch_object(cfg, job_name, job_only=True).job_script())


@contextmanager
def _open_batch(cfg: ClusterConfig, job_name: str, worker_timeout: float) -> Iterator[ClusterHandle]:
    submit, status_cmd, _ = _BATCH[cfg.kind]
    if shutil.which(submit) is None:
        raise ClusterError(
            f"cluster.kind={cfg.kind}: `{submit}` is not on PATH; run on a login node of the batch system "
            f"(or for a one-node test cluster: sudo bash cluster/slurm/setup-single-node.sh)"
        )
    cluster = _batch_object(cfg, job_name)
    client = None
    try:
        client = Client(cluster)
        _submit_jobs(cluster, cfg)
        jobs = _plural(cfg.jobs, "job")
        handle = _make_handle(cfg, client, f"{type(cluster).__name__} {jobs}", cluster=cluster, shared=True)
        _wait_for_batch_worker(handle, status_cmd, worker_timeout)
        yield handle
    finally:
        _close_batch(cluster, client)


def _submit_jobs(cluster: Any, cfg: ClusterConfig) -> None:
    """scale(jobs=N) and wait until the submit commands ran, so a rejected job fails fast."""

    async def scale_and_wait() -> None:
        cluster.scale(jobs=cfg.jobs)  # queues SpecCluster._correct_state on the loop...
        await cluster._correct_state()  # ...which this call creates first and awaits (same task)

    try:
        cluster.sync(scale_and_wait)
    except RuntimeError as exc:
        for job in list(getattr(cluster, "_created", ())):  # never submitted: let close() skip them
            if job.job_id is None and job.status == Status.created:
                job.status = Status.failed
        stderr = [ln for ln in str(exc).partition("stderr:")[2].splitlines() if ln.strip()]
        raise ClusterError(  # first line stands alone (CLIs may print only that); details follow
            f"submitting {cfg.kind} jobs failed: {stderr[-1].strip() if stderr else exc}; fix cluster.queue/"
            f"account/walltime/job_extra (or jobqueue.{cfg.kind}.* in dask's config)"
            f"\n{exc}\nJob script:\n{cluster.job_script()}"
        ) from None


def _wait_for_batch_worker(handle: ClusterHandle, status_cmd: str, timeout: float) -> None:
    try:
        handle.client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        ids = handle.job_ids
        status = _run_quiet([status_cmd, *(["-j", ",".join(ids)] if status_cmd == "squeue" and ids else ids)])
        raise ClusterError(
            f"no Dask worker joined {handle.description} within {timeout:g}s (job ids: {', '.join(ids) or 'none'}); "
            f"if pending, wait longer: export {WORKER_TIMEOUT_ENV}=3600; if failed, read the job output files "
            f"(slurm-<id>.out / <name>.o<id> in the submit directory or jobqueue log-directory)"
            f"\n`{status_cmd}` says:\n{status}\nJob script:\n{handle.cluster.job_script()}"
        ) from None


def _run_quiet(cmd: list[str]) -> str:
    """Run a status command for an error message: its output, or why it could not run."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({' '.join(cmd)} failed: {exc})"
    return (p.stdout + p.stderr).strip() or f"(no output, exit code {p.returncode})"


def _close_batch(cluster: Any, client: Client | None) -> None:
    """Cancel our jobs (scale to 0 runs scancel/qdel), then close the client and the scheduler."""
    try:
        cluster.scale(0)
        cluster.sync(cluster._correct_state)
    except Exception as exc:  # keep the caller's exception; close() below retries the cancel
        logger.warning("scaling %s down failed: %s", type(cluster).__name__, exc)
    if client is not None:
        client.close()
    cluster.close()
