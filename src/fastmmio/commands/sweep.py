"""``fastmmio sweep``: cycles per notification of chosen routes against one or two machine
parameters (see :mod:`fastmmio.compare.sweep` for what each parameter changes).

Exit status: 0, or 2 for a usage error (one line on stderr).
"""

from __future__ import annotations

import argparse

from rich.text import Text

from fastmmio import fanout
from fastmmio.argtypes import csv_list
from fastmmio.commands.compare import (
    add_sim_arguments,
    stdout_console,
    with_progress,
)
from fastmmio.compare.sweep import (
    DEFAULT_ROUTES,
    DEFAULT_VARIANTS,
    PARAMS,
    Base,
    parse_values,
    run_sweep,
)
from fastmmio.commands.extensions import profile_from_args, with_extensions
from fastmmio.costs import check_prices
from fastmmio.errors import UsageError
from fastmmio.outputs import OutputFolder


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="cycles of chosen routes against one or two machine parameters (plot, CSV, JSON)",
        description="Simulate routes under KVM variants while one or two parameters vary: "
        "tlb-size (combined TLB entries), psc-levels (paging-structure-cache levels, 0-3), "
        "memory-latency (cycles of a walk reference served by memory), ioeventfds (extra "
        "ioeventfds on each bus), vpid (on/off), nested (off or an L0: kvm, hyperv; on = kvm), caches (named "
        "configurations). Example: fastmmio sweep --param tlb-size --values 0,1,2,4,64 "
        "--param vpid --values on,off",
    )
    p.add_argument("--param", action="append", required=True, choices=PARAMS, metavar="NAME",
                   help=f"parameter to vary ({', '.join(PARAMS)}); give it once or twice")
    p.add_argument("--values", action="append", type=csv_list, required=True, metavar="V1,V2",
                   help="its values, one --values per --param, in the same order")
    p.add_argument("--routes", type=csv_list, default=list(DEFAULT_ROUTES), metavar="R1,R2",
                   help=f"routes (default {','.join(DEFAULT_ROUTES)})")
    add_sim_arguments(p, default_variants=",".join(DEFAULT_VARIANTS) + " and those of --variant-file")
    p.set_defaults(func=with_extensions(run))


def run(args: argparse.Namespace) -> int:
    if len(args.param) != len(args.values):
        raise UsageError(f"{len(args.param)} --param but {len(args.values)} --values: give one "
                         "--values list after each --param")
    if len(args.param) > 2:
        raise UsageError("sweep at most two parameters at once")
    params = [(name, parse_values(name, vals)) for name, vals in zip(args.param, args.values)]
    profile = profile_from_args(args)
    variants = (args.variants if args.variants is not None
                else list(DEFAULT_VARIANTS) + args.user_variants)
    check_prices(profile, nested=args.nested != "off" or any(
        name == "nested" and any(v != "off" for v in values) for name, values in params))
    base = Base(caches=args.caches, vpid=args.vpid, nested=args.nested)
    with OutputFolder(args.out) as folder:  # writable, locked; nothing published until commit
        with fanout.open_client(args.workers, args.scheduler) as client:
            result = with_progress("sweep", lambda on_step: run_sweep(
                params, routes=args.routes, variants=variants, profile=profile, base=base,
                iterations=args.iterations, progress=on_step, client=client))
        from fastmmio.report.compare import sweep_table, write_sweep

        write_sweep(result, args.out)  # staged in the folder
        out = stdout_console()
        out.print(sweep_table(result))
        paths = folder.commit()
    out.print(Text(f"Written: {', '.join(str(p) for p in paths)}"))
    return 0
