"""Plots of results: cycle breakdowns per route (stacked bars) and parameter sweeps (lines).

Uses matplotlib's object API with the Agg canvas only (no pyplot, no global backend switch), so
it works headless and does not disturb a caller's own matplotlib state. Every function writes
one file per format (PNG and SVG by default) and returns their paths.

* :func:`plot_breakdown`: one stacked bar per simulated :class:`~fastmmio.result.RunResult`
  (its ``breakdown``: cycles per notification by component, in the cost model's component
  order), and, when results of backend ``"kvm"`` for the same route are given, a marker at
  the cycles measured on real KVM.
* :func:`plot_sweep`: cycles per notification of each route against one parameter (e.g. the
  number of devices on the bus, the TLB size), one line per route (and backend).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import warnings

# matplotlib imports its 3-D projection (mpl_toolkits.mplot3d) under `except Exception` and
# warns when that fails; the plots here are 2-D, and the only way it fails in this package's
# environment is a Ctrl-C landing in the middle of that import, when the warning would be a
# second, misleading line next to "interrupted".
warnings.filterwarnings("ignore", message="Unable to import Axes3D", category=UserWarning)

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
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


def plot_breakdown(results: Sequence[RunResult], out: str | Path, *, title: str | None = None,
                   formats: Iterable[str] = FORMATS, ylabel: str = "cycles per notification"
                   ) -> list[Path]:
    """Stacked bars of each simulated result's cycle breakdown; a marker per route where a
    real-KVM result (backend ``"kvm"``) of the same route is given.

    Bars are in the order the results come; a bar is labelled with the route, and with the
    backend too when more than one simulated backend is plotted. Components that are zero in
    every bar are left out of the legend. ``out`` is the file name without (or with) suffix;
    one file per format is written.
    """
    paths = _outputs(out, formats)
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
    labels = [f"{r.route}\n[{r.backend}]" if several else r.route for r in sims]
    used = [c for c in COMPONENTS if any(r.breakdown.get(c, 0.0) for r in sims)]

    fig = Figure(figsize=(max(6.0, 0.9 * len(sims) + 2.5), 4.8))
    ax = fig.add_subplot()
    xs = range(len(sims))
    bottom = [0.0] * len(sims)
    for comp in used:
        vals = [r.breakdown.get(comp, 0.0) for r in sims]
        ax.bar(xs, vals, bottom=bottom, color=_COLOURS[comp], label=comp, width=0.7)
        bottom = [b + v for b, v in zip(bottom, vals)]
    marked = False
    for x, r in zip(xs, sims):
        for cyc in measured.get(r.route, []):
            ax.plot([x], [cyc], marker="D", color="black", markersize=7, linestyle="none",
                    label=None if marked else "measured on KVM")
            marked = True
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, paths)


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


def plot_sweep(points: Sequence[tuple[float, Sequence[RunResult]]] | Mapping[
        str, Sequence[tuple[float, float]]], out: str | Path, *, parameter: str,
        title: str | None = None, formats: Iterable[str] = FORMATS, logx: bool = False,
        ylabel: str = "cycles per notification",
        xticks: Sequence[tuple[float, str]] | None = None) -> list[Path]:
    """Cycles per notification of each route against one ``parameter``.

    ``points`` is either a sequence of ``(parameter value, [RunResult, ...])`` or a mapping
    series name -> ``[(value, cycles), ...]`` (see :func:`sweep_series`). ``xticks``: labels
    for a categorical parameter (``(position, label)``; e.g. cache configurations at 0, 1, 2).
    """
    paths = _outputs(out, formats)
    series = dict(points) if isinstance(points, Mapping) else sweep_series(points)
    if not series or not any(series.values()):
        raise UsageError("plot_sweep: nothing to plot")
    fig = Figure(figsize=(7.0, 4.8))
    ax = fig.add_subplot()
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if logx:
        ax.set_xscale("log")
    if xticks:
        ax.set_xticks([float(x) for x, _ in xticks])
        ax.set_xticklabels([label for _, label in xticks])
    ax.set_xlabel(parameter)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    return _save(fig, paths)
