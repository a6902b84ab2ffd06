"""Output of ``fastmmio compare``: rich tables, the verdict text, and the output folder
(results.json, results.csv, breakdown.png / breakdown.svg); and of ``fastmmio sweep``
(a table, sweep-<params>.png / .svg / .csv / .json).

Per variant, one table row per route: cycles per notification and what they are made of (the
cost model's nine components), VM exits, walk references and combined-TLB hits/misses per
notification, how the processor sees the access's EPT entry after the run, the ratio to the
PIO ioeventfd route under the same variant, and whether the route passed its checks. A route
the variant cannot run is ``n/a`` (the reason under the table), not a failure. Where this
host's KVM was measured, the upstream table carries its cycles and ratios too.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fastmmio import __version__
from fastmmio.compare.core import FAIL, NA, OK, PIO_REFERENCE, Cell, caches_name, sim_key
from fastmmio.compare.run import CompareRun
from fastmmio.compare.sweep import SweepResult, fmt_value
from fastmmio.costs.profile import COMPONENTS, profile_to_json
from fastmmio.errors import UsageError
from fastmmio.outputs import open_text, write_text
from fastmmio.report.bench import _clean, bench_table, host_line, rule_line, spread_text
from fastmmio.report.plots import (
    HeadlineBar,
    breakdown_figure,
    figure_svg,
    headline_figure,
    plot_sweep,
    save_figure,
)
from fastmmio.result import RunResult
from fastmmio.verdict import AS_FAST, INCORRECT, LABELS, SLOWER, doorbell_route
from fastmmio.verdict.text import flip_brief

# The verdict table's colour of each class the judgement gives a doorbell.
CLASS_STYLE = {AS_FAST: "green", SLOWER: "yellow", INCORRECT: "bold red", NA: "dim"}
from fastmmio.sim.kvm.variants import SVM_VARIANTS
from fastmmio.verdict.svm import LABELS as SVM_LABELS
from fastmmio.verdict.svm import doorbell_route as svm_doorbell_route

# Column names of the route tables, in words a KVM developer reads without the README.
COMPONENT_HEADERS = {"exit": "VM exit", "walk": "page walk", "handler": "exit handler",
                     "bus": "bus lookup", "eventfd": "eventfd signal", "emulation": "emulation",
                     "skip": "insn skip", "userspace": "user space", "guest": "guest code"}
# Below these console widths a table drops columns rather than cut a number.
WIDE = 160  # the nine component columns of the route tables
NARROW = 100  # TLB, EPT entry and the KVM spread columns; the answer table stacks its rows
# Routes drawn in breakdown.png when the user did not choose routes: the doorbells of the
# thread and their references.
PLOT_ROUTES = ("pio-user", "pio-eventfd-len1", "mmio-user", "mmio-eventfd-len0",
               "mmio-eventfd-len1", "ro-write", "ro-write-eventfd", "cpuid")


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x)


def _per(x: float) -> str:
    if x == 0:
        return "0"
    return f"{x:.2f}".rstrip("0").rstrip(".")


def setting_line(run: CompareRun) -> str:
    o = run.options
    return (f"profile {run.profile.name}, caches {o.caches}, VPID {'on' if o.vpid else 'off'}, "
            f"{f'KVM nested under {o.nested}' if o.is_nested else 'bare metal'}, guest CPL{run.comparison.cpl}, "
            f"N={run.comparison.iterations} after a warm-up batch")


def _numeric(table: Table, header: str) -> None:
    """A column of figures: right-aligned, never wrapped or cut (the layouts drop columns
    instead, see :data:`NARROW` / :data:`WIDE`)."""
    table.add_column(header, justify="right", no_wrap=True, overflow="fold")


def _signature(run: CompareRun, cell: Cell) -> tuple:
    """What a route row shows for ``cell``: equal signatures print equal rows."""
    if cell.status == NA:
        return (NA, cell.reason)
    return (cell.status, _num(cell.cycles), tuple(_num(cell.breakdown.get(c, 0.0))
                                                  for c in COMPONENTS),
            _per(cell.exits), _per(cell.walk_refs), _per(cell.tlb_hits),
            _per(cell.tlb_misses), cell.run.ept_entry, _num(run.comparison.ratio_to_pio(cell),
                                                             "{:.2f}"))


def split_routes(run: CompareRun) -> tuple[list[str], list[str]]:
    """The run's routes, split into those whose figures are the same under every variant and
    those that differ between variants (each in the matrix's order)."""
    same, differ = [], []
    for route in run.matrix.routes:
        cells = [run.matrix.cells[(v, route)] for v in run.options.variants
                 if (v, route) in run.matrix.cells]
        sigs = {_signature(run, c) for c in cells}
        (same if len(sigs) <= 1 else differ).append(route)
    return same, differ


def route_table(run: CompareRun, rows: list[tuple[str, str]], title: str, width: int, *,
                variant_column: bool) -> Table:
    """Route rows (route, variant): cycles per notification and what they are made of, VM
    exits, walk references, TLB outcomes, the EPT entry, the ratio to PIO and the checks;
    this host's KVM figures on upstream rows when measured. Columns are dropped below
    :data:`WIDE` / :data:`NARROW` console columns, never cut."""
    measured = run.kvm.status == "measured" and "upstream" in run.options.variants
    kvm = run.kvm.by_route() if measured else {}
    with_kvm = measured and any(v == "upstream" for _, v in rows)
    wide, narrow = width >= WIDE, width < NARROW
    table = Table(title=title, title_justify="left", caption_justify="left", pad_edge=False)
    stacked = narrow and variant_column  # each route a heading row above its variants
    if stacked:
        table.add_column("route\n  variant", overflow="fold")
    else:
        table.add_column("route", overflow="fold")
        if variant_column:
            table.add_column("variant", overflow="fold")
    _numeric(table, "cycles")
    if wide:
        for c in COMPONENTS:
            table.add_column(COMPONENT_HEADERS[c].replace(" ", "\n"), justify="right",
                             no_wrap=True, overflow="fold")
    _numeric(table, "VM\nexits")
    _numeric(table, "walk\nrefs")
    if not narrow:
        _numeric(table, "TLB\nhits")
        _numeric(table, "TLB\nmisses")
        table.add_column("EPT entry", overflow="fold")
    _numeric(table, "x PIO")
    table.add_column("checks", justify="center", no_wrap=True)
    if with_kvm:
        _numeric(table, "KVM\ncycles")
        if not narrow:
            _numeric(table, "KVM\nmedian +-")
        _numeric(table, "KVM\nx PIO")
    notes: dict[str, list[str]] = {}
    last = None
    for i, (route, variant) in enumerate(rows):
        end = variant_column and (i + 1 == len(rows) or rows[i + 1][0] != route)
        cell = run.matrix.cells[(variant, route)]
        first = not variant_column or route != last
        last = route
        if stacked:
            if first:
                table.add_row(Text(route, style="bold"), *[""] * (len(table.columns) - 1))
            head: list[Any] = ["  " + variant]
        else:
            head = [route if first else ""] + ([variant] if variant_column else [])
        if cell.status == NA:
            row = head + [Text("n/a", style="dim")] + [""] * (len(table.columns) - len(head) - 1)
            notes.setdefault(f"n/a: {cell.reason}", []).append(route)
            table.add_row(*row, end_section=end)
            continue
        ok = Text("pass", style="green") if cell.status == OK else Text("FAIL", style="bold red")
        if cell.status == FAIL:
            notes.setdefault(f"FAIL: {cell.reason}", []).append(route)
        b = cell.breakdown
        row = head + [_num(cell.cycles)]
        if wide:
            row += [_num(b.get(c, 0.0)) if b.get(c) else "." for c in COMPONENTS]
        row += [_per(cell.exits), _per(cell.walk_refs)]
        if not narrow:
            row += [_per(cell.tlb_hits), _per(cell.tlb_misses), cell.run.ept_entry or "-"]
        row += [_num(run.comparison.ratio_to_pio(cell), "{:.2f}"), ok]
        if with_kvm:
            k = kvm.get(route) if variant == "upstream" else None
            if k is None:
                row += ["-"] * (2 if narrow else 3)
            else:
                row.append(_num(k.cycles) + ("" if k.correct else " FAIL"))
                if not narrow:
                    row.append(spread_text(k))
                row.append(kvm_ratio_text(run, route))
        table.add_row(*row, end_section=end)
    lines = [route_legend(wide, narrow, with_kvm)]
    if variant_column:
        shown = dict.fromkeys(v for _, v in rows)
        lines.append("variants: " + "; ".join(
            f"{v}: {LABELS.get(v) or SVM_LABELS.get(v, v)}" for v in shown))
    lines += [f"{what} ({', '.join(dict.fromkeys(routes))})" for what, routes in notes.items()]
    if with_kvm:
        lines.append(f"KVM: this host, {run.kvm.comparable()}")
        rule = rule_line(run.kvm.results)
        if rule:
            lines.append(f"KVM {rule}")
    table.caption = Text("\n".join(lines))
    return table


def route_legend(wide: bool, narrow: bool, with_kvm: bool) -> str:
    parts = ["cycles: simulated cycles per notification (model cycles, loop included)"]
    if wide:
        parts.append("then what they are made of, by the cost model's components ('.' none)")
    else:
        parts.append("its components are in results.csv (shown from "
                     f"{WIDE} columns)")
    parts.append("VM exits, walk refs (page-walk memory references): per notification")
    if not narrow:
        parts.append("TLB hits/misses: combined-TLB look-ups per notification; EPT entry: "
                     "how the processor sees the access's EPT entry after the run")
    parts.append("x PIO: cycles / the PIO ioeventfd route's under the same variant; checks: "
                 "the route's own correctness checks")
    if with_kvm:
        parts.append("KVM: TSC ticks measured on this host (upstream only)"
                     + ("; the spread columns from " f"{NARROW} columns" if narrow else ""))
    return "; ".join(parts) + "."


def detail_tables(run: CompareRun, width: int) -> list[Table]:
    """The route tables of ``--detail``: one of the routes whose figures differ between
    variants (a row per variant), one of those that are the same under every variant."""
    variants = list(run.options.variants)
    same, differ = split_routes(run)
    out = []
    if len(variants) == 1:
        v = variants[0]
        return [route_table(run, [(r, v) for r in run.matrix.routes],
                            f"{v}: {LABELS.get(v) or SVM_LABELS.get(v, v)}: every route", width,
                            variant_column=False)]
    if differ:
        t = route_table(run, [(r, v) for r in differ for v in variants
                              if (v, r) in run.matrix.cells],
                        "Routes whose figures differ between variants", width,
                        variant_column=True)
        out.append(t)
    if same:
        first = variants[0] if "upstream" not in variants else "upstream"
        out.append(route_table(run, [(r, first) for r in same],
                               f"Routes with the same figures under every variant "
                               f"({', '.join(variants)})", width, variant_column=False))
    return out


def kvm_ratio_text(run: CompareRun, route: str) -> Text:
    """The KVM ratio to PIO, or why there is none: a noisy route (or a noisy PIO reference)
    gets no ratio."""
    res = run.kvm.by_route()
    k, pio = res.get(route), res.get(PIO_REFERENCE)
    if k is not None and k.noisy:
        return Text("noisy", style="yellow")
    if pio is not None and pio.noisy and k is not None and k.correct:
        return Text("PIO noisy", style="yellow")
    return Text(_num(run.kvm.ratio_to_pio(route), "{:.2f}"))


def answer_table(run: CompareRun, width: int) -> Table | None:
    """The thread's question answered: per variant, its MMIO doorbell against the PIO
    ioeventfd under each machine setting, with the ratio, the verdict word and the nearest
    price flip, all read from the judgement. Below :data:`NARROW` columns each doorbell is a
    heading row above its settings instead of a column."""
    v = run.verdict
    if v is None:
        return None
    j = v.judgement
    narrow = width < NARROW
    table = Table(title=f"Is MMIO as fast as port I/O? Each variant's MMIO doorbell against "
                        f"the PIO ioeventfd, by machine setting (profile {run.profile.name})",
                  title_justify="left", caption_justify="left", pad_edge=False)
    if not narrow:
        table.add_column("doorbell (variant)", overflow="fold")
    table.add_column("machine setting", overflow="fold")
    _numeric(table, "MMIO\ncycles")
    _numeric(table, "PIO\ncycles")
    _numeric(table, "MMIO /\nPIO")
    table.add_column("verdict", no_wrap=True)
    table.add_column("flips if", overflow="fold")
    for s in j.subjects:
        if s.is_pio:
            continue
        if narrow:
            table.add_row(Text(f"{s.label} [{s.variant}]: {s.route}", style="bold"),
                          *[""] * 5, end_section=False)
        name = Text(s.label)
        name.append(f"\n{s.variant}: {s.route}", style="dim")
        for i, sc in enumerate(j.scenarios):
            p = j.point(s.key, sc.key)
            head: list[Any] = [] if narrow else [name if i == 0 else ""]
            head.append(("  " if narrow else "") + sc.key)
            last = i == len(j.scenarios) - 1
            word = Text(p.judged or NA, style=CLASS_STYLE.get(p.judged or NA, ""))
            if p.status == NA or math.isnan(p.cycles):  # the word still the judgement's
                table.add_row(*head, Text("n/a", style="dim") if p.judged in ("", NA)
                              else "-", "", "", word, "",
                              end_section=last)
                continue
            st = j.statement("as-fast", sc.key, s.key)
            table.add_row(*head, _num(p.cycles), _num(p.pio_cycles),
                          "-" if p.ratio is None else f"{p.ratio:.2f}", word,
                          flip_brief(st.breakeven) if st is not None else "",
                          end_section=last)
    settings = "; ".join(f"{sc.key}: {sc.label}" for sc in j.scenarios)
    table.caption = Text(
        "MMIO cycles: simulated cycles per doorbell write (model cycles, loop included); PIO "
        f"cycles: the port-I/O ioeventfd ({PIO_REFERENCE}) under the same variant and "
        f"setting; MMIO / PIO: their ratio. Verdict: '{AS_FAST}' within {v.tolerance:.0%} of "
        f"PIO, '{SLOWER}' beyond, '{INCORRECT}' when the doorbell's own checks fail there. "
        "Flips if: the nearest single price (cycles, within its stated interval) at which the "
        f"verdict would change. Settings: {settings}.")
    return table


def review_table(run: CompareRun, width: int = 200) -> Table | None:
    v = run.verdict
    if v is None or not v.review:
        return None
    narrow = width < NARROW
    table = Table(title="The review's points as computed checks (fastmmio.review)",
                  title_justify="left", pad_edge=False)
    if narrow:  # stacked: the check over its variant
        table.add_column("check\n(variant)", overflow="fold")
    else:
        table.add_column("variant", overflow="fold")
        table.add_column("check", overflow="fold")
        table.add_column("review point")
    table.add_column("has it", justify="center", no_wrap=True)
    table.add_column("measured")
    claims: dict[str, str] = {}
    for r in v.review:
        mark = (Text("n/a", style="dim") if r.passed is None else
                Text("yes", style="green") if r.passed else Text("NO", style="bold red"))
        detail = r.detail if r.passed is not None else "not applicable"
        row: list[Any] = [Text(f"{r.name}\n({r.variant})")] if narrow else [r.variant, r.name]
        if not narrow:
            row.append(r.source if r.passed is not None else "")
        table.add_row(*row, mark, Text(detail))
        if r.passed is not None:
            claims.setdefault(r.name, r.claim)
    table.caption = Text("has it: whether the variant has the property the review point asks "
                         "for; measured: the figures that decided it. Checks use the RFC's "
                         "doorbell (a length-0 ioeventfd over a read-only memslot: "
                         "ro-write-eventfd, ro-read-eventfd) and page-touch under every "
                         "variant.\n" + "\n".join(f"{k}: {c}" for k, c in claims.items()))
    table.caption_justify = "left"
    return table


def calibration_table(run: CompareRun) -> Table | None:
    rows = run.calibration
    if not rows:
        return None
    fit = run.profile.fit
    free = ", ".join(fit.free) if fit else "(no [fit] record)"
    table = Table(title=f"Calibration: profile {run.profile.name} against the published "
                        "kvm-unit-tests pci-testdev figures (QEMU 22773d60, 2013), simulated "
                        "upstream-2013 at CPL0",
                  title_justify="left", caption_justify="left",
                  caption=Text(f"fitted prices: {free}; every other price is held at its "
                               "estimate. 'fit' is the residual recorded in the profile's "
                               "[fit] table."))
    for col in ("kvm-unit-tests", "route"):
        table.add_column(col, no_wrap=True)
    for col in ("published", "simulated", "residual", "fit"):
        table.add_column(col, justify="right")
    for r in rows:
        style = "green" if abs(r.percent) <= 10 else "bold red"
        table.add_row(r.kut, r.route, f"{r.published:,.0f}", f"{r.simulated:,.0f}",
                      Text(f"{r.percent:+.2f}%", style=style),
                      "-" if r.recorded_percent is None else f"{r.recorded_percent:+.2f}%")
    return table


def kvm_line(run: CompareRun) -> str:
    k = run.kvm
    if k.status == "skipped":
        return "This host's KVM: not measured (--no-kvm)."
    if k.status == "unavailable":
        return f"This host's KVM: not measured: {k.reason}."
    line = (f"This host's KVM: {len(k.results)} upstream routes measured ({host_line(k.host)}"
            f"; {k.comparable()})." if k.host else "")
    noisy = [r.route for r in k.results if r.noisy]
    if k.results and any(r.spread for r in k.results):
        s = [r.spread for r in k.results if r.spread is not None]
        line += (f" Runs per route {min(x.runs for x in s)}-{max(x.runs for x in s)}; "
                 + (f"noisy (no ratio to PIO): {', '.join(noisy)}." if noisy
                    else "every route stable."))
    if k.skipped:
        line += " Skipped: " + "; ".join(f"{r} ({why})" for r, why in k.skipped) + "."
    return line


def console_width(default: int = 120) -> int:
    """The width to render at: ``COLUMNS`` when set (also when piped), else the terminal's,
    else ``default``."""
    raw = os.environ.get("COLUMNS", "")
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    return shutil.get_terminal_size((default, 24)).columns


def render(console: Console, run: CompareRun, *, verdict_text: bool = True,
           detail: bool = False) -> None:
    """Everything ``fastmmio compare`` prints, in order: the answer (the doorbells' table and
    the bottom line), the verdict's reasons, the review and calibration, this host's KVM,
    and with ``detail`` (or without a verdict) the route tables."""
    width = console.width
    console.print(Text(f"fastmmio compare: simulated cycles per notification ({setting_line(run)}"
                       "); loop included, as kvm-unit-tests counts it", style="bold"))
    findings = list(run.verdict.findings) if run.verdict is not None else []
    bottom = [f for f in findings if f.topic == "bottom-line"]
    answer = answer_table(run, width)
    if answer is not None:
        console.print(answer)
        console.print()
    if verdict_text:
        for f in bottom:
            console.print(Text(f.text, style="bold"))
        if bottom:
            console.print()
    if run.verdict is not None and verdict_text:
        console.print(Text("Why", style="bold"))
        for f in findings:
            if f.topic != "bottom-line":
                console.print(Text("- " + f.text))
        if run.verdict.review_note:
            console.print(Text("- " + run.verdict.review_note, style="dim"))
        console.print()
    if run.svm_verdict is not None and run.svm_verdict.lines and verdict_text:
        console.print(Text("Verdict on AMD (KVM on SVM)", style="bold"))
        for line in run.svm_verdict.lines:
            console.print(Text(line))
        console.print()
    for t in (review_table(run, width), calibration_table(run)):
        if t is not None:
            console.print(t)
            console.print()
    if run.kvm.status == "measured" and "upstream" not in run.options.variants:
        console.print(bench_table(run.kvm.results, run.kvm.host))
    console.print(Text(kvm_line(run)))
    if detail or run.verdict is None:
        for t in detail_tables(run, width):
            console.print()
            console.print(t)
    else:
        console.print(Text("The per-route tables (cycles by component, exits, walk references, "
                           "EPT entry): fastmmio compare --detail; every figure is in "
                           "results.csv.", style="dim"))


# ------------------------------------------------------------------------------------------
# the output folder
# ------------------------------------------------------------------------------------------


def all_cells(run: CompareRun) -> list[Cell]:
    """Every priced cell the run computed (main matrix, then the verdict's judged cells)."""
    return run.all_cells()


def _r(x: float | None, digits: int) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, digits)


