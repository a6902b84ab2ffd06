"""Plots of results: cycle breakdowns per route (stacked bars) and parameter sweeps (lines).

Uses matplotlib's object API with the Agg canvas only (no pyplot, no global backend switch), so
it works headless and does not disturb a caller's own matplotlib state. Every function writes
one file per format (PNG and SVG by default) and returns their paths.

* :func:`plot_breakdown`: one stacked bar per simulated :class:`~fastmmio.result.RunResult`
  (its ``breakdown``: cycles per notification by component, in the cost model's component
  order), and, when results of backend ``"kvm"`` for the same route are given, a marker at
  the cycles measured on real KVM.
  Routes that exit to userspace (a ``userspace`` component) are drawn in a panel of their
  own, so the in-kernel doorbells keep a scale where a 50-cycle difference shows; each bar is
  labelled with its total.
* :func:`plot_headline`: the thread's question in one picture: each variant's doorbell as a
  multiple of the PIO ioeventfd under each machine setting (grouped bars), the tolerance band
  drawn, error bars from the sampled price sets when there are any.
* :func:`plot_sweep`: cycles per notification of each route against one parameter (e.g. the
  number of devices on the bus, the TLB size), one line per route (and backend): a
  categorical axis (markers, no joining lines) for named values, a log2 axis for powers of
  two, and a colour, marker and line style combination of its own for every line.

Each ``plot_*`` writes files; the ``*_figure`` function under it builds the matplotlib
:class:`~matplotlib.figure.Figure` (tests read its axes), and :func:`figure_svg` gives a
figure as SVG text (the HTML report inlines it).
"""

from __future__ import annotations

import io
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import warnings

# matplotlib imports its 3-D projection (mpl_toolkits.mplot3d) under `except Exception` and
# warns when that fails; the plots here are 2-D, and the only way it fails in this package's
# environment is a Ctrl-C landing in the middle of that import, when the warning would be a
# second, misleading line next to "interrupted".
warnings.filterwarnings("ignore", message="Unable to import Axes3D", category=UserWarning)

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib import rc_context  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fastmmio.costs.profile import COMPONENTS
from fastmmio.errors import UsageError
from fastmmio.outputs import target
from fastmmio.result import RunResult

FORMATS = ("png", "svg")

# One colour per component, stable across plots (matplotlib's tab10 order).
_COLOURS = dict(zip(COMPONENTS, (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
)))


def _outputs(out: str | Path, formats: Iterable[str]) -> list[Path]:
    formats = tuple(formats)
    if not formats:
        raise UsageError("no output format asked for (png, svg)")
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise UsageError(f"unknown plot format(s) {', '.join(bad)}; use {', '.join(FORMATS)}")
    out = Path(out)
    base = out.with_suffix("") if out.suffix.lstrip(".") in FORMATS else out
    if base.parent and not base.parent.exists():
        raise UsageError(f"cannot write plots: directory {base.parent} does not exist")
    return [base.with_name(f"{base.name}.{f}") for f in formats]


def _save(fig: Figure, paths: list[Path]) -> list[Path]:
    FigureCanvasAgg(fig)
    for p in paths:
        try:
            with target(p) as tmp:
                fig.savefig(tmp, format=p.suffix.lstrip("."), bbox_inches="tight")
        except OSError as exc:
            raise UsageError(f"cannot write plot {p}: {exc.strerror or exc}") from None
    return paths


def _is_kvm(r: RunResult) -> bool:
    return r.backend == "kvm"


