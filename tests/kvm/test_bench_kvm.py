"""``fastmmio bench`` end to end on this host's KVM."""

from __future__ import annotations

import json
import os

from fastmmio.bench import BenchOptions, bench_routes, measure_route
from fastmmio.cli import main
from fastmmio.real.backend import RealBackend
from fastmmio.routes import get_route


def test_bench_cli_kut_format_and_json(kvm_device, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    status = main(["bench", "--device", kvm_device, "-n", "100", "-r", "2", "--format", "kut",
                   "--json", str(out_json), "pio-user", "mmio-eventfd-len0", "cpuid", "empty"])
    out, err = capsys.readouterr()
    assert status == 0, err
    lines = out.strip().splitlines()
    # kvm-unit-tests lines only for routes with a counterpart ("empty" has none).
    assert [line.split()[0] for line in lines] == [
        "portio-no-eventfd:pci-io", "mmio-wildcard-eventfd:pci-mem", "cpuid"]
    assert all(int(line.split()[1]) > 0 for line in lines)
    records = json.loads(out_json.read_text())
    host, results = records[0]["host"], records[1:]
    assert host["guest_cpl"] in (0, 3) and host["kvm_kind"]
    assert [r["route"] for r in results] == ["pio-user", "mmio-eventfd-len0", "cpuid", "empty"]
    assert all(r["correct"] and r["iterations"] == 100 and r["backend"] == "kvm" for r in results)
    assert results[1]["eventfd_signals"] == 100 and results[0]["user_exits"] == 100
    if "--cpl" not in err:
        assert f"guest CPL{host['guest_cpl']}" in err


def test_bench_cli_table(kvm_device, capsys):
    status = main(["bench", "--device", kvm_device, "-n", "50", "-r", "1", "mmio-user", "ro-read"])
    out, _ = capsys.readouterr()
    assert status == 0
    assert "mmio-user" in out and "ro-read" in out and "yes" in out


def test_calibration_on_real_kvm(kvm_device, guest_cpl):
    """Doubling from 64 stops at the first batch of at least the goal (x86/vmexit.c)."""
    target = 1 << 22
    r = measure_route(RealBackend(device=kvm_device), get_route("mmio-eventfd-len0"), guest_cpl,
                      BenchOptions(target_ticks=target, runs=2))
    assert r.correct, r.checks
    calib = r.extra["calibration"]
    assert calib[0][0] == 64
    assert calib[-1][1] >= target and all(t < target for _, t in calib[:-1])
    assert r.iterations == calib[-1][0]
    lo, hi = r.cycles_spread
    assert lo <= r.cycles <= hi


def test_real_measurement_reports_a_spread_and_a_verdict(kvm_device, guest_cpl):
    """The measuring rule on real KVM: routes interleaved, each with its runs, their spread
    and whether the median settled (whichever it is on this host today)."""
    routes = [get_route(n) for n in ("pio-eventfd-len1", "mmio-eventfd-len0", "cpuid")]
    order: list[str] = []
    results = bench_routes(RealBackend(device=kvm_device), routes, guest_cpl,
                           BenchOptions(target_ticks=1 << 22, runs=10, max_seconds=20),
                           on_batch=lambda r, phase, _b: order.append(r.name)
                           if phase == "run" else None)
    first_round = order[:3]
    assert first_round == [r.name for r in routes]  # run 1 of every route comes first
    for r in results:
        assert r.correct, r.checks
        s = r.spread
        assert s is not None and 1 <= s.runs <= 10
        assert s.runs >= 5 or s.stopped_by != "stable"  # the rule's minimum before "stable"
        assert s.runs == len(r.extra["runs_cycles"]) == order.count(r.route)
        assert s.min <= s.q1 <= s.median <= s.q3 <= s.max and s.median == r.cycles > 0
        assert s.ci_low <= s.median <= s.ci_high and s.ci_rel >= 0
        assert s.stable == (s.stopped_by == "stable") and s.reason and "confidence" in s.rule
        assert r.noisy == (not s.stable)


class _AffinityBackend(RealBackend):
    """Records the CPU mask of the thread that calls run_batch (which issues KVM_RUN)."""

    def __init__(self, device: str):
        super().__init__(device=device)
        self.seen: list[set[int]] = []

    def open(self, machine):
        session = super().open(machine)
        run = session.run_batch

        def run_batch(n):
            self.seen.append(os.sched_getaffinity(0))
            return run(n)

        session.run_batch = run_batch
        return session


def test_cpu_pins_the_thread_that_runs_kvm_run(kvm_device, guest_cpl):
    before = os.sched_getaffinity(0)
    cpu = max(before)
    backend = _AffinityBackend(kvm_device)
    r = measure_route(backend, get_route("mmio-eventfd-len0"), guest_cpl,
                      BenchOptions(iterations=200, runs=3, cpu=cpu))
    assert r.correct, r.checks
    assert backend.seen and all(mask == {cpu} for mask in backend.seen)
    assert os.sched_getaffinity(0) == before


def test_bench_cli_cpu_and_spread_columns(kvm_device, tmp_path, capsys):
    cpu = max(os.sched_getaffinity(0))
    out_json = tmp_path / "b.json"
    status = main(["bench", "--device", kvm_device, "--target-ticks", str(1 << 22), "-r", "6",
                   "--cpu", str(cpu), "--json", str(out_json), "cpuid", "mmio-eventfd-len0"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "median" in out and "IQR" in out and "confidence interval" in out
    records = json.loads(out_json.read_text())[1:]
    assert all(r["extra"]["cpu"] == cpu and r["spread"]["runs"] >= 2 for r in records)
