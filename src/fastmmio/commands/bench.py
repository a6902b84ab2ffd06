"""``fastmmio bench``: measure routes on this host's KVM, kvm-unit-tests style.

Exit status: 0 when every route passed its checks, 1 when a route failed one, 2 for a usage or
host error (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from fastmmio.bench import (
    DEFAULT_MIN_RUNS,
    DEFAULT_RUNS,
    DEFAULT_SECONDS,
    DEFAULT_TARGET_TICKS,
    DEFAULT_TOLERANCE,
    BenchOptions,
    bench_routes,
)
from fastmmio.commands.extensions import add_routes_file_argument, with_extensions
from fastmmio.errors import HostError, UsageError
from fastmmio.outputs import check_writable_file, is_stdout, write_final
from fastmmio.real.host import unsupported_reason
from fastmmio.argtypes import cpu_number, csv_list, percent, positive_int, positive_seconds
from fastmmio.fanout import scheduler_address
from fastmmio.report.bench import bench_table, json_records, kut_lines
from fastmmio.result import BatchResult
from fastmmio.routes import Route, get_route, load_catalogue


# Calibration goals beyond 2^40 TSC ticks (minutes per batch at any TSC rate) are a typo, not
# a measurement; they would also overflow the watchdog's timer arithmetic.
MAX_TARGET_TICKS = 1 << 40


def _target_ticks(text: str) -> int:
    value = positive_int(text)
    if value > MAX_TARGET_TICKS:
        raise argparse.ArgumentTypeError(f"at most 2^40 = {MAX_TARGET_TICKS}: {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure routes on this host's KVM (cycles per notification, kvm-unit-tests style)",
        description="Run each route's doorbell loop on /dev/kvm: calibrate N by doubling from 64 "
        "until a batch takes the target number of TSC ticks (or use a fixed N), then run it, the "
        "routes interleaved, until the median of each route's runs is stable (its 95% confidence "
        "interval within the tolerance), at most R runs and S seconds; report the "
        "median cycles per notification with its spread, flag a route that did not settle as "
        "noisy, and check that the route took its path (eventfd counts, user exits, exit "
        "records, read-only memory, read values).",
    )
    p.add_argument("routes", nargs="*", metavar="ROUTE",
                   help="route names (default: every route this host supports)")
    p.add_argument("--cpl", type=int, choices=(0, 3),
                   help="guest privilege level (default: from host detection; 3 under PVM)")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--iterations", "-n", type=positive_int, metavar="N",
                   help="fixed N accesses per batch (no calibration)")
    n.add_argument("--target-ticks", type=_target_ticks, metavar="T", default=DEFAULT_TARGET_TICKS,
                   help=f"calibration goal per batch in TSC ticks (default 2^28 = "
                   f"{DEFAULT_TARGET_TICKS}; kvm-unit-tests uses 2^30)")
    p.add_argument("--runs", "-r", type=positive_int, default=DEFAULT_RUNS, metavar="R",
                   help=f"at most R measured batches per route; the median is reported, and a "
                   f"route stops as soon as it is stable (at least {DEFAULT_MIN_RUNS} runs; "
                   f"default {DEFAULT_RUNS})")
    p.add_argument("--tolerance", type=percent, default=DEFAULT_TOLERANCE, metavar="PCT",
                   help=f"a route is stable once the 95%% confidence interval of its median is "
                   f"within +-PCT of it (default {DEFAULT_TOLERANCE * 100:g}%%)")
    p.add_argument("--seconds", type=positive_seconds, default=DEFAULT_SECONDS, metavar="S",
                   help=f"time bound of the whole measurement (default {DEFAULT_SECONDS:g} s; "
                   "every route gets at least one run)")
    p.add_argument("--cpu", type=cpu_number, metavar="N",
                   help="pin the vCPU thread (the one that issues KVM_RUN) to CPU N")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="also write a host record and one record per route as JSON to FILE "
                   "(written whole or not at all); '-': to standard output, instead of the table")
    p.add_argument("--format", choices=("table", "kut"), default="table",
                   help="table (default) or kvm-unit-tests lines 'NAME CYCLES' (today's names, "
                   "data/kut.toml)")
    p.add_argument("--device", default="/dev/kvm", metavar="PATH", help="KVM device (default /dev/kvm)")
    p.add_argument("--list", action="store_true",
                   help="list the routes and the kvm-unit-tests name table, and exit")
    p.add_argument("--scheduler", type=scheduler_address, metavar="tcp://HOST:PORT",
                   help="fleet view: run the bench on one worker of each host of this Dask "
                   "cluster, each on its own /dev/kvm, and print one column per host (--json: "
                   "every host's records in one file)")
    p.add_argument("--hosts", type=csv_list, metavar="H1,H2",
                   help="with --scheduler: only these hosts (worker address host part or host name)")
    add_routes_file_argument(p)
    p.set_defaults(func=with_extensions(run))


# A bound on one access, for the watchdog only: the slowest route measured on PVM (an exit to
# userspace) costs about 200k TSC ticks, and this leaves 2.5x room.
WORST_TICKS_PER_ACCESS = 500_000


def watchdog_seconds(args: argparse.Namespace, tsc_khz: int | None) -> float:
    """How long one batch may run before the backend's watchdog stops the guest: the real
    backend's default, or more when the goal (calibration overshoots it by up to 2x) or a
    large fixed N needs it."""
    from fastmmio.real.backend import DEFAULT_WATCHDOG_S

    hz = (tsc_khz or 1_000_000) * 1000  # unknown TSC: assume a slow 1 GHz
    if args.iterations is not None:
        need = args.iterations * WORST_TICKS_PER_ACCESS / hz
    else:
        need = 2 * args.target_ticks / hz
    return max(DEFAULT_WATCHDOG_S, 2 * need + 5)


def _select_routes(args: argparse.Namespace, kvm, host) -> tuple[list[Route], list[tuple[Route, str]]]:
    if args.routes:
        routes = [get_route(name) for name in args.routes]  # UsageError lists valid names
        for r in routes:
            reason = unsupported_reason(kvm, r, host.guest_cpl, host.kvm_kind)
            if reason:
                raise HostError(f"route {r.name}: {reason}")
        return routes, []
    chosen, skipped = [], []
    for r in load_catalogue():
        reason = unsupported_reason(kvm, r, host.guest_cpl, host.kvm_kind)
        (skipped.append((r, reason)) if reason else chosen.append(r))
    return chosen, skipped


def run(args: argparse.Namespace) -> int:
    if args.list:
        from fastmmio.kut import describe_table

        for r in load_catalogue():
            kut = f"  [{r.kut}]" if r.kut else ""
            print(f"{r.name:22} {r.description}{kut}")
        print()
        print("kvm-unit-tests names (src/fastmmio/data/kut.toml; --format kut prints era current):")
        for line in describe_table():
            print(line)
        return 0
    # Validate route names, options and the output path before touching the device.
    for name in args.routes:
        get_route(name)
    options = BenchOptions(
        iterations=args.iterations,
        target_ticks=args.target_ticks if args.iterations is None else DEFAULT_TARGET_TICKS,
        runs=args.runs,
        tolerance=args.tolerance,
        max_seconds=args.seconds,
        cpu=args.cpu,
    )
    if args.json is not None:
        check_writable_file(args.json)
    if args.hosts and not args.scheduler:
        raise UsageError("--hosts chooses workers of a cluster: give --scheduler too")
    if args.scheduler:
        return run_fleet(args, options)
    from fastmmio.real.backend import RealBackend
    from fastmmio.real.host import detect_host
    from fastmmio.real.objects import Kvm

    RealBackend(device=args.device).check()  # HostError: missing device, no permission, ...
    host = detect_host(args.device, cpl=args.cpl)
    backend = RealBackend(device=args.device, watchdog_s=watchdog_seconds(args, host.tsc_khz))
    if args.cpl is None:
        print(f"fastmmio bench: guest CPL{host.guest_cpl}: {host.cpl_reason}", file=sys.stderr)
    with Kvm(args.device) as kvm:
        routes, skipped = _select_routes(args, kvm, host)
    for r, reason in skipped:
        print(f"fastmmio bench: skipping {r.name}: {reason}", file=sys.stderr)
    if not routes:
        raise HostError("no route of the catalogue can run on this host")

    err = Console(stderr=True)
    progress = Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    )
    with progress:
        task = progress.add_task("bench", total=len(routes), detail="")

        def on_batch(route: Route, phase: str, batch: BatchResult) -> None:
            progress.update(task, description=route.name,
                            detail=f"{phase} N={batch.iterations}")

        results = bench_routes(
            backend, routes, host.guest_cpl, options,
            on_batch=on_batch, on_result=lambda _r: progress.advance(task),
        )

    if is_stdout(args.json):
        pass  # the JSON is the output
    elif args.format == "kut":
        for line in kut_lines(results):
            print(line)
    else:
        term = Console()
        out = term if term.is_terminal else Console(width=160)
        out.print(bench_table(results, host))
    failed = [r for r in results if not r.correct]
    for r in failed:
        for line in r.checks:
            if line.startswith("FAIL"):
                print(f"fastmmio bench: {r.route}: {line}", file=sys.stderr)
    if args.json:
        write_final(args.json, json.dumps(json_records(results, host), indent=2) + "\n")
    return 1 if failed else 0


def run_fleet(args: argparse.Namespace, options: BenchOptions) -> int:
    """``bench --scheduler``: :func:`fastmmio.bench.bench_this_host` on one worker of each
    chosen host, gathered into one table (a column per host) and one JSON file."""
    import functools

    from fastmmio import fanout
    from fastmmio.bench import bench_this_host
    from fastmmio.report.bench import fleet_records, fleet_table

    progress, task = fanout.progress_bar("bench on each host", None)
    with fanout.open_client(0, args.scheduler) as client, progress:
        hosts = fanout.on_each_host(
            client, bench_this_host, hosts=args.hosts or (),
            on_done=lambda h, _r: progress.update(task, advance=1, detail=h),
            route_names=list(args.routes), options=options, cpl=args.cpl, device=args.device,
            watchdog_s=functools.partial(watchdog_seconds, args))
    benches = []
    for name, res in hosts.items():
        if isinstance(res, BaseException):
            raise HostError(f"the bench task on {name} failed: {type(res).__name__}: {res}")
        benches.append(res)
    if not is_stdout(args.json):  # with --json -, the JSON is the output
        term = Console()
        (term if term.is_terminal else Console(width=200)).print(fleet_table(benches))
    failed = 0
    for hb in benches:
        if hb.error:
            print(f"fastmmio bench: {hb.hostname}: {hb.error}", file=sys.stderr)
            failed += 1
        for r in hb.results:
            for line in r.checks:
                if line.startswith("FAIL"):
                    print(f"fastmmio bench: {hb.hostname}: {r.route}: {line}", file=sys.stderr)
                    failed += 1
    if args.json:
        write_final(args.json, json.dumps(fleet_records(benches), indent=2) + "\n")
    return 1 if failed else 0
