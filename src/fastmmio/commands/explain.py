"""``fastmmio explain ROUTE``: one steady-state notification on the simulator, step by step,
with the cycles each step costs under a CPU profile (see :mod:`fastmmio.explain`).

Exit status: 0, or 2 for a usage error (unknown route, variant, cache configuration or
profile; a route the chosen variant cannot run), one line on stderr.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fastmmio.commands.extensions import (
    add_price_argument,
    add_routes_file_argument,
    add_variant_file_argument,
    profile_from_args,
    with_extensions,
)
from fastmmio.costs import COMPONENTS, check_prices
from fastmmio.outputs import check_writable_file, is_stdout, write_final
from fastmmio.explain import (
    ARCH_PROFILES,
    DEFAULT_CPL,
    DEFAULT_WARMUP,
    ExplainOptions,
    Explanation,
    explain,
    l0_steps,
)
from fastmmio.sim.kvm.variants import ARCHES
from fastmmio.sim.nested import NESTED_DEFAULT
from fastmmio.argtypes import nested_l0, positive_int
from fastmmio.routes import get_route
from fastmmio.sim.backend import SimOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "explain",
        help="one notification of a route on the simulator, step by step, with cycles",
        description="Run ROUTE on the simulated VMX processor under the KVM model, warm it up, "
        "then record one steady-state notification: every page-walk reference and where it "
        "hit, the VM exit with its reason and qualification, each step of KVM's handler, the "
        "bus look-up, the eventfd signal or exit to userspace, the skip and the re-entry, each "
        "priced with a CPU cost profile; the rows add up to the cost model's total.",
    )
    p.add_argument("route", metavar="ROUTE", help="route name (fastmmio bench --list names them)")
    p.add_argument("--arch", choices=ARCHES, default="vmx",
                   help="the simulated processor: vmx (Intel VMX/EPT, default) or svm (AMD SVM "
                   "with nested paging, under KVM's SVM handlers)")
    p.add_argument("--variant", default=None,
                   help="KVM variant (vmx: upstream, upstream-2013, rfc-2015, rfc-2015-fixed, "
                   "bad-page, reserved-write-mostly; default upstream. svm: svm, svm-pre-7.0, "
                   "rfc-2015-svm; default svm; or one of --variant-file)")
    add_variant_file_argument(p)
    add_routes_file_argument(p)
    p.add_argument("--caches", default="sdm-max",
                   help="processor translation-cache configuration (default sdm-max; on svm "
                   "apm-max, none, zen4, sdm-max meaning apm-max)")
    p.add_argument("--next-rip-on-npf", choices=("yes", "no"), default="yes",
                   help="svm: whether the processor fills next RIP on #NPF (default yes; APM "
                   "15.7.1 lists #NPF among the intercepts that reset it to zero)")
    p.add_argument("--vpid", choices=("on", "off"), default="on",
                   help="KVM's 'enable VPID' (default on, as upstream)")
    p.add_argument("--nested", nargs="?", type=nested_l0, const=NESTED_DEFAULT, default="off",
                   metavar="L0",
                   help="KVM runs as a guest of an L0 hypervisor: kvm (shadow EPT, shadow "
                   "VMCS; the default of a bare --nested) or hyperv (Enlightened VMCS, VM-exit "
                   "instruction length undefined on EPT exits); off (default)")
    p.add_argument("--profile", default=None, metavar="NAME|FILE",
                   help=f"CPU cost profile: a bundled name or a .toml file (default "
                   f"{ARCH_PROFILES['vmx']} on vmx, {ARCH_PROFILES['svm']} on svm)")
    add_price_argument(p)
    p.add_argument("--cpl", type=int, choices=(0, 3), default=DEFAULT_CPL,
                   help=f"guest privilege level (default {DEFAULT_CPL}, as kvm-unit-tests on VMX)")
    p.add_argument("--warmup", type=positive_int, default=DEFAULT_WARMUP, metavar="N",
                   help=f"iterations of the warm-up batch (default {DEFAULT_WARMUP})")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write the steps as JSON to FILE, or to stdout instead of the table")
    p.set_defaults(func=with_extensions(run))


def explanation_table(e: Explanation) -> Table:
    table = Table(
        title=f"fastmmio explain {e.route}: one steady-state notification",
        caption=f"sim {e.sim}; profile {e.profile}{' (nested)' if e.nested else ''}; "
        f"guest CPL{e.cpl}",
    )
    table.add_column("#", justify="right")
    table.add_column("step")
    table.add_column("event")
    table.add_column("cycles", justify="right")
    table.add_column("component")
    table.add_column("detail", overflow="fold")
    for s in e.steps:
        if s.event is None:
            table.add_row(str(s.index), Text(s.what, style="italic"), "", "", "", Text(s.detail))
            continue
        count = f" x{s.count}" if s.count != 1 else ""
        cycles = "free" if s.component is None else f"{s.cycles:,.1f}"
        table.add_row(str(s.index), Text(s.what), Text(s.event + count), cycles,
                      s.component or "", Text(s.detail))
    table.add_section()
    table.add_row("", "[bold]total[/bold]", "", f"[bold]{e.total_cycles:,.1f}[/bold]", "", "")
    return table


def l0_table(e: Explanation) -> Table:
    """The nested notification by L0 stage, in order, adding up to the total."""
    table = Table(title=f"L0 {e.l0}: the notification stage by stage")
    table.add_column("#", justify="right")
    table.add_column("stage")
    table.add_column("cycles", justify="right")
    table.add_column("events", overflow="fold")
    for i, (stage, cycles, events) in enumerate(l0_steps(e), 1):
        evs = ", ".join(f"{k}" + (f" x{v}" if v != 1 else "") for k, v in sorted(events.items()))
        table.add_row(str(i), stage, f"{cycles:,.1f}", evs)
    table.add_section()
    table.add_row("", "[bold]total[/bold]", f"[bold]{e.total_cycles:,.1f}[/bold]", "")
    return table


def breakdown_line(e: Explanation) -> str:
    parts = [f"{c} {e.pricing.breakdown[c]:,.1f}" for c in COMPONENTS if e.pricing.breakdown[c]]
    return "by component: " + ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    route = get_route(args.route)  # UsageError listing the routes
    if args.json is not None:
        check_writable_file(Path(args.json))
    variant = args.variant or ("svm" if args.arch == "svm" else "upstream")
    args.profile = args.profile or ARCH_PROFILES[args.arch]
    profile = profile_from_args(args)
    options = ExplainOptions(
        sim=SimOptions(variant=variant, caches=args.caches, vpid=args.vpid == "on",
                       nested=args.nested, arch=args.arch, next_rip_on_npf=args.next_rip_on_npf),
        profile=profile,
        cpl=args.cpl,
        warmup=args.warmup,
    )
    check_prices(profile, nested=args.nested != "off")  # before simulating
    e = explain(route, options)
    if args.json is not None:
        text = json.dumps(e.to_json(), indent=2) + "\n"
        write_final(args.json, text)
        if is_stdout(args.json):
            return 0
    term = Console()
    out = term if term.is_terminal else Console(width=160)
    out.print(explanation_table(e))
    out.print(breakdown_line(e))
    if e.l0 != "off":
        out.print(l0_table(e))
        out.print(f"L0 {e.l0}: {e.l0_rules}")
    out.print(e.kvm_rules)
    return 0