def cell_fields(c: Cell, ratio: float | None) -> dict[str, Any]:
    """The CSV columns of one simulated cell (shared by compare and sweep)."""
    o = c.run.options
    row: dict[str, Any] = {
        "variant": o.variant, "route": c.route, "caches": caches_name(o.caches),
        "vpid": int(o.vpid), "nested": o.nested, "extra_ioeventfds": o.extra_ioeventfds,
        "status": c.status, "correct": int(c.correct), "cycles": _r(c.cycles, 2)}
    for comp in COMPONENTS:
        row[f"cycles_{comp}"] = _r(c.breakdown.get(comp), 2)
    row.update({
        "exits_per_notification": round(c.exits, 4),
        "walk_refs_per_notification": round(c.walk_refs, 4),
        "tlb_combined_hits_per_notification": round(c.tlb_hits, 4),
        "tlb_combined_misses_per_notification": round(c.tlb_misses, 4),
        "ept_entry": c.run.ept_entry or "", "ratio_to_pio": _r(ratio, 4),
        "iterations": c.run.iterations, "reason": c.reason})
    return row


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r)) or ["route"]
    with open_text(path, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])


def _make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {out}: {exc.strerror or exc}") from None


def _csv_rows(run: CompareRun, cells: Iterable[Cell]) -> list[dict[str, Any]]:
    rows = [{"backend": f"sim:{c.variant}", "scenario": c.scenario,
             **cell_fields(c, run.comparison.ratio_to_pio(c))} for c in cells]
    for r in run.kvm.results:
        rows.append({"backend": "kvm", "scenario": "host", "variant": "upstream",
                     "route": r.route, "status": OK if r.correct else FAIL,
                     "correct": int(r.correct), "cycles": _r(r.cycles, 2),
                     "ratio_to_pio": _r(run.kvm.ratio_to_pio(r.route), 4),
                     "iterations": r.iterations,
                     **kvm_spread_fields(r),
                     "reason": "; ".join(x for x in r.checks if x.startswith("FAIL"))})
    return rows


