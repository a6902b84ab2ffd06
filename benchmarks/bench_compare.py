"""End-to-end time of ``fastmmio compare --no-kvm`` (the simulator side of ``make run``), and
where it goes.

1. ``fastmmio compare --no-kvm`` through the CLI into a temporary folder, timed: wall time,
   then the run's own accounting (``CompareRun.timings``): simulation per variant and the
   slowest routes, pricing, the review checks, the verdict, writing, plotting.
2. Baseline, measured in the same run: the bare simulation of the same main matrix (every
   route under every variant, :func:`fastmmio.bench.measure_route` on a SimBackend with the
   same N, no pricing, no verdict, no outputs): the least any compare must spend. Printed:
   compare wall / baseline.
3. cProfile of one more compare (``--profile-variants``, default ``upstream`` only, to keep
   the profile short): the top entries by cumulative and by own time.
4. With ``--against DIR`` (another checkout of fastmmio, e.g. ``git worktree add DIR main``):
   ``fastmmio compare --no-kvm`` of that tree and of this one, each in a fresh process
   (``PYTHONPATH=DIR/src`` for the other), alternately ``--rounds`` times: the median wall
   time of each and their ratio, measured in one run on the same machine.

    .venv/bin/python benchmarks/bench_compare.py [--profile-variants V1,V2] [--top N]
                                                 [--against DIR [--rounds R]]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastmmio.bench import BenchOptions, measure_route
from fastmmio.cli import main as cli_main
from fastmmio.compare.core import DEFAULT_ITERATIONS, SIM_CPL
from fastmmio.compare.run import CompareOptions, run_compare
from fastmmio.errors import IoEventFdError
from fastmmio.report.compare import write_outputs
from fastmmio.routes import load_catalogue
from fastmmio.sim.backend import EnginePool, SimBackend, SimOptions
from fastmmio.sim.kvm.variants import VARIANTS


def timed_cli(out: Path) -> float:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(["compare", "--no-kvm", "--out", str(out)])
    wall = time.perf_counter() - t0
    if code not in (0, 1):
        sys.exit(f"fastmmio compare exited {code}")
    return wall


def cli_in_process(src: Path) -> float:
    """Wall seconds of ``fastmmio compare --no-kvm`` run from ``src`` in a new process."""
    env = dict(os.environ, PYTHONPATH=str(src))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fastmmio", "compare", "--no-kvm",
                               "--out", tmp], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        sys.exit(f"fastmmio compare from {src} exited {proc.returncode}: {proc.stderr[-500:]}")
    return wall


def against(other: Path, rounds: int) -> None:
    here = Path(__file__).resolve().parent.parent / "src"
    theirs: list[float] = []
    ours: list[float] = []
    for _ in range(rounds):
        theirs.append(cli_in_process(other / "src"))
        ours.append(cli_in_process(here))
    m_theirs, m_ours = statistics.median(theirs), statistics.median(ours)
    print(f"\ncompare --no-kvm, fresh processes, alternately x{rounds}:")
    print(f"  {str(other):40} median {m_theirs:6.1f} s  (runs {', '.join(f'{t:.1f}' for t in theirs)})")
    print(f"  {'this tree':40} median {m_ours:6.1f} s  (runs {', '.join(f'{t:.1f}' for t in ours)})")
    print(f"  this tree / {other.name}: {m_ours / m_theirs:.2f}x")


def baseline() -> tuple[float, int]:
    """Bare simulation of the main matrix: (seconds, simulations)."""
    n = 0
    t0 = time.perf_counter()
    engines = EnginePool()  # as compare's: engines set up once
    for v in VARIANTS:
        backend = SimBackend(SimOptions(variant=v), engines=engines)
        for r in load_catalogue():
            try:
                measure_route(backend, r, SIM_CPL, BenchOptions(iterations=DEFAULT_ITERATIONS,
                                                                runs=1), price=lambda b: 0.0)
            except IoEventFdError:
                pass
            n += 1
    engines.close()
    return time.perf_counter() - t0, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile-variants", default="upstream")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--against", type=Path, default=None,
                    help="another fastmmio checkout to time alternately with this one")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.against is not None and not (args.against / "src" / "fastmmio").is_dir():
        sys.exit(f"--against {args.against}: no src/fastmmio there")

    with tempfile.TemporaryDirectory() as tmp:
        wall = timed_cli(Path(tmp) / "cli")
        # the same run again through the API, for its accounting (it is deterministic)
        t0 = time.perf_counter()
        run = run_compare(CompareOptions(kvm=False))
        paths = write_outputs(run, Path(tmp) / "api")
        api_wall = time.perf_counter() - t0
    t = run.timings.seconds
    c = run.timings.counts
    print(f"fastmmio compare --no-kvm: wall {wall:.1f} s (CLI, tables and files included); "
          f"API run {api_wall:.1f} s, {c['simulate']} simulations, {len(paths)} files")
    print("\nwhere the API run's time goes:")
    phases = ("simulate", "verdict", "write", "plot")
    for key in phases + ("review", "price"):
        s = t.get(key, 0.0)
        note = {"verdict": " (the review checks included)", "review": " (inside verdict)",
                "price": " (spread over the matrix and the verdict)"}.get(key, "")
        print(f"  {key:10} {s:7.2f} s  {100 * s / api_wall:5.1f}%  ({c.get(key, 0)} calls){note}")
    rest = api_wall - sum(t.get(k, 0.0) for k in phases)
    print(f"  {'rest':10} {rest:7.2f} s  {100 * rest / api_wall:5.1f}%  (plan, matrix pricing, "
          "JSON/CSV building)")
    print("\nsimulation by variant:")
    for v in VARIANTS:
        k = f"simulate:variant:{v}"
        print(f"  {v:22} {t.get(k, 0):6.2f} s  {c.get(k, 0):3d} simulations  "
              f"{1000 * t.get(k, 0) / max(c.get(k, 1), 1):5.0f} ms each")
    routes = sorted(((k.split(":", 2)[2], s) for k, s in t.items()
                     if k.startswith("simulate:route:")), key=lambda x: -x[1])
    print("\nslowest routes (all their simulations):")
    for name, s in routes[:8]:
        print(f"  {name:22} {s:6.2f} s  ({c[f'simulate:route:{name}']} simulations)")

    base_s, base_n = baseline()
    print(f"\nbaseline: bare simulation of the main matrix ({base_n} routes x variants, "
          f"N={DEFAULT_ITERATIONS}, no pricing/verdict/outputs): {base_s:.1f} s")
    print(f"compare wall / baseline = {wall / base_s:.2f}x "
          f"(compare also simulates the verdict's scenarios and runs fastmmio.review)")

    variants = [v for v in args.profile_variants.split(",") if v]
    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        prof.enable()
        r2 = run_compare(CompareOptions(kvm=False, variants=tuple(variants)))
        write_outputs(r2, Path(tmp))
        prof.disable()
    for order in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(args.top)
        lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
        start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
        print(f"\ncProfile, compare --variants {','.join(variants)}, top {args.top} by {order}:")
        for ln in lines[start:start + args.top + 1]:
            print("  " + ln.replace(str(Path.cwd()) + "/", ""))
    if args.against is not None:
        against(args.against.resolve(), args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
