"""Fuzzing and the fleet bench on a real Dask cluster: a ``dask scheduler`` and two ``dask
worker`` processes started here on 127.0.0.1 (one cluster for the session, stopped after).

* ``fuzz hostile``: the same programs as the serial campaign (kinds and CPLs per program are
  fixed by the seed and index), each run once, with the workers' host records; a worker
  killed in the middle loses nothing that is not re-run (the runs add up to the request).
* ``fuzz diff``: every share comes back with its host record; cases add up.
* ``bench --scheduler``: one column per host, each host's record in the JSON.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from fastmmio.fuzz.cluster import diff_campaign, hostile_campaign
from fastmmio.fuzz.hostile import KINDS, generate
from fastmmio.fuzz.runner import DEFAULT_WATCHDOG_S, campaign

pytest.importorskip("distributed")

SEED = 1234


@pytest.fixture()
def cluster(dask_real_cluster):
    return dask_real_cluster


@pytest.fixture()
def client(cluster):
    from distributed import Client

    with Client(cluster.address, timeout=30, set_as_default=False) as c:
        yield c


def test_hostile_shares_add_up_to_the_serial_campaign(client):
    runs = 60
    summary, hosts = hostile_campaign(client, SEED, 0, KINDS, (3,), runs, None, "/dev/kvm",
                                      DEFAULT_WATCHDOG_S, share=10)
    serial = campaign((generate(SEED, i, KINDS, (3,)) for i in range(runs)), runs=runs,
                      leak_checks=False)
    assert summary.runs == serial.runs == runs
    assert {k: sum(c.values()) for k, c in summary.by_kind.items()} == \
        {k: sum(c.values()) for k, c in serial.by_kind.items()}
    assert summary.by_cpl == serial.by_cpl
    assert summary.ok, summary.lines()
    assert hosts and all(h["kvm_kind"] and h["hostname"] and h["worker"].startswith("tcp://127.0.0.1:")
                         for h in hosts)


def test_a_killed_worker_loses_only_what_is_rerun(cluster, client):
    victim = cluster.add_worker()  # the session's two workers stay
    runs = 300
    done: list[int] = []
    result: dict = {}

    def go() -> None:
        result["out"] = hostile_campaign(client, SEED, 0, KINDS, (3,), runs, None, "/dev/kvm",
                                         DEFAULT_WATCHDOG_S, share=10,
                                         on_share=lambda n, s, h: done.append(n))

    t = threading.Thread(target=go)
    t.start()
    deadline = time.monotonic() + 120
    while not done and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done, "no share finished"
    cluster.kill_worker(victim)  # mid-campaign: its current share is rescheduled
    t.join(timeout=300)
    assert not t.is_alive()
    summary, hosts = result["out"]
    assert summary.runs == runs and summary.lost == 0, summary.lines()
    assert sum(summary.outcomes.values()) == runs


def test_diff_shares_come_back_with_host_records(client):
    camp = diff_campaign(client, SEED, 12, 120.0, "/dev/kvm", "host", 8, share=4)
    s = camp.summary
    assert s.cases + s.excluded == 12 and not camp.lost
    assert camp.hosts and all(h["cpu_model"] for h in camp.hosts)
    for sig in s.first:
        assert camp.found_on[sig]["worker"].startswith("tcp://127.0.0.1:")


def test_fleet_bench_one_column_per_host(cluster, tmp_path, capsys):
    from fastmmio.cli import main

    out = tmp_path / "fleet.json"
    rc = main(["bench", "--scheduler", cluster.address, "--hosts", "127.0.0.1", "-n", "256",
               "--runs", "2", "--seconds", "5", "--json", str(out), "pio-eventfd-len1", "mmio-user"])
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads(out.read_text())
    assert len(doc["hosts"]) == 1  # two workers, one host: one column
    h = doc["hosts"][0]
    assert h["host"]["kvm_kind"] and h["worker"].startswith("tcp://127.0.0.1:")
    assert [r["route"] for r in h["results"]] == ["pio-eventfd-len1", "mmio-user"]
    assert all(r["cycles"] > 0 and r["correct"] for r in h["results"])
    assert "pio-eventfd-len1" in text and h["hostname"] in text


@pytest.mark.parametrize("command", ["hostile", "diff"])
def test_a_worker_without_kvm_is_one_line(cluster, command, capsys):
    """A worker whose host has no usable device ends the campaign with one line naming the
    host, exit status 2 (not a lost case per share)."""
    from fastmmio.fuzz.cli import main

    argv = [command, "--scheduler", cluster.address, "--device", "/nonexistent/kvm"]
    argv += ["--runs", "5"] if command == "hostile" else ["--examples", "5", "--seconds", "30"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "worker on " in err[0] and "/nonexistent/kvm" in err[0], err
