"""``compare`` and ``sweep`` on Dask give the serial run's results: results.json (and
results.csv, and the sweep's JSON and CSV) identical apart from timings, serially, on a
LocalCluster (``--workers 2``) and on a real ``dask scheduler`` with two ``dask worker``
processes started here on 127.0.0.1 (one cluster for the session, stopped after). Small runs:
two routes, two variants, a short batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastmmio.cli import main

pytest.importorskip("distributed")

# Timings, and the "run" record (when and with which command line: the runs differ there)
TIMING_KEYS = {"timings_s", "wall_s", "host_ns_per_notification", "seconds", "run"}
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


@pytest.fixture()
def cluster(dask_real_cluster):
    return dask_real_cluster


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


def test_user_variants_and_routes_on_the_clusters_agree(cluster, tmp_path, monkeypatch):
    """A --variant-file and a --routes-file reach the workers (a task carries its routes whole
    and the variant file's text), so a LocalCluster and a real cluster give the serial
    results; the registries of the workers are as they were after each task."""
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    examples = Path(__file__).resolve().parents[2] / "examples"
    argv = ["compare", "--no-kvm", "--no-review", "--variants", "upstream,rfc-writes-only",
            "-n", "16", "--variant-file", str(examples / "variants" / "rfc_writes_only.py"),
            "--routes-file", str(examples / "routes" / "mmio-virtio-notify.toml"),
            "mmio-virtio-notify", "mmio-eventfd-len0"]
    serial = run([*argv, "--workers", "0"], tmp_path / "serial")
    simulated = serial["results.json"]["simulated"]
    assert {r["extra"]["variant"] for r in simulated} >= {"rfc-writes-only"}
    assert {r["route"] for r in simulated} >= {"mmio-virtio-notify"}
    assert run([*argv, "--workers", "2"], tmp_path / "local") == serial
    assert run([*argv, "--scheduler", cluster.address], tmp_path / "remote") == serial

    def registered():
        from fastmmio.sim.kvm.variants import ALL_VARIANTS

        return sorted(ALL_VARIANTS)

    from distributed import Client

    with Client(cluster.address, set_as_default=False) as client:
        assert all("rfc-writes-only" not in names
                   for names in client.run(registered).values())


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


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        kids: list[str] = []
        try:  # children started by any thread of p (Dask starts workers from its loop thread)
            for task in Path(f"/proc/{p}/task").iterdir():
                kids += (task / "children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            out.add(k)
            todo.append(k)
    return out


def _ignores_sigint(pid: int) -> bool:
    import signal

    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGINT - 1) & 1)
    return False


def test_ctrl_c_cancels_the_cluster_and_leaves_no_output(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while a sweep runs
    on a LocalCluster: exit status 130, no output file, no worker process left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastmmio", "sweep", "--param", "ioeventfds", "--values",
           ",".join(str(i) for i in range(0, 50)), "--routes", "pio-eventfd-len1,mmio-eventfd-len0",
           "--variants", "upstream,rfc-2015", "-n", "16", "--workers", "2", "--out", str(out)]
    env = dict(os.environ)
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    try:
        # The CLI ignores SIGINT while the cluster starts (fanout._workers_ignore_sigint):
        # wait until it has done so and stopped, with both workers up.
        deadline = time.monotonic() + 120
        workers: set[int] = set()
        seen_ignored = False
        while time.monotonic() < deadline and proc.poll() is None:
            ignoring = _ignores_sigint(proc.pid)
            seen_ignored |= ignoring
            workers = _descendants(proc.pid)
            if seen_ignored and not ignoring and len(workers) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None and len(workers) >= 2, "the local cluster did not start"
        time.sleep(1.0)  # tasks running on the workers
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "fastmmio sweep: interrupted; nothing written"
    assert "Traceback" not in err, err  # the workers ignore the terminal's SIGINT
    assert not out.exists() or not any(out.iterdir())
    time.sleep(1.0)
    alive = [p for p in workers if Path(f"/proc/{p}").exists()
             and "zombie" not in Path(f"/proc/{p}/status").read_text()]
    assert not alive, f"worker processes left running: {alive}"