def kvm_spread_fields(r: RunResult) -> dict[str, Any]:
    """The CSV columns of a KVM record's spread (empty for an unmeasured route)."""
    s = r.spread
    if s is None:
        return {}
    return {"kvm_runs": s.runs, "kvm_min": _r(s.min, 2), "kvm_max": _r(s.max, 2),
            "kvm_q1": _r(s.q1, 2), "kvm_q3": _r(s.q3, 2), "kvm_iqr_rel": _r(s.iqr_rel, 4),
            "kvm_median_ci_low": _r(s.ci_low, 2), "kvm_median_ci_high": _r(s.ci_high, 2),
            "kvm_median_ci_rel": _r(s.ci_rel, 4), "kvm_stable": int(s.stable)}


# The unit of every figure in results.json, by record kind.
UNITS = {
    "simulated": "model cycles per notification: the simulator's event counts of the "
                 "steady-state batch priced with the profile (loop included)",
    "kvm": "TSC ticks per notification on this host's KVM (median over runs; loop "
           "included); comparable with model cycles only on a VMX host whose TSC runs at "
           "the core clock",
    "ratio_to_pio": "dimensionless: the route's figure over the PIO ioeventfd route's "
                    "under the same machine setting (same unit on both sides)",
    "per_notification": "events per notification (exits, walk references, TLB outcomes)",
}


