"""A real Dask cluster for the tests: a ``dask scheduler`` and ``dask worker`` processes
started from this virtual environment on 127.0.0.1 (never another address), each with a
bounded start-up wait, all stopped (by their PIDs) when the ``with`` block ends.

Workers run without a nanny, so that killing a worker's PID kills the worker itself (the
fuzz tests kill one to show that only its current task is re-run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90.0  # a loaded 2-core machine starts a worker in ~5-10 s


class RealCluster:
    def __init__(self, address: str, scheduler: subprocess.Popen, workers: list[subprocess.Popen],
                 start_worker):
        self.address = address
        self.scheduler = scheduler
        self.workers = workers
        self._start_worker = start_worker

    def add_worker(self) -> int:
        """Start one more worker (stopped with the cluster); its index in ``workers``."""
        self.workers.append(self._start_worker())
        _wait_workers(self.address, sum(1 for w in self.workers if w.poll() is None),
                      time.monotonic() + START_TIMEOUT_S)
        return len(self.workers) - 1

    def kill_worker(self, i: int) -> None:
        p = self.workers[i]
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=20)


def _wait_workers(address: str, n: int, deadline: float) -> None:
    from distributed import Client

    with Client(address, timeout=30, set_as_default=False) as client:
        client.wait_for_workers(n, timeout=max(1.0, deadline - time.monotonic()))


@contextmanager
def real_cluster(n_workers: int = 2) -> Iterator[RealCluster]:
    """``dask scheduler`` + ``n_workers`` x ``dask worker --nthreads 1 --no-nanny``."""
    tmp = Path(tempfile.mkdtemp(prefix="fastmmio-dask-"))
    sched_file = tmp / "scheduler.json"
    # The workers import tasks defined in test modules by name (as pytest imports them).
    tests = Path(__file__).resolve().parent
    path = [str(tests), str(tests / "unit"), str(tests / "kvm")]
    env = dict(os.environ, DASK_DISTRIBUTED__WORKER__DAEMON="False",
               PYTHONPATH=os.pathsep.join(path + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    log = open(tmp / "log", "w")
    procs: list[subprocess.Popen] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        sched = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                  "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
                                  "--scheduler-file", str(sched_file)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.append(sched)
        while not sched_file.exists() or not sched_file.read_text().strip():
            if sched.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start: {(tmp / 'log').read_text()[-2000:]}")
            time.sleep(0.1)
        time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:"), address
        def start_worker() -> subprocess.Popen:
            w = subprocess.Popen([str(BIN / "dask"), "worker", "--scheduler-file", str(sched_file),
                                  "--nthreads", "1", "--host", "127.0.0.1", "--no-nanny",
                                  "--no-dashboard", "--dashboard-address", "127.0.0.1:0"],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
            procs.append(w)
            return w

        workers = [start_worker() for _ in range(n_workers)]
        _wait_workers(address, n_workers, deadline)
        yield RealCluster(address, sched, workers, start_worker)
    finally:
        for p in reversed(procs):
            _stop(p)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
