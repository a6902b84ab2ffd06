"""``fastmmio bench`` end to end on this host's KVM."""

from __future__ import annotations

import json

from fastmmio.bench import BenchOptions, measure_route
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
