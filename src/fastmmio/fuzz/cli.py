"""``fastmmio fuzz``: hostile guests, the ioeventfd soak and differential fuzzing on this
host's KVM (``python -m fastmmio.fuzz`` is the same command).

    fastmmio fuzz hostile [--runs N] [--seconds S] [--seed X] [--cpl 3,0] [--kind K ...]
    fastmmio fuzz hostile --seed X --only I      # rebuild and rerun program X:I
    fastmmio fuzz soak [--notifications N] [--batch B] [ROUTE ...]
    fastmmio fuzz diff [--examples N] [--seconds S] [--seed X] [--save-dir DIR]

Exit status: 0 when every run ended in a defined, allowed outcome with no leak (hostile) or
every notification was signalled and none exited to userspace (soak); 1 otherwise; 2 for a
usage or host error (one line on stderr); 3 when a run hung the host process.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from fastmmio import fanout
from fastmmio.argtypes import positive_int, positive_seconds



MAX_WATCHDOG_S = 600.0


def _watchdog(text: str) -> float:
    value = positive_seconds(text)
    if value > MAX_WATCHDOG_S:
        raise argparse.ArgumentTypeError(f"at most {MAX_WATCHDOG_S:g} s: {text}")
    return value


def _cpls(text: str) -> tuple[int, ...]:
    try:
        cpls = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of 0 and 3: {text!r}") from None
    if not cpls or any(c not in (0, 3) for c in cpls):
        raise argparse.ArgumentTypeError(f"guest CPLs must be 0 or 3: {text!r}")
    return cpls


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """``hostile``, ``soak`` and ``diff`` under ``fastmmio fuzz`` (see
    :mod:`fastmmio.commands.fuzz`)."""
    from fastmmio.fuzz.hostile import KINDS
    from fastmmio.fuzz.soak import DEFAULT_BATCH, DEFAULT_NOTIFICATIONS

    h = sub.add_parser("hostile", help="run hostile guests until --runs or --seconds; report outcomes and leaks")
    h.add_argument("--runs", type=positive_int, metavar="N", help="stop after N runs")
    h.add_argument("--seconds", type=positive_seconds, metavar="S", help="stop after S seconds (default 60 without --runs)")
    h.add_argument("--seed", type=int, default=None, help="program stream (default: from the clock, printed)")
    h.add_argument("--start", type=int, default=0, metavar="I", help="first program index (default 0)")
    h.add_argument("--only", type=int, metavar="I",
                   help="run program I of --seed alone, with its listing (needs --seed)")
    h.add_argument("--cpl", type=_cpls, default=(3, 0), metavar="LIST",
                   help="guest CPLs to draw from, e.g. 3 or 3,0 (default 3,0: CPL0 exercises KVM's "
                   "emulator where it runs CPL0 code, as under PVM)")
    h.add_argument("--kind", action="append", choices=KINDS, help="only these kinds (repeatable)")
    h.add_argument("--watchdog", type=_watchdog, default=None, metavar="S",
                   help="run-loop watchdog per run (default 0.25 s)")
    h.add_argument("--device", default="/dev/kvm", metavar="PATH")
    h.add_argument("--verbose", "-v", action="store_true", help="one line per run")
    fanout.add_arguments(h, 0, "the programs (shares of --seed's stream, each worker on its own host's "
                         "/dev/kvm; no leak checks there)")
    h.set_defaults(func=run_hostile)

    s = sub.add_parser("soak", help="N notifications through each ioeventfd route: none lost, no user exit")
    s.add_argument("routes", nargs="*", metavar="ROUTE", help="routes (default: every ioeventfd route this host runs)")
    s.add_argument("--notifications", "-n", type=positive_int, default=DEFAULT_NOTIFICATIONS, metavar="N",
                   help=f"notifications per route (default {DEFAULT_NOTIFICATIONS})")
    s.add_argument("--batch", type=positive_int, default=DEFAULT_BATCH, metavar="B",
                   help=f"notifications per guest batch (default {DEFAULT_BATCH})")
    s.add_argument("--cpl", type=int, choices=(0, 3), help="guest CPL (default: from host detection)")
    s.add_argument("--device", default="/dev/kvm", metavar="PATH")
    s.set_defaults(func=run_soak)

    from fastmmio.fuzz.differential import add_parser as add_diff_parser  # H9: fuzz diff

    add_diff_parser(sub)


def run_hostile(args: argparse.Namespace) -> int:
    from fastmmio.fuzz.hostile import KINDS, generate
    from fastmmio.errors import UsageError
    from fastmmio.fuzz.runner import DEFAULT_WATCHDOG_S, campaign, run_program
    from fastmmio.real.backend import RealBackend

    if args.only is not None and args.seed is None:
        raise UsageError("--only I reruns program I of a seed's stream: give the --seed the "
                         "campaign printed")
    workers, scheduler = fanout.resolve(args.workers, args.scheduler)
    if scheduler is None or args.only is not None:  # on a remote cluster each worker checks its own
        RealBackend(device=args.device).check()
    kinds = tuple(args.kind) if args.kind else KINDS
    watchdog = args.watchdog or DEFAULT_WATCHDOG_S
    seed = args.seed if args.seed is not None else int(time.time())
    if args.only is not None:
        program = generate(seed, args.only, kinds, args.cpl)
        print(program.describe())
        for line in program.listing():
            print("   ", line)
        outcome = run_program(program, args.device, watchdog)
        print(f"-> {outcome.label} in {outcome.seconds:.3f} s ({', '.join(sorted(program.allowed))} allowed)")
        if outcome.message:
            print(outcome.message)
        return 0 if outcome.outcome in program.allowed else 1
    runs, seconds = args.runs, args.seconds
    if runs is None and seconds is None:
        seconds = 60.0
    print(f"fastmmio fuzz hostile: seed {seed}, kinds {', '.join(kinds)}, CPL {','.join(map(str, args.cpl))}, "
          f"watchdog {watchdog:g} s, until {f'{runs} runs' if runs else ''}"
          f"{' or ' if runs and seconds else ''}{f'{seconds:g} s' if seconds else ''}", flush=True)
    if scheduler is not None or workers:
        return _run_hostile_cluster(args, seed, kinds, watchdog, runs, seconds)
    programs = (generate(seed, i, kinds, args.cpl) for i in itertools.count(args.start))

    def on_run(n, program, outcome):
        bad = outcome.outcome == "crash" or outcome.outcome not in program.allowed
        if args.verbose or bad:
            print(f"{n:6} {program.describe()} -> {outcome.label} {outcome.seconds:.3f} s"
                  + (f"\n{outcome.message}" if bad else ""), flush=True)

    summary = campaign(programs, runs, seconds, args.device, watchdog, on_run=on_run)
    for line in summary.lines():
        print(line)
    print(f"reproduce one: fastmmio fuzz hostile --seed {seed} --only INDEX")
    return 0 if summary.ok else 1


def _run_hostile_cluster(args: argparse.Namespace, seed: int, kinds: tuple[str, ...], watchdog: float,
                         runs: int | None, seconds: float | None) -> int:
    from fastmmio.fuzz.cluster import host_label, hostile_campaign

    progress, task = fanout.progress_bar("hostile", runs)
    with fanout.open_client(args.workers, args.scheduler) as client, progress:
        def on_share(done, summary, host):
            progress.update(task, completed=done, detail=host.get("hostname", "lost") if host else "lost")

        summary, hosts = hostile_campaign(client, seed, args.start, kinds, args.cpl, runs, seconds,
                                          args.device, watchdog, on_share=on_share)
    for host in hosts:
        print(f"worker {host.get('worker') or '(local)'}: {host_label(host)}, kernel {host.get('kernel')}")
    for line in summary.lines():
        print(line)
    print("leak checks: not run on a cluster (a Dask worker's /proc/self holds its own "
          "connections and threads); run with --workers 0 for them")
    print(f"reproduce one: fastmmio fuzz hostile --seed {seed} --only INDEX")
    return 0 if summary.ok else 1


def run_soak(args: argparse.Namespace) -> int:
    from fastmmio.fuzz.soak import named_soak_routes, soak
    from fastmmio.real.backend import RealBackend

    named_soak_routes(args.routes)  # bad names before touching the device
    RealBackend(device=args.device).check()
    print(f"fastmmio fuzz soak: {args.notifications} notifications per route, batches of {args.batch}", flush=True)
    t0 = time.perf_counter()

    def on_result(res):
        print(res.line(), flush=True)
        for c in res.checks:
            if c.startswith("FAIL"):
                print(f"    {c}", flush=True)

    results = soak(args.routes or None, args.notifications, args.batch, args.device, args.cpl,
                   on_result=on_result,
                   on_skip=lambda r, why: print(f"fastmmio fuzz soak: skipping {r.name}: {why}",
                                                  file=sys.stderr))
    total = sum(r.notifications for r in results)
    lost = sum(r.lost for r in results)
    exits = sum(r.user_exits for r in results)
    print(f"total: {len(results)} routes, {total} notifications, {lost} lost, {exits} user exits, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0 if all(r.ok for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m fastmmio.fuzz ARGS``: the same as ``fastmmio fuzz ARGS``."""
    from fastmmio.cli import build_parser, dispatch, exit_now_if_interrupted

    status = dispatch(build_parser, ["fuzz", *(sys.argv[1:] if argv is None else argv)],
                      "fastmmio")
    return exit_now_if_interrupted(status, argv)


__all__ = ["add_subcommands", "main"]