def _record(run: CompareRun, c: Cell) -> dict[str, Any]:
    rec = c.to_result(run.comparison.ratio_to_pio(c)).to_json()
    rec["unit"] = "model cycles"
    u = run.verdict.judgement.uncertainty if run.verdict is not None else None
    if u is not None:
        rec["extra"]["uncertainty"] = u.stats(c)
    return rec


def _kvm_record(run: CompareRun, r: RunResult) -> dict[str, Any]:
    rec = r.to_json()
    rec["unit"] = "TSC ticks"
    rec["host_kind"] = run.kvm.host.kvm_kind if run.kvm.host else None
    rec["ratio_to_pio"] = run.kvm.ratio_to_pio(r.route)
    return rec


def _other_cells(run: CompareRun, cells: list[Cell]) -> list[Cell]:
    """The run's simulations that no reported cell shows (the calibration's), priced, so
    that ``fastmmio report`` can re-price every figure of the run without simulating."""
    shown = {sim_key(c.route, c.run.options) for c in cells}
    return [run.comparison.cell(sr.route, sr.options, "calibration")
            for k, sr in run.comparison.runs().items() if k not in shown]


def run_record(run: CompareRun) -> dict[str, Any]:
    """When, how and by which fastmmio the run was made (results.json's ``run``)."""
    rec = {"fastmmio": __version__, "time_utc": run.started_utc, "argv": list(run.argv),
           "units": UNITS}
    if run.origin is not None:
        rec["rendered_from"] = run.origin
    return rec


