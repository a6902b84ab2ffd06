"""fastmmio.fanout on the session's real Dask cluster (a scheduler and two worker processes on
127.0.0.1, reached as ``--scheduler`` would; the LocalCluster path is exercised by
test_compare_dask.py):
ordered gathering whatever the finishing order, progress callbacks, a failing task cancelling
the rest, streams bounded by a window and a deadline, one task per host, and the option
parsing (bad addresses, an unreachable scheduler: one line, status 2)."""

from __future__ import annotations

import argparse
import os
import time

import pytest

from fastmmio import fanout
from fastmmio.errors import HostError, UsageError

distributed = pytest.importorskip("distributed")


def slow_square(x: int, delay: float = 0.0) -> int:
    # Later items finish first: the gathering must restore the items' order.
    time.sleep(delay * (5 - x % 5))
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    time.sleep(0.05)
    return x


def worker_pid() -> int:
    return os.getpid()


@pytest.fixture(scope="module")
def client(dask_real_cluster):
    with fanout.open_client(0, dask_real_cluster.address) as c:  # --scheduler ADDR
        yield c


def test_serial_path_is_a_plain_loop():
    seen = []
    assert fanout.map_ordered(None, slow_square, [1, 2, 3], on_done=lambda i, r: seen.append((i, r))) == [1, 4, 9]
    assert seen == [(0, 1), (1, 4), (2, 9)]
    with fanout.open_client(0) as c:
        assert c is None


def test_map_ordered_keeps_the_items_order(client):
    seen = []
    out = fanout.map_ordered(client, slow_square, list(range(10)), delay=0.02,
                             on_done=lambda i, r: seen.append(i))
    assert out == [x * x for x in range(10)]
    assert sorted(seen) == list(range(10))


def test_tasks_run_in_other_processes(client):
    pids = set(fanout.map_ordered(client, lambda _x: os.getpid(), list(range(8))))
    assert os.getpid() not in pids


def test_a_failing_task_raises_its_error(client):
    with pytest.raises(ValueError, match="three"):
        fanout.map_ordered(client, fail_on_three, list(range(8)))


def test_stream_window_and_errors(client):
    done = list(fanout.stream(client, fail_on_three, iter(range(7)), window=2))
    assert sorted(d.index for d in done) == list(range(7))
    errors = [d for d in done if d.error is not None]
    assert [d.item for d in errors] == [3] and isinstance(errors[0].error, ValueError)
    assert sorted(d.result for d in done if d.error is None) == [0, 1, 2, 4, 5, 6]


def test_stream_stops_submitting_at_the_deadline(client):
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    t0 = time.monotonic()
    done = list(fanout.stream(client, slow_square, endless(), window=2, deadline=t0 + 1.0, delay=0.02))
    assert done and time.monotonic() - t0 < 30
    assert sorted(d.index for d in done) == list(range(len(done)))  # no index skipped


def test_on_each_host_runs_once_per_host(client):
    out = fanout.on_each_host(client, worker_pid)
    assert list(out) == ["127.0.0.1"]  # two workers, one host
    with pytest.raises(UsageError, match="no worker on host 'elsewhere'"):
        fanout.on_each_host(client, worker_pid, hosts=["elsewhere"])


@pytest.mark.parametrize("text", ["localhost:8786", "tcp://h", "tcp://h:0", "tcp://h:70000", "http://h:1"])
def test_bad_scheduler_addresses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        fanout.scheduler_address(text)


def test_environment_address_is_checked(monkeypatch):
    monkeypatch.setenv(fanout.SCHEDULER_ENV, "nonsense")
    with pytest.raises(UsageError, match="DASK_SCHEDULER_ADDRESS"):
        fanout.resolve(0, None)
    monkeypatch.setenv(fanout.SCHEDULER_ENV, "tcp://127.0.0.1:8786")
    assert fanout.resolve(0, None) == (0, "tcp://127.0.0.1:8786")
    assert fanout.resolve(3, "tcp://127.0.0.1:9") == (3, "tcp://127.0.0.1:9")


def test_unreachable_scheduler_is_a_host_error(monkeypatch):
    monkeypatch.setattr(fanout, "CONNECT_TIMEOUT_S", 1.0)
    with pytest.raises(HostError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        with fanout.open_client(0, "tcp://127.0.0.1:9"):
            pass


@pytest.mark.parametrize("argv", [["--workers", "-1"], ["--workers", "x"], ["--scheduler", "127.0.0.1:1"]])
def test_fuzz_options_reject_bad_values(argv, capsys):
    from fastmmio.fuzz.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["hostile", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("--workers" in err or "--scheduler" in err), err


def test_resource_tracker_leak_report_is_silenced_in_the_processes_it_starts():
    """After a Ctrl-C the cluster's resource tracker reports the stopped workers' semaphores
    as leaked (and removes them): a second stderr line after the command's one line. The
    filter travels on the command line multiprocessing gives its processes."""
    import subprocess
    import sys
    from multiprocessing import util

    from fastmmio import fanout

    saved = list(sys.warnoptions)
    try:
        fanout._quiet_resource_tracker()
        fanout._quiet_resource_tracker()  # (once is enough: not added twice)
        args = util._args_from_interpreter_flags()
    finally:
        sys.warnoptions[:] = saved
    assert args.count("-W" + fanout._TRACKER_FILTER) == 1
    code = ("import warnings; warnings.warn('resource_tracker: There appear to be 1 leaked "
            "semaphore objects to clean up at shutdown', UserWarning); "
            "warnings.warn('another warning', UserWarning)")
    r = subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True)
    assert "leaked semaphore" not in r.stderr and "another warning" in r.stderr
