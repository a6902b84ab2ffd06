"""Output of ``fastmmio bench``: a rich table, kvm-unit-tests lines, JSON records.

The cycle figure is what kvm-unit-tests' x86/vmexit.c prints: TSC ticks per notification
over the whole batch, loop overhead included: the median of the route's runs, with their
min-max, their interquartile range as a fraction of the median and the number of runs; a route
that the measuring rule (:class:`fastmmio.bench.StopRule`) did not find stable is flagged
``noisy``. The KVM statistics are the binary-stats deltas
(KVM_GET_STATS_FD) of the last batch divided by N, so that 1.00 means "once per doorbell"; the
backend reports only non-zero deltas, so a statistic missing from a non-empty set is 0.
"""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table
from rich.text import Text

from fastmmio.result import HostInfo, RunResult

STAT_COLUMNS = ("exits", "io_exits", "mmio_exits", "insn_emulation")


def _fmt_cycles(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:,.0f}"


def _short(x: float) -> str:
    """Compact figure for the spread column: 812, 66.3k, 1.25M."""
    if x >= 1e6:
        return f"{x / 1e6:.3g}M"
    if x >= 1e4:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def _per(n: int, value: float) -> str:
    return f"{value / n:.2f}" if n else "-"


def host_line(host: HostInfo) -> str:
    tsc = f"TSC {host.tsc_khz / 1000:.0f} MHz" if host.tsc_khz else "TSC unknown"
    nested = ", nested" if host.nested else ""
    return f"{host.cpu_model}; KVM {host.kvm_kind}{nested}; {tsc}; guest CPL{host.guest_cpl}"


def _pct(x: float) -> str:
    return f"{x:.0%}" if x >= 0.095 else f"{x:.1%}"


def spread_text(r: RunResult) -> Text:
    """The median's confidence interval as +-percent of it, flagged ``noisy`` when the
    measuring rule did not find the route stable."""
    s = r.spread
    if s is None:
        return Text("-")
    pct = "+-" + _pct(s.ci_rel)
    return Text(pct) if s.stable else Text(f"{pct} noisy", style="yellow")


def rule_line(results: list[RunResult]) -> str:
    """The measuring rule, as the results record it, and what the spread columns mean."""
    rules = {r.spread.rule for r in results if r.spread is not None}
    if not rules:
        return ""
    return ("median +-: its confidence interval, from order statistics; IQR: interquartile "
            "range of the runs / median; rule: " + "; ".join(sorted(rules))
            + " (a noisy route gets no ratio)")


def bench_table(results: list[RunResult], host: HostInfo | None = None) -> Table:
    """One row per route; failed checks are listed under the table by the caller."""
    caption = "\n".join(x for x in (host_line(host) if host else "", rule_line(results)) if x)
    table = Table(
        title="fastmmio bench: cycles per notification (TSC ticks, loop included, as kvm-unit-tests)",
        caption=caption or None,
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("route", no_wrap=True)
    table.add_column("cycles", justify="right", no_wrap=True)
    table.add_column("min-max", justify="right", no_wrap=True)
    table.add_column("IQR", justify="right", no_wrap=True)
    table.add_column("median\n+-", justify="right", no_wrap=True)
    table.add_column("runs", justify="right")
    table.add_column("N", justify="right")
    table.add_column("user exits\n/notif", justify="right")
    table.add_column("eventfd\nsignals", justify="right")
    for name in STAT_COLUMNS:
        table.add_column(name.replace("_", " ") + "\n/notif", justify="right")
    table.add_column("correct", justify="center")
    for r in results:
        n = r.iterations
        lo, hi = r.cycles_spread
        spread = "-" if math.isnan(lo) else f"{_short(lo)}-{_short(hi)}"
        ok = Text("yes", style="green") if r.correct else Text("NO", style="bold red")
        table.add_row(
            r.route,
            _fmt_cycles(r.cycles),
            spread,
            _pct(r.spread.iqr_rel) if r.spread else "-",
            spread_text(r),
            str(r.spread.runs) if r.spread else "-",
            str(n) if n else "-",
            _per(n, r.user_exits),
            str(r.eventfd_signals) if n else "-",
            *(_per(n, r.kvm_stats.get(s, 0)) if r.kvm_stats and n else "-" for s in STAT_COLUMNS),
            ok,
        )
    return table


def kut_lines(results: list[RunResult]) -> list[str]:
    """``NAME CYCLES`` lines, as x86/vmexit.c prints them, for routes with a counterpart."""
    lines = []
    for r in results:
        kut = r.extra.get("kut")
        if kut and not math.isnan(r.cycles):
            lines.append(f"{kut} {int(r.cycles)}")
    return lines


def _clean(value: Any) -> Any:
    """JSON has no NaN: a route that could not be measured gets null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def json_records(results: list[RunResult], host: HostInfo) -> list[dict[str, Any]]:
    """``--json``: one host record ``{"host": {...}}`` first, then one record per route."""
    return [{"host": host.to_json()}] + [_clean(r.to_json()) for r in results]


def _host_column(hb: Any) -> str:
    h = hb.host
    if h is None:
        return hb.hostname
    tsc = f"{h.tsc_khz / 1000:.0f} MHz" if h.tsc_khz else "TSC ?"
    return f"{hb.hostname}\n{h.kvm_kind}{' nested' if h.nested else ''}, CPL{h.guest_cpl}, {tsc}"


def fleet_table(hosts: list[Any]) -> Table:
    """The fleet view (``fastmmio bench --scheduler``): one row per route, one column per host
    (:class:`fastmmio.bench.HostBench`), the median cycles per notification with its
    confidence interval; ``skip`` where that host cannot run the route, ``FAIL`` where a check
    failed. The caption names each host's CPU and kernel."""
    caption = [f"{hb.hostname} ({hb.worker or 'local'}): "
               + (host_line(hb.host) + f"; kernel {hb.host.kernel}" if hb.host else "")
               + (f" ERROR: {hb.error}" if hb.error else "") for hb in hosts]
    table = Table(title="fastmmio bench, fleet: cycles per notification (TSC ticks, loop "
                  "included, as kvm-unit-tests) by host", caption="\n".join(caption),
                  title_justify="left", caption_justify="left")
    table.add_column("route", no_wrap=True)
    for hb in hosts:
        table.add_column(_host_column(hb), justify="right", no_wrap=True)
    routes: list[str] = []
    for hb in hosts:
        for name in [r.route for r in hb.results] + [n for n, _ in hb.skipped]:
            if name not in routes:
                routes.append(name)
    for name in routes:
        row: list[Any] = [name]
        for hb in hosts:
            res = {r.route: r for r in hb.results}.get(name)
            if res is None:
                row.append(Text("skip" if name in dict(hb.skipped) else "-", style="dim"))
            elif not res.correct:
                row.append(Text("FAIL", style="bold red"))
            else:
                row.append(Text(_fmt_cycles(res.cycles) + " ").append(spread_text(res)))
        table.add_row(*row)
    return table


def fleet_records(hosts: list[Any]) -> dict[str, Any]:
    """``--json`` of a fleet run: per host its name, Dask worker, host record, skipped routes,
    error, and the same route records as :func:`json_records`."""
    return {"hosts": [{"hostname": hb.hostname, "worker": hb.worker,
                       "host": hb.host.to_json() if hb.host else None,
                       "error": hb.error,
                       "skipped": [{"route": r, "reason": why} for r, why in hb.skipped],
                       "results": [_clean(r.to_json()) for r in hb.results]} for hb in hosts]}
