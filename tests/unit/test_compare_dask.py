"""``compare`` and ``sweep`` on Dask give the serial run's results: results.json (and
results.csv, and the sweep's JSON and CSV) identical apart from timings, serially, on a
LocalCluster (``--workers 2``) and on a real ``dask scheduler`` with two ``dask worker``
processes started here on 127.0.0.1 (one cluster for the module, stopped after). Small runs:
two routes, two variants, a short batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastmmio.cli import main

pytest.importorskip("distributed")
from dask_cluster import real_cluster  # noqa: E402

TIMING_KEYS = {"timings_s", "wall_s", "host_ns_per_notification", "seconds"}
COMPARE = ["compare", "--no-kvm", "--no-review", "--variants", "upstream,rfc-2015", "-n", "16",
           "pio-eventfd-len1", "mmio-eventfd-len0"]
SWEEP = ["sweep", "--param", "ioeventfds", "--values", "0,8", "--routes",
         "pio-eventfd-len1,mmio-eventfd-len0", "--variants", "upstream", "-n", "16"]


def without_timings(doc):
    if isinstance(doc, dict):
        return {k: without_timings(v) for k, v in doc.items() if k not in TIMING_KEYS}
    if isinstance(doc, list):
        return [without_timings(v) for v in doc]
    return doc


@pytest.fixture(scope="module")
def cluster():
    with real_cluster(2) as c:
        yield c


def run(argv: list[str], out: Path) -> dict[str, object]:
    assert main([*argv, "--out", str(out)]) == 0
    files = {}
    for p in sorted(out.iterdir()):
        if p.suffix == ".json":
            files[p.name] = without_timings(json.loads(p.read_text()))
        elif p.suffix == ".csv":
            files[p.name] = p.read_text()
    assert files
    return files


def test_compare_serial_local_cluster_and_real_cluster_agree(cluster, tmp_path, monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    serial = run([*COMPARE, "--workers", "0"], tmp_path / "serial")
    local = run([*COMPARE, "--workers", "2"], tmp_path / "local")
    remote = run([*COMPARE, "--scheduler", cluster.address], tmp_path / "remote")
    assert serial["results.json"]["simulated"], "nothing simulated"
    assert local == serial
    assert remote == serial


def test_sweep_on_the_real_cluster_agrees(cluster, tmp_path, monkeypatch):
    serial = run([*SWEEP, "--workers", "0"], tmp_path / "serial")
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.address)  # the environment's address
    remote = run(SWEEP, tmp_path / "remote")
    assert remote == serial


def test_the_workers_did_the_simulations(cluster):
    """Not vacuous: on a cluster the simulations run in the worker processes."""
    from distributed import Client

    from fastmmio.compare.core import Comparison, sim_options
    from fastmmio.compare.parallel import prefill

    comparison = Comparison("skylake-sp", iterations=16)
    plan = [(r, sim_options(v)) for r in ("pio-eventfd-len1", "mmio-user") for v in ("upstream", "rfc-2015")]
    with Client(cluster.address, timeout=30, set_as_default=False) as client:
        assert prefill(comparison, plan, client) == 4
        assert prefill(comparison, plan, client) == 0  # all recorded
    assert all(comparison.simulated(r, o) for r, o in plan)
    assert comparison.timings.seconds["simulate"] > 0