def results_json(run: CompareRun, cells: list[Cell]) -> dict[str, Any]:
    p = run.profile
    return _clean({
        "fastmmio": __version__,
        "run": run_record(run),
        "options": run.options.to_json(),
        "profile": {"name": p.name, "origin": p.origin, "description": p.description,
                    "cpu": p.cpu, "extends": list(p.extends), "full": profile_to_json(p)},
        "host": run.kvm.to_json(),
        "simulated": [_record(run, c) for c in cells],
        "simulated_other": [_record(run, c) for c in _other_cells(run, cells)],
        "kvm": [_kvm_record(run, r) for r in run.kvm.results],
        "calibration": [r.__dict__ for r in run.calibration or []],
        "verdict": run.verdict.to_json() if run.verdict else None,
        "svm_verdict": run.svm_verdict.to_json() if run.svm_verdict else None,
        "timings_s": run.timings.to_json(),
        "wall_s": run.wall_s,
    })


def plot_cells(run: CompareRun) -> list[Cell]:
    """The bars of breakdown.png: the chosen routes (default :data:`PLOT_ROUTES` and each
    variant's doorbell), each drawn once per distinct behaviour (a route whose events under a
    later variant equal those of a bar already drawn is not drawn again)."""
    wanted = list(run.options.routes) or [r for r in PLOT_ROUTES if r in run.matrix.routes]
    out, drawn = [], set()
    for v in run.options.variants:
        names = list(wanted)
        door = svm_doorbell_route(v) if v in SVM_VARIANTS else doorbell_route(v)
        if door not in names and door in run.matrix.routes:
            names.append(door)
        for name in names:
            c = run.matrix.cells.get((v, name))
            if c is None or c.pricing is None:
                continue
            sig = (name, tuple(sorted(c.run.result.events.items())) if c.run.result else ())
            if sig in drawn:
                continue
            drawn.add(sig)
            out.append(c)
    return out


