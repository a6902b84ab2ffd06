"""``fastmmio compare``: the main job. Every route of the catalogue on the simulator under the
2015 thread's KVM variants, priced with a CPU profile, next to the same upstream routes
measured on this host's KVM; the calibration against the published figures; the verdict.

Exit status: 0 when upstream KVM (simulated and real) passed every route's checks; 1 when it
did not (a tool or host problem; a *variant* failing a check is a finding of the verdict, not
an error); 2 for a usage error (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, TypeVar

from rich.console import Console
from rich.text import Text
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from fastmmio import fanout
from fastmmio.sim.nested import NESTED_DEFAULT
from fastmmio.argtypes import nested_l0, cpu_number, csv_list, int_in_range, on_off, positive_int, positive_seconds
from fastmmio.argtypes import percent as percent_arg
from fastmmio.compare.core import DEFAULT_ITERATIONS, MAX_ITERATIONS
from fastmmio.compare.run import (
    DEFAULT_CACHES,
    DEFAULT_DEVICE,
    DEFAULT_PROFILE,
    KVM_MAX_TARGET_TICKS,
    SVM_PROFILE,
    KVM_RUNS,
    KVM_SECONDS,
    KVM_TARGET_TICKS,
    KVM_TOLERANCE,
    MAX_SAMPLES,
    CompareOptions,
    default_out,
    run_compare,
)
from fastmmio.commands.extensions import (
    add_price_argument,
    add_routes_file_argument,
    add_variant_file_argument,
    profile_from_args,
    with_extensions,
)
from fastmmio.costs import check_prices, list_profiles, load_profile
from fastmmio.costs.linear import SAMPLING
from fastmmio.outputs import OutputFolder
from fastmmio.sim.kvm.variants import ALL_VARIANTS, ARCHES, VARIANTS
from fastmmio.sim.vmx.caches import CONFIGS
from fastmmio.verdict import DEFAULT_TOLERANCE


T = TypeVar("T")
iterations_arg = int_in_range(1, MAX_ITERATIONS)

# --workers default: serial. Measured on the development machine (2 cores, benchmarks/
# bench_dask.py): a LocalCluster of 2 workers takes 2.3-4.6 s to start, an 8-simulation sweep
# took 0.17 s serially and 5.1 s on it, and a whole default `compare --no-kvm` lasts about
# the start-up; parallelism pays for sweeps of hundreds of simulations (1.5x on a loaded
# 2-core machine, 1.7x by CPU split) and on a remote cluster (--scheduler).
DEFAULT_WORKERS = 0


def arch_list(text: str) -> tuple[str, ...]:
    """``vmx``, ``svm`` or both, comma-separated."""
    names = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [a for a in names if a not in ARCHES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"architectures: choose from {', '.join(ARCHES)}")
    return names


def add_sim_arguments(p: argparse.ArgumentParser, *, default_variants: str | None) -> None:
    """Options shared by compare and sweep: the simulated machine, the profile and what the
    user brings (:mod:`fastmmio.commands.extensions`). ``--variants`` is None when not given:
    the command's default then includes the variants the user loaded (``default_variants``,
    for the help, None: every variant of the chosen architectures)."""
    p.add_argument("--variants", type=csv_list, default=None,
                   metavar="V1,V2", help=f"KVM variants (default "
                   f"{default_variants or 'every variant of --arch and of --variant-file'}; "
                   f"choose from {', '.join(ALL_VARIANTS if default_variants is None else VARIANTS)}, "
                   "or a variant of --variant-file)")
    add_variant_file_argument(p)
    add_routes_file_argument(p)
    add_price_argument(p)
    p.add_argument("--profile", default=DEFAULT_PROFILE, metavar="NAME|FILE.toml",
                   help=f"CPU cost profile (default {DEFAULT_PROFILE}; bundled: "
                   f"{', '.join(list_profiles())}; or a .toml path)")
    p.add_argument("--caches", default=DEFAULT_CACHES, metavar="CONFIG",
                   help=f"translation-cache configuration (default {DEFAULT_CACHES}; "
                   f"choose from {', '.join(CONFIGS)})")
    p.add_argument("--vpid", type=on_off, default=True, metavar="on|off",
                   help="KVM's 'enable VPID' (default on)")
    p.add_argument("--nested", nargs="?", type=nested_l0, const=NESTED_DEFAULT, default="off",
                   metavar="L0",
                   help="KVM runs as a guest of an L0 hypervisor: kvm (shadow EPT, shadow "
                   "VMCS; the default of a bare --nested) or hyperv (Enlightened VMCS, VM-exit "
                   "instruction length undefined on EPT exits); off (default)")
    p.add_argument("--iterations", "-n", type=iterations_arg, default=DEFAULT_ITERATIONS,
                   metavar="N", help=f"simulated steady-state batch (default "
                   f"{DEFAULT_ITERATIONS}, after a warm-up batch)")
    p.add_argument("--out", type=Path, default=default_out(), metavar="DIR",
                   help=f"output folder (default ./{default_out()})")
    fanout.add_arguments(p, DEFAULT_WORKERS, "the simulations")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="the main job: every route simulated under the thread's KVM variants, next to "
        "this host's KVM, with the verdict",
        description="Run every route of the catalogue on the simulator under each KVM variant "
        "(warm-up batch, then one steady-state batch), price it with a CPU profile, measure "
        "the upstream routes on this host's /dev/kvm when there is one, and answer the 2015 "
        "thread ('is MMIO as fast as port I/O?') from the same numbers. Writes results.json, "
        "results.csv, breakdown.png and breakdown.svg into the output folder.",
    )
    p.add_argument("routes", nargs="*", metavar="ROUTE",
                   help="routes (default: the whole catalogue; see fastmmio bench --list)")
    add_sim_arguments(p, default_variants=None)
    p.add_argument("--arch", type=arch_list, default=("vmx",), metavar="vmx,svm",
                   help="simulated processors: vmx (Intel VMX/EPT), svm (AMD SVM with nested "
                   "paging, KVM's SVM handlers), or both (default vmx)")
    p.add_argument("--svm-profile", default=SVM_PROFILE, metavar="NAME|FILE.toml",
                   help=f"CPU cost profile for the SVM simulations (default {SVM_PROFILE}; "
                   "--profile prices them when --arch is svm alone)")
    p.add_argument("--no-kvm", action="store_true", help="do not measure on this host's KVM")
    p.add_argument("--device", default=None, metavar="PATH",
                   help="KVM device (default /dev/kvm when it is usable; a device named here "
                   "must be)")
    p.add_argument("--kvm-runs", type=positive_int, default=KVM_RUNS, metavar="R",
                   help=f"at most R runs per route on KVM; a route whose median is stable "
                   f"stops earlier (default {KVM_RUNS})")
    p.add_argument("--kvm-target-ticks", type=int_in_range(1, KVM_MAX_TARGET_TICKS),
                   default=KVM_TARGET_TICKS, metavar="T",
                   help=f"calibration goal of one KVM batch in TSC ticks (default 2^20 = "
                   f"{KVM_TARGET_TICKS}; at most 2^32)")
    p.add_argument("--kvm-seconds", type=positive_seconds, default=KVM_SECONDS, metavar="S",
                   help=f"time bound of the KVM measurement (default {KVM_SECONDS:g} s)")
    p.add_argument("--kvm-tolerance", type=percent_arg, default=KVM_TOLERANCE, metavar="PCT",
                   help=f"a KVM route is stable once the 95%% confidence interval of its median "
                   f"is within +-PCT of it (default {KVM_TOLERANCE * 100:g}%%); otherwise it "
                   "is flagged noisy and gets no ratio")
    p.add_argument("--cpu", type=cpu_number, metavar="N",
                   help="pin the vCPU thread to CPU N while measuring on KVM")
    p.add_argument("--tolerance", type=percent_arg, default=DEFAULT_TOLERANCE, metavar="PCT",
                   help=f"'as fast as port I/O' means within this many percent "
                   f"(default {DEFAULT_TOLERANCE * 100:g}%%)")
    p.add_argument("--uncertainty", type=int_in_range(1, MAX_SAMPLES), default=0, metavar="N",
                   help="also sample N price sets inside the profile's intervals and say in "
                   "how many each doorbell is as fast as port I/O (default off)")
    p.add_argument("--seed", type=int_in_range(0, 2**63 - 1), default=0, metavar="S",
                   help="seed of the sampled price sets (default 0)")
    p.add_argument("--sampling", choices=SAMPLING, default="uniform",
                   help="how prices are drawn inside their intervals (default uniform)")
    p.add_argument("--no-verdict", action="store_true", help="tables and files only")
    p.add_argument("--detail", action="store_true",
                   help="after the answer, the per-route tables (cycles by component, exits, "
                        "walk references, EPT entry), once for what every variant shares")
    p.add_argument("--no-review", action="store_true",
                   help="leave out the checks of fastmmio.review from the verdict")
    p.set_defaults(func=with_extensions(run))


def progress_display() -> tuple[Progress, Console]:
    err = Console(stderr=True)
    progress = Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    )
    return progress, err


def with_progress(label: str, work: Callable[[Callable[[str, int, int], None]], T]) -> T:
    """``work(on_step)`` under a progress bar on stderr (when it is a terminal); ``on_step``
    takes (what, done, total)."""
    progress, _ = progress_display()
    with progress:
        task = progress.add_task(label, total=None)

        def on_step(what: str, done: int, total: int) -> None:
            progress.update(task, description=what, completed=done, total=total)

        return work(on_step)


def stdout_console() -> Console:
    from fastmmio.report.compare import console_width

    return Console(width=console_width())  # COLUMNS honoured when piped too


def check_device(args: argparse.Namespace) -> str:
    """The KVM device to measure on: ``--device`` when given, which must then be usable
    (HostError now, exit status 2, before any simulation), else /dev/kvm when it is (a host
    without one is reported in the output, not refused)."""
    if args.device is None or args.no_kvm:
        return args.device or DEFAULT_DEVICE
    from fastmmio.real.backend import RealBackend

    RealBackend(device=args.device).check()
    return args.device


def run(args: argparse.Namespace) -> int:
    svm_only = tuple(args.arch) == ("svm",)
    if svm_only and args.profile == DEFAULT_PROFILE:
        args.profile = args.svm_profile  # an Intel profile cannot price SVM runs
    profile = profile_from_args(args)  # ProfileError: one line, exit 2
    if "svm" in args.arch and not svm_only:
        load_profile(args.svm_profile)
    options = CompareOptions(
        routes=tuple(args.routes),
        variants=tuple(args.variants) if args.variants is not None else None,
        profile=args.profile,
        caches=args.caches, vpid=args.vpid, nested=args.nested, iterations=args.iterations,
        kvm=not args.no_kvm, device=check_device(args), kvm_runs=args.kvm_runs,
        kvm_target_ticks=args.kvm_target_ticks, kvm_seconds=args.kvm_seconds,
        kvm_tolerance=args.kvm_tolerance, kvm_cpu=args.cpu, tolerance=args.tolerance,
        verdict=not args.no_verdict, review=not args.no_review, uncertainty=args.uncertainty,
        seed=args.seed, sampling=args.sampling, arches=args.arch, svm_profile=args.svm_profile)
    check_prices(profile, nested=args.nested != "off")
    if "svm" in args.arch and not svm_only:
        check_prices(args.svm_profile)
    with OutputFolder(args.out) as folder:  # writable, locked; nothing published until commit
        with fanout.open_client(args.workers, args.scheduler) as client:
            result = with_progress("compare", lambda on_step: run_compare(
                options, on_step, profile=profile, client=client))
        result.argv = list(getattr(args, "command_line", result.argv))
        from fastmmio.report.compare import render, write_outputs

        write_outputs(result, args.out)  # staged in the folder
        out = stdout_console()
        render(out, result, detail=args.detail)
        out.print()
        paths = folder.commit()
    out.print(Text(f"Written: {', '.join(str(p) for p in paths)}  "
                   f"(compare took {result.wall_s:.1f} s)"))
    failed = result.failed_baseline()
    for line in failed:
        print(f"fastmmio compare: upstream route failed its checks: {line}", file=sys.stderr)
    return 1 if failed else 0