def save_figure(fig: Figure, out: str | Path, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Write a figure built by one of the ``*_figure`` functions, one file per format."""
    return _save(fig, _outputs(out, formats))


def figure_svg(fig: Figure) -> str:
    """The figure as SVG text (no XML prologue), for inlining in HTML."""
    FigureCanvasAgg(fig)
    buf = io.StringIO()
    # text as <text> (not glyph paths: two figures in one page would share glyph ids), ids
    # salted per figure, and no RDF metadata block
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": f"fastmmio-{id(fig)}"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    return text[text.index("<svg"):]


# Line styles: colour i % 10, marker i % 10 shifted by i // 10, and a dash pattern per round
# of ten, so that no two of up to 40 lines share all three.
_LINE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                 "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
_DASHES = ("-", "--", ":", "-.")


def line_styles(n: int) -> list[dict[str, str]]:
    """``n`` distinct (colour, marker, line style) combinations."""
    out = []
    for i in range(n):
        k = i // len(_LINE_COLOURS)
        out.append({"color": _LINE_COLOURS[i % len(_LINE_COLOURS)],
                     "marker": _MARKERS[(i + k) % len(_MARKERS)],
                     "linestyle": _DASHES[k % len(_DASHES)]})
    return out


def powers_of_two(values: Iterable[float]) -> bool:
    """Whether the values are at least three distinct positive powers of two (a log2 axis)."""
    vs = sorted(set(values))
    return len(vs) >= 3 and all(v > 0 and math.log2(v).is_integer() for v in vs)


def _userspace(r: RunResult) -> bool:
    return bool(r.breakdown.get("userspace"))


def _bars(ax, sims: Sequence[RunResult], used: Sequence[str],
          measured: Mapping[str, list[float]], labels: Sequence[str], marked: bool) -> bool:
    xs = range(len(sims))
    bottom = [0.0] * len(sims)
    for comp in used:
        vals = [r.breakdown.get(comp, 0.0) for r in sims]
        ax.bar(xs, vals, bottom=bottom, color=_COLOURS[comp], label=comp, width=0.7)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for x, total in zip(xs, bottom):
        ax.annotate(f"{total:,.0f}", (x, total), ha="center", va="bottom", fontsize=7,
                    xytext=(0, 2), textcoords="offset points")
    for x, r in zip(xs, sims):
        for cyc in measured.get(r.route, []):
            ax.plot([x], [cyc], marker="D", color="black", markersize=7, linestyle="none",
                    label=None if marked else "measured on KVM")
            marked = True
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, max(bottom + [c for r in sims for c in measured.get(r.route, [])]) * 1.1)
    ax.grid(axis="y", alpha=0.3)
    return marked


def breakdown_figure(results: Sequence[RunResult], *, title: str | None = None,
                     ylabel: str = "cycles per notification") -> Figure:
    """The figure of :func:`plot_breakdown`."""
    sims = [r for r in results if not _is_kvm(r)]
    if not sims:
        raise UsageError("plot_breakdown: no simulated result (with a breakdown) to plot")
    for r in sims:
        if not r.breakdown:
            raise UsageError(f"result {r.route} [{r.backend}] has no cycle breakdown")
        unknown = set(r.breakdown) - set(COMPONENTS)
        if unknown:
            raise UsageError(f"result {r.route} [{r.backend}]: unknown breakdown component(s) "
                             f"{', '.join(sorted(unknown))}")
    measured: dict[str, list[float]] = {}
    for r in results:
        if _is_kvm(r):
            measured.setdefault(r.route, []).append(r.cycles)
    several = len({r.backend for r in sims}) > 1
    used = [c for c in COMPONENTS if any(r.breakdown.get(c, 0.0) for r in sims)]
    groups = [g for g in ([r for r in sims if not _userspace(r)],
                          [r for r in sims if _userspace(r)]) if g]
    names = (["in-kernel doorbells (KVM answers without leaving the kernel)",
              "exits to userspace"] if len(groups) == 2 else [None])
    fig = Figure(figsize=(max(6.0, 0.9 * len(sims) + 3.5), 4.8))
    axes = fig.subplots(1, len(groups), squeeze=False,
                        gridspec_kw={"width_ratios": [max(len(g), 1.5) for g in groups]})[0]
    marked = False
    for ax, group, name in zip(axes, groups, names):
        labels = [f"{r.route}\n[{r.backend}]" if several else r.route for r in group]
        marked = _bars(ax, group, used, measured, labels, marked)
        if name:
            ax.set_title(name, fontsize=9)
    axes[0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title, fontsize=10)
    handles, labels = {}, {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    axes[-1].legend(list(handles.values()), list(handles), fontsize=8, loc="upper left",
                    bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_breakdown(results: Sequence[RunResult], out: str | Path, *, title: str | None = None,
                   formats: Iterable[str] = FORMATS, ylabel: str = "cycles per notification"
                   ) -> list[Path]:
    """Stacked bars of each simulated result's cycle breakdown; a marker per route where a
    real-KVM result (backend ``"kvm"``) of the same route is given.

    Bars are in the order the results come, in-kernel routes in one panel and routes that
    exit to userspace in another (each with its own scale); a bar is labelled with the route,
    and with the backend too when more than one simulated backend is plotted. Components that
    are zero in every bar are left out of the legend. ``out`` is the file name without (or
    with) suffix; one file per format is written.
    """
    paths = _outputs(out, formats)
    return _save(breakdown_figure(results, title=title, ylabel=ylabel), paths)


@dataclass(frozen=True)
class HeadlineBar:
    """One doorbell under one machine setting: its ratio to the same setting's PIO
    ioeventfd, and the sampled 90% interval of that ratio when there is one."""

    doorbell: str  # the variant's label
    setting: str  # the machine setting's label
    ratio: float | None
    low: float | None = None
    high: float | None = None


def headline_figure(bars: Sequence[HeadlineBar], tolerance: float, *,
                    title: str | None = None) -> Figure:
    """The figure of :func:`plot_headline`."""
    if not bars:
        raise UsageError("plot_headline: nothing to plot")
    doors = list(dict.fromkeys(b.doorbell for b in bars))
    settings = list(dict.fromkeys(b.setting for b in bars))
    by = {(b.doorbell, b.setting): b for b in bars}
    width = 0.8 / len(settings)
    fig = Figure(figsize=(max(6.5, 1.1 * len(doors) + 3.0), 4.8))
    ax = fig.add_subplot()
    top = 1 + tolerance
    ax.axhspan(0, 1 + tolerance, color="#2ca02c", alpha=0.12, zorder=0,
               label=f"as fast as port I/O (within {tolerance:.0%})")
    ax.axhline(1.0, color="black", linewidth=1, zorder=1, label="PIO ioeventfd = 1")
    for j, (s, style) in enumerate(zip(settings, line_styles(len(settings)))):
        xs, ys, err, missing = [], [], [[], []], []
        for i, d in enumerate(doors):
            b = by.get((d, s))
            x = i - 0.4 + width * (j + 0.5)
            if b is None or b.ratio is None or math.isnan(b.ratio):
                missing.append(x)
                continue
            xs.append(x)
            ys.append(b.ratio)
            lo = b.low if b.low is not None else b.ratio
            hi = b.high if b.high is not None else b.ratio
            err[0].append(max(0.0, b.ratio - lo))
            err[1].append(max(0.0, hi - b.ratio))
            top = max(top, hi)
        has_err = any(err[0]) or any(err[1])
        ax.bar(xs, ys, width=width * 0.95, color=style["color"], label=s, zorder=2,
               yerr=err if has_err else None, capsize=3 if has_err else 0)
        for x in missing:
            ax.annotate("n/a", (x, 0.02), ha="center", va="bottom", fontsize=7, color="grey")
    ax.set_xticks(range(len(doors)))
    ax.set_xticklabels(doors, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("doorbell cycles / PIO ioeventfd cycles (same setting)")
    ax.set_ylim(0, top * 1.08)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_headline(bars: Sequence[HeadlineBar], out: str | Path, tolerance: float, *,
                  title: str | None = None, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Each variant's doorbell as a multiple of PIO under each machine setting (grouped
    bars), with the tolerance band and, when given, the sampled intervals as error bars."""
    paths = _outputs(out, formats)
    return _save(headline_figure(bars, tolerance, title=title), paths)


def sweep_series(points: Sequence[tuple[float, Sequence[RunResult]]]
                 ) -> "OrderedDict[str, list[tuple[float, float]]]":
    """Group sweep points (parameter value, results at that value) into one series per route
    (and backend, when a route has several): name -> [(value, cycles), ...] sorted by value."""
    backends: dict[str, set[str]] = {}
    for _, rs in points:
        for r in rs:
            backends.setdefault(r.route, set()).add(r.backend)
    series: OrderedDict[str, list[tuple[float, float]]] = OrderedDict()
    for value, rs in points:
        for r in rs:
            name = r.route if len(backends[r.route]) == 1 else f"{r.route} [{r.backend}]"
            series.setdefault(name, []).append((float(value), float(r.cycles)))
    for name in series:
        series[name].sort()
    return series


def sweep_figure(series: Mapping[str, Sequence[tuple[float, float]]], *, parameter: str,
                 title: str | None = None, logx: bool | None = None,
                 ylabel: str = "cycles per notification",
                 xticks: Sequence[tuple[float, str]] | None = None) -> Figure:
    """The figure of :func:`plot_sweep`. ``logx``: None chooses a log2 axis when the values
    are powers of two (:func:`powers_of_two`) and the axis is not categorical."""
    if not series or not any(series.values()):
        raise UsageError("plot_sweep: nothing to plot")
    categorical = bool(xticks)
    values = [p[0] for pts in series.values() for p in pts]
    if logx is None:
        logx = not categorical and powers_of_two(values)
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    for (name, pts), style in zip(series.items(), line_styles(len(series))):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, markersize=6,
                color=style["color"], marker=style["marker"],
                linestyle="none" if categorical else style["linestyle"])
    if logx:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(values)))
        ax.set_xticklabels([f"{v:g}" for v in sorted(set(values))])
    if categorical:
        ax.set_xticks([float(x) for x, _ in xticks])
        ax.set_xticklabels([label for _, label in xticks])
        ax.set_xlim(min(x for x, _ in xticks) - 0.5, max(x for x, _ in xticks) + 0.5)
    ax.set_xlabel(parameter + (" (log2 scale)" if logx else ""))
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    return fig


def plot_sweep(points: Sequence[tuple[float, Sequence[RunResult]]] | Mapping[
        str, Sequence[tuple[float, float]]], out: str | Path, *, parameter: str,
        title: str | None = None, formats: Iterable[str] = FORMATS, logx: bool | None = None,
        ylabel: str = "cycles per notification",
        xticks: Sequence[tuple[float, str]] | None = None) -> list[Path]:
    """Cycles per notification of each route against one ``parameter``.

    ``points`` is either a sequence of ``(parameter value, [RunResult, ...])`` or a mapping
    series name -> ``[(value, cycles), ...]`` (see :func:`sweep_series`). ``xticks``: labels
    for a categorical parameter (``(position, label)``; e.g. cache configurations at 0, 1, 2):
    its points are drawn as markers, not joined. ``logx``: None for automatic (log2 for
    powers of two).
    """
    paths = _outputs(out, formats)
    series = dict(points) if isinstance(points, Mapping) else sweep_series(points)
    return _save(sweep_figure(series, parameter=parameter, title=title, logx=logx,
                              ylabel=ylabel, xticks=xticks), paths)