def headline_bars(run: CompareRun) -> list[HeadlineBar]:
    """The headline figure's bars, read from the verdict's judgement: each variant's doorbell
    under each machine setting, its ratio to that setting's PIO ioeventfd, and the sampled
    90% interval of the ratio when the run sampled price sets."""
    v = run.verdict
    if v is None:
        return []
    out = []
    for s in v.subjects:
        if s.is_pio:
            continue
        for sc in v.scenarios:
            p = v.points[(s.key, sc.key)]
            u = p.uncertainty or {}
            out.append(HeadlineBar(f"{s.label}\n{s.route} [{s.variant}]", sc.label,
                                   p.ratio if p.judged not in ("", NA) else None,
                                   u.get("ratio_p05"), u.get("ratio_p95")))
    return out


def headline_title(run: CompareRun) -> str:
    return (f"Is MMIO as fast as port I/O? Each doorbell as a multiple of the PIO ioeventfd "
            f"(profile {run.profile.name})")


def write_outputs(run: CompareRun, out: Path) -> list[Path]:
    """results.json, results.csv, breakdown.png/.svg, headline.png/.svg (with a verdict) and
    report.html in ``out`` (created)."""
    _make_out(out)
    with run.timings.measure("write"):
        cells = all_cells(run)
        paths = []
        try:
            p = out / "results.json"
            write_text(p, json.dumps(results_json(run, cells), indent=2) + "\n")
            paths.append(p)
            p = out / "results.csv"
            _write_csv(p, _csv_rows(run, cells))
            paths.append(p)
        except OSError as exc:
            raise UsageError(f"cannot write into {out}: {exc.strerror or exc}") from None
    with run.timings.measure("plot"):
        bars = [c.to_result() for c in plot_cells(run)]
        kvm: list[RunResult] = []
        h = run.kvm.host
        if run.kvm.status == "measured" and h is not None and h.kvm_kind == "vmx" \
                and not h.nested:
            shown = {b.route for b in bars}
            kvm = [r for r in run.kvm.results if r.route in shown and r.correct]
        svgs: dict[str, str | None] = {"breakdown_svg": None, "headline_svg": None}
        if bars:
            fig = breakdown_figure(
                bars + kvm, title=f"cycles per notification by component ({setting_line(run)})")
            paths += save_figure(fig, out / "breakdown")
            svgs["breakdown_svg"] = figure_svg(fig)
        head = headline_bars(run)
        if head:
            fig = headline_figure(head, run.verdict.tolerance, title=headline_title(run))
            paths += save_figure(fig, out / "headline")
            svgs["headline_svg"] = figure_svg(fig)
    with run.timings.measure("html"):
        from fastmmio.report.html import report_html

        p = out / "report.html"
        try:
            write_text(p, report_html(run, **svgs))
        except OSError as exc:
            raise UsageError(f"cannot write into {out}: {exc.strerror or exc}") from None
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------
# fastmmio sweep
# ------------------------------------------------------------------------------------------


