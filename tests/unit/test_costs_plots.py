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


# ------------------------------------------------------------------------------------------
# pictures that answer (issue 13, point 5): structure of the figures
# ------------------------------------------------------------------------------------------

from matplotlib.patches import Rectangle  # noqa: E402

from fastmmio.report.plots import (  # noqa: E402
    HeadlineBar,
    breakdown_figure,
    headline_figure,
    line_styles,
    plot_headline,
    powers_of_two,
    sweep_figure,
)


def test_userspace_routes_get_their_own_panel(results):
    user = priced("pio-user", {"exit.IO_INSTRUCTION": 1, "kvm.handler.io": 1,
                               "kvm.user_exit": 1, "guest.insn": 3})
    fig = breakdown_figure(results[:2] + [user])
    kernel, userspace = fig.axes
    assert [t.get_text() for t in kernel.get_xticklabels()] == ["pio-eventfd-len1",
                                                                "mmio-eventfd-len0"]
    assert [t.get_text() for t in userspace.get_xticklabels()] == ["pio-user"]
    # the in-kernel panel's scale is set by the in-kernel bars, not the userspace one:
    # a 50-cycle step is at least 1% of its height
    assert kernel.get_ylim()[1] <= 1.1 * max(r.cycles for r in results[:2]) + 1
    assert 50 / kernel.get_ylim()[1] >= 0.01
    assert userspace.get_ylim()[1] >= user.cycles
    # each bar's total is written on it
    assert f"{results[0].cycles:,.0f}" in [t.get_text() for t in kernel.texts]


def test_only_in_kernel_routes_make_one_panel(results):
    assert len(breakdown_figure(results).axes) == 1


def test_headline_has_the_band_the_pio_line_and_error_bars(tmp_path):
    bars = [HeadlineBar("RFC", "SDM max", 0.97, 0.9, 1.1), HeadlineBar("RFC", "none", 1.2),
            HeadlineBar("upstream", "SDM max", 2.5, 2.2, 2.9),
            HeadlineBar("upstream", "none", None)]
    fig = headline_figure(bars, 0.05)
    ax = fig.axes[0]
    band = [p for p in ax.patches if isinstance(p, Rectangle)
            and p.get_label().startswith("as fast as port I/O")]
    assert band, "the tolerance band is drawn"
    y0, y1 = band[0].get_y(), band[0].get_y() + band[0].get_height()
    assert y1 == pytest.approx(1.05) and y0 <= 0
    assert any(list(line.get_ydata()) == [1.0, 1.0] for line in ax.lines)  # PIO = 1
    # error bars: one container per setting with sampled intervals
    errs = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    assert len(errs) == 1  # only "SDM max" has intervals
    assert ax.get_ylim()[1] >= 2.9  # the highest interval is inside the axes
    assert "n/a" in [t.get_text() for t in ax.texts]
    check_files(plot_headline(bars, tmp_path / "headline", 0.05), "headline")


def test_no_two_lines_look_alike():
    styles = [tuple(s.values()) for s in line_styles(40)]
    assert len(set(styles)) == 40
    series = {f"route{i}": [(v, 100.0 * i + v) for v in (1, 2, 4, 8, 16)] for i in range(16)}
    ax = sweep_figure(series, parameter="devices").axes[0]
    drawn = {(ln.get_color(), ln.get_marker(), ln.get_linestyle()) for ln in ax.lines}
    assert len(ax.lines) == 16 and len(drawn) == 16


def test_powers_of_two_get_a_log2_axis():
    assert powers_of_two([1, 2, 4, 64]) and not powers_of_two([1, 2, 3]) \
        and not powers_of_two([2, 4])
    ax = sweep_figure({"r": [(v, v * 10.0) for v in (1, 4, 16, 64)]}, parameter="tlb").axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    ax = sweep_figure({"r": [(v, v * 10.0) for v in (1, 3, 5)]}, parameter="x").axes[0]
    assert ax.get_xscale() == "linear"


def test_named_values_get_a_categorical_axis_without_joining_lines():
    ticks = [(0.0, "none"), (1.0, "skylake-sp"), (2.0, "sdm-max")]
    ax = sweep_figure({"a": [(0, 10.0), (1, 8.0), (2, 5.0)], "b": [(0, 9.0), (2, 4.0)]},
                      parameter="caches", xticks=ticks).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["none", "skylake-sp", "sdm-max"]
    assert all(ln.get_linestyle() == "None" for ln in ax.lines)
    assert ax.get_xscale() == "linear"
