"""Plots of cycle breakdowns and sweeps (fastmmio.report.plots): files are written, real
PNG/SVG, non-empty; bad input is a UsageError."""

from __future__ import annotations

import pytest

from fastmmio.costs import CostModel
from fastmmio.errors import UsageError
from fastmmio.report.plots import plot_breakdown, plot_sweep, sweep_series
from fastmmio.result import RunResult


def result(route, backend, cycles, breakdown=None):
    return RunResult(route=route, backend=backend, cycles=cycles, cycles_spread=(cycles, cycles),
                     iterations=1000, eventfd_signals=0, user_exits=0, correct=True,
                     breakdown=breakdown or {})


def priced(route, events, backend="sim:upstream", profile="skylake-sp"):
    p = CostModel(profile).cost(events)
    return result(route, backend, p.cycles, p.breakdown)


@pytest.fixture
def results():
    return [
        priced("pio-eventfd-len1", {"exit.IO_INSTRUCTION": 1, "kvm.handler.io": 1,
                                    "kvm.bus.lookup.KVM_PIO_BUS": 1, "kvm.bus.probe": 5,
                                    "kvm.eventfd.signal": 1, "kvm.skip.vmcs_length": 1,
                                    "guest.insn": 3}),
        priced("mmio-eventfd-len0", {"exit.EPT_MISCONFIG": 1, "kvm.handler.ept_misconfig": 1,
                                     "kvm.bus.lookup.KVM_FAST_MMIO_BUS": 1, "kvm.bus.probe": 2,
                                     "kvm.eventfd.signal": 1, "kvm.skip.vmcs_length": 1,
                                     "guest.insn": 3, "walk.served.l1": 2}),
        result("pio-eventfd-len1", "kvm", 1800.0),
    ]


def check_files(paths, stem):
    assert [p.suffix for p in paths] == [".png", ".svg"]
    png, svg = paths
    assert png.name == f"{stem}.png" and svg.name == f"{stem}.svg"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 1000
    text = svg.read_text()
    assert "<svg" in text and len(text) > 1000
    return text


def test_breakdown_png_and_svg(tmp_path, results):
    paths = plot_breakdown(results, tmp_path / "breakdown", title="doorbells")
    svg = check_files(paths, "breakdown")
    assert "measured on KVM" in svg  # the legend entry of the real-KVM marker
    assert "eventfd" in svg and "exit" in svg


def test_breakdown_without_kvm_results_has_no_marker(tmp_path, results):
    svg = check_files(plot_breakdown(results[:2], tmp_path / "b.svg"), "b")
    assert "measured on KVM" not in svg


def test_breakdown_labels_backends_when_several(tmp_path, results):
    more = results + [priced("pio-eventfd-len1", {"exit.IO_INSTRUCTION": 1}, "sim:rfc")]
    svg = check_files(plot_breakdown(more, tmp_path / "b"), "b")
    assert "sim:rfc" in svg


def test_breakdown_rejects_bad_input(tmp_path, results):
    with pytest.raises(UsageError, match="no simulated result"):
        plot_breakdown([results[2]], tmp_path / "x")
    with pytest.raises(UsageError, match="no cycle breakdown"):
        plot_breakdown([result("r", "sim:upstream", 5.0)], tmp_path / "x")
    with pytest.raises(UsageError, match="unknown breakdown component"):
        plot_breakdown([result("r", "sim:upstream", 5.0, {"exits": 5.0})], tmp_path / "x")
    with pytest.raises(UsageError, match="unknown plot format"):
        plot_breakdown(results, tmp_path / "x", formats=("pdf",))
    with pytest.raises(UsageError, match="does not exist"):
        plot_breakdown(results, tmp_path / "missing" / "x")


def test_sweep_png_and_svg(tmp_path):
    points = []
    for devices in (1, 4, 16, 64):
        events = {"exit.EPT_MISCONFIG": 1, "kvm.bus.lookup.KVM_FAST_MMIO_BUS": 1,
                  "kvm.bus.probe": devices.bit_length() + 1, "kvm.eventfd.signal": 1}
        points.append((devices, [priced("mmio-eventfd-len0", events),
                                 priced("pio-eventfd-len1", dict(events), "sim:upstream")]))
    series = sweep_series(points)
    assert list(series) == ["mmio-eventfd-len0", "pio-eventfd-len1"]
    assert [x for x, _ in series["mmio-eventfd-len0"]] == [1, 4, 16, 64]
    ys = [y for _, y in series["mmio-eventfd-len0"]]
    assert ys == sorted(ys) and ys[0] < ys[-1]  # more devices, more probes, more cycles
    svg = check_files(plot_sweep(points, tmp_path / "sweep", parameter="devices on the bus",
                                 logx=True), "sweep")
    assert "devices on the bus" in svg


def test_sweep_from_series_mapping(tmp_path):
    paths = plot_sweep({"a": [(1, 10.0), (2, 20.0)]}, tmp_path / "s", parameter="p")
    check_files(paths, "s")
    with pytest.raises(UsageError, match="nothing to plot"):
        plot_sweep({}, tmp_path / "s", parameter="p")