def sweep_table(result: SweepResult) -> Table:
    p0 = result.params[0]
    table = Table(title=f"fastmmio sweep: cycles per notification against {p0} (profile "
                        f"{result.profile.name}, base caches {result.base.caches})",
                  title_justify="left", caption_justify="left")
    table.add_column("route", no_wrap=True)
    table.add_column("variant", no_wrap=True)
    if len(result.params) > 1:
        table.add_column(result.params[1], no_wrap=True)
    for v in result.values[0]:
        table.add_column(f"{p0}={fmt_value(p0, v)}", justify="right")
    rows: dict[tuple, dict[Any, Any]] = {}
    for pt in result.points:
        key = (pt.route, pt.variant) + tuple(pt.values[1:])
        rows.setdefault(key, {})[pt.values[0]] = pt
    for key, by_value in rows.items():
        row: list[Any] = [key[0], key[1]]
        if len(result.params) > 1:
            row.append(fmt_value(result.params[1], key[2]))
        for v in result.values[0]:
            pt = by_value.get(v)
            c = pt.cell if pt else None
            if c is None or c.status == NA or math.isnan(c.cycles):
                row.append(Text("n/a", style="dim"))
            else:
                txt = f"{c.cycles:,.0f}\n{c.walk_refs:.3g} refs"
                row.append(Text(txt) if c.correct else Text(txt + " FAIL", style="red"))
        table.add_row(*row)
    table.caption = "each cell: cycles per notification, and walk references per notification"
    return table


