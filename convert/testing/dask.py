"""Real `dask scheduler` / `dask worker` processes on 127.0.0.1 for tests and benchmarks.

with DaskProcesses(workers=2, tmp=tmp_path) as dp:
    dp.address                      # tcp://127.0.0.1:PORT
    dp.worker_pids()                # the worker processes (children of the nannies)
    dp.kill_worker()                # SIGKILL one worker process; its nanny restarts it
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil


class DaskProcesses:
    """A scheduler and N nanny-managed workers as separate OS processes, torn down on exit."""

    def __init__(
        self,
        tmp: str | os.PathLike[str],
        workers: int = 2,
        worker_args: tuple[str, ...] = ("--nthreads", "1"),
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.tmp = Path(tmp)
        self.n_workers = workers
        self.worker_args = worker_args
        self.env = {**os.environ, **(env or {})}
        self.timeout = timeout
        self.scheduler_file = self.tmp / "scheduler.json"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.address = ""

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.procs.append(proc)
        return proc

    def start(self) -> "DaskProcesses":
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._spawn(
            [
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--dashboard-address",
                ":0",
                "--scheduler-file",
                str(self.scheduler_file),
            ],
            "scheduler",
        )
        deadline = time.monotonic() + self.timeout
        while not self.scheduler_file.exists():
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                self.stop()
                raise RuntimeError(f"dask scheduler did not start; see {self.tmp / 'scheduler.log'}")
            time.sleep(0.1)
        time.sleep(0.2)  # the file is written before it is complete on some versions
        self.address = json.loads(self.scheduler_file.read_text())["address"]
        for i in range(self.n_workers):
            self._spawn(
                [
                    "distributed.cli.dask_worker",
                    self.address,
                    "--host",
                    "127.0.0.1",
                    "--name",
                    f"w{i}",
                    "--local-directory",
                    str(self.tmp / f"w{i}"),
                    *self.worker_args,
                ],
                f"worker{i}",
            )
        self.wait_for_workers(self.n_workers)
        return self

    def wait_for_workers(self, n: int) -> None:
        from distributed import Client

        with Client(self.address, timeout=self.timeout) as client:
            client.wait_for_workers(n, timeout=self.timeout)

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes (the nanny's children), not the nannies."""
        pids = []
        for nanny in self.procs[1:]:
            try:
                pids += [c.pid for c in psutil.Process(nanny.pid).children() if "python" in c.name()]
            except psutil.NoSuchProcess:
                continue
        return pids

    def kill_worker(self, index: int = 0) -> int:
        pid = self.worker_pids()[index]
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()

    def __enter__(self) -> "DaskProcesses":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
