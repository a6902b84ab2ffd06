"""``fastmmio calibrate``: a CPU profile fitted to figures the user already has.

Input (one of): kvm-unit-tests ``x86/vmexit`` output (``--kut FILE``, ``-`` for stdin: its
``NAME CYCLES`` lines; every other line is ignored), ``fastmmio bench --json`` output
(``--bench FILE``), or a bundled anchor set of published figures (``--anchors NAME``). Each
figure is mapped to a route through the kvm-unit-tests name table (``data/kut.toml``), the
route is simulated for its event vector, and the prices are fitted by non-negative least
squares (:func:`fastmmio.compare.calibration.calibrate`). Prints the residual table, the
fitted prices, the prices the figures cannot separate and those held; ``--out`` writes the
profile (TOML, loadable by ``--profile``).

Exit status: 0; 2 for every bad input, with one line (unknown test names only, no figures,
an under-determined ``--fit``, a missing base profile, an unreadable file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fastmmio.commands.extensions import (
    add_price_argument,
    add_variant_file_argument,
    profile_from_args,
    with_extensions,
)
from fastmmio.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="fit a CPU profile to kvm-unit-tests figures you already have",
        description="Fit a cost profile to measured figures: kvm-unit-tests x86/vmexit output, "
        "fastmmio bench --json output, or a bundled anchor set of published figures. Each "
        "figure's route is simulated for its event vector; prices are fitted by non-negative "
        "least squares; prices the figures cannot separate are held at the base profile's.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--kut", metavar="FILE", help="kvm-unit-tests x86/vmexit output ('-': stdin)")
    src.add_argument("--bench", metavar="FILE", help="fastmmio bench --json output")
    src.add_argument("--anchors", metavar="NAME", help="a bundled anchor set (--list-anchors)")
    src.add_argument("--list-anchors", action="store_true", help="list the anchor sets and exit")
    p.add_argument("--era", default=None,
                   help="what the --kut test names meant (data/kut.toml eras; default current)")
    p.add_argument("--variant", default=None,
                   help="simulated KVM variant the figures were taken on (default upstream; an "
                   "anchor set names its own)")
    p.add_argument("--base", default="skylake-sp", metavar="PROFILE",
                   help="profile whose prices are not fitted (name or .toml; default skylake-sp)")
    add_variant_file_argument(p)
    add_price_argument(p)
    p.add_argument("--fit", metavar="PRICE,...",
                   help="the prices that may move (default: every price the figures can "
                   "separate, largest contribution first)")
    p.add_argument("--out", type=Path, metavar="FILE", help="write the fitted profile (TOML)")
    p.add_argument("--name", help="the profile's name (default: --out's file name, or 'calibrated')")
    p.set_defaults(func=with_extensions(run))


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    p = Path(path)
    if p.exists() and not p.is_file():
        raise UsageError(f"cannot read {path}: not a regular file")
    try:
        return p.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"cannot read {path}: not UTF-8 text") from None


def figures_from_kut(path: str, era: str, variant: str):
    from fastmmio.compare.calibration import Calibration, FigureSet, map_figures
    from fastmmio.kut import parse_kut_log

    where = "standard input" if path == "-" else path
    log = parse_kut_log(_read_text(path))
    if not log.figures:
        raise UsageError(f"{where}: no 'NAME CYCLES' lines (kvm-unit-tests x86/vmexit output)")
    source = f"kvm-unit-tests x86/vmexit output in {where}"
    figures, unused = map_figures(log.figures, era, source)
    if not figures:
        raise UsageError(f"{where}: no test name maps to a route (unknown or unmapped: "
                         f"{', '.join(n for n, _ in unused)}; fastmmio bench --list shows the "
                         "name table)")
    cal = Calibration(profile="", variant=variant, figures=figures)
    return FigureSet(where, source, cal, unused)


def figures_from_bench(path: str, variant: str):
    from fastmmio.compare.calibration import Calibration, Figure, FigureSet
    from fastmmio.routes import load_catalogue

    try:
        records = json.loads(_read_text(path))
    except ValueError as exc:
        raise UsageError(f"{path}: not JSON ({exc})") from None
    if not isinstance(records, list):
        raise UsageError(f"{path}: not fastmmio bench --json output (a list of records)")
    known = {r.name: r for r in load_catalogue()}
    host = next((r["host"] for r in records if isinstance(r, dict) and "host" in r), {})
    source = f"fastmmio bench --json {path}"
    if host:
        source += (f" ({host.get('cpu_model', '?')}, KVM {host.get('kvm_kind', '?')}, "
                   f"guest CPL{host.get('guest_cpl', '?')})")
    figures, unused = [], []
    for rec in records:
        if not isinstance(rec, dict) or "route" not in rec:
            continue
        name, cycles = rec["route"], rec.get("cycles")
        if name not in known:
            unused.append((str(name), "not a route of the catalogue"))
        elif not isinstance(cycles, (int, float)) or isinstance(cycles, bool) or cycles <= 0:
            unused.append((name, "no measured cycles"))
        elif rec.get("correct") is False:
            unused.append((name, "failed its checks"))
        else:
            figures.append(Figure(known[name].kut or name, name, float(cycles), source))
    if not figures:
        raise UsageError(f"{path}: no route record with measured cycles"
                         + (f" (unused: {', '.join(n for n, _ in unused)})" if unused else ""))
    cal = Calibration(profile="", variant=variant, figures=tuple(figures))
    return FigureSet(path, source, cal, tuple(unused))


def residual_table(result) -> Table:
    table = Table(title=f"fastmmio calibrate: {result.figures.label}, simulated "
                        f"{result.figures.calibration.variant} at CPL0",
                  title_justify="left", caption_justify="left",
                  caption=result.figures.source)
    for col in ("kvm-unit-tests", "route"):
        table.add_column(col, no_wrap=True)
    for col in ("measured", "fitted", "residual"):
        table.add_column(col, justify="right")
    for r in result.rows:
        style = "green" if abs(r.percent) <= 10 else "bold red"
        table.add_row(r.kut, r.route, f"{r.published:,.0f}", f"{r.simulated:,.1f}",
                      Text(f"{r.percent:+.2f}%", style=style))
    return table


def summary_lines(result) -> list[str]:
    prof = result.profile
    lines = ["fitted (non-negative least squares, relative weighting; rank "
             f"{result.fit.rank}):"]
    for k, v in result.fit.parameters.items():
        prior = prof.prices[k].prior
        lines.append(f"  {k} = {v:g} cycles" + (f" (base {prior:g})" if prior is not None else "")
                     + (" (at the bound 0)" if v == 0 else ""))
    if result.tied:
        lines.append("not separable by these figures (its counts per figure are a combination "
                     "of the fitted prices' counts; held at the base profile's value):")
        for k, with_ in result.tied.items():
            p = prof.prices[k]
            lines.append(f"  {k} = {p.cycles:g} ({p.basis}): a combination of "
                         f"{', '.join(with_) or '(no fitted price)'}")
    others = {k: v for k, v in result.held.items() if k not in result.tied}
    if others:
        lines.append("held:")
        for k, why in others.items():
            p = prof.prices[k]
            lines.append(f"  {k} = {p.cycles:g} ({p.basis}): {why}")
    if result.figures.unused:
        lines.append("figures not used:")
        for n, why in result.figures.unused:
            lines.append(f"  {n}: {why}")
    return lines


def run(args: argparse.Namespace) -> int:
    from fastmmio.compare.calibration import calibrate, figure_set_from_anchor
    from fastmmio.costs.fit import write_profile
    from fastmmio.kut import CURRENT_ERA, anchor_names, load_anchor

    if args.list_anchors:
        for name in anchor_names():
            a = load_anchor(name)
            print(f"{name:24} {a.date:6} {a.description}")
            print(f"{'':24}        CPU {a.cpu}; {a.source.cite()}")
        return 0
    base = profile_from_args(args, "base")  # ProfileError (exit 2): a missing or bad profile
    fit = None
    if args.fit is not None:
        fit = [k.strip() for k in args.fit.split(",") if k.strip()]
        if not fit:
            raise UsageError("--fit needs at least one price key")
        unknown = [k for k in fit if k not in base.prices]
        if unknown:
            raise UsageError(f"--fit: {', '.join(unknown)} not a [price] key of profile "
                             f"{base.name}")
    if args.out is not None:
        from fastmmio.outputs import check_writable_file

        check_writable_file(args.out)
    if args.anchors is not None:
        if args.era is not None:
            raise UsageError("--era does not apply to --anchors: an anchor set names its era")
        figures = figure_set_from_anchor(args.anchors)
        if args.variant is not None:
            from dataclasses import replace

            figures = replace(figures, calibration=replace(figures.calibration,
                                                           variant=args.variant))
    elif args.kut is not None:
        figures = figures_from_kut(args.kut, args.era or CURRENT_ERA, args.variant or "upstream")
    else:
        if args.era is not None:
            raise UsageError("--era applies to --kut only: bench records name their routes")
        figures = figures_from_bench(args.bench, args.variant or "upstream")
    from fastmmio.compare.core import check_variants

    check_variants([figures.calibration.variant])
    name = args.name or (args.out.stem if args.out is not None else "calibrated")
    result = calibrate(base, figures, fit, name=name)
    term = Console()
    out = term if term.is_terminal else Console(width=120)
    out.print(residual_table(result))
    for line in summary_lines(result):
        print(line)
    if args.out is not None:
        write_profile(result.profile, args.out)
        print(f"profile {result.profile.name} written to {args.out} "
              f"(fastmmio compare --profile {args.out})")
    return 0