def _stem(result: SweepResult) -> str:
    return "sweep-" + "-".join(result.params)


def _rows(result: SweepResult) -> list[dict[str, Any]]:
    rows = []
    for pt in result.points:
        row: dict[str, Any] = {}
        for i, name in enumerate(result.params):
            row[f"param{i + 1}"] = name
            row[f"value{i + 1}"] = fmt_value(name, pt.values[i])
        row.update(cell_fields(pt.cell, pt.ratio))
        row["profile"] = pt.cell.pricing.profile if pt.cell.pricing else ""
        rows.append(row)
    return rows


def write_sweep(result: SweepResult, out: Path) -> list[Path]:
    _make_out(out)
    stem = out / _stem(result)
    rows = _rows(result)
    paths = []
    try:
        p = stem.with_suffix(".csv")
        _write_csv(p, rows)
        paths.append(p)
        p = stem.with_suffix(".json")
        write_text(p, json.dumps(_clean({
            "params": list(result.params),
            "values": [[fmt_value(n, v) for v in vals]
                       for n, vals in zip(result.params, result.values)],
            "routes": list(result.routes), "variants": list(result.variants),
            "profile": result.profile.name, "base": result.base.__dict__,
            "points": rows, "timings_s": result.timings.to_json(),
        }), indent=2) + "\n")
        paths.append(p)
    except OSError as exc:
        raise UsageError(f"cannot write into {out}: {exc.strerror or exc}") from None
    series = result.series()
    if series:
        paths += plot_sweep(series, stem, parameter=result.params[0],
                            title=f"cycles per notification against {result.params[0]} "
                                  f"(profile {result.profile.name})",
                            xticks=result.xticks())
    return paths
