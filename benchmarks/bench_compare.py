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

    .venv/bin/python benchmarks/bench_compare.py [--profile-variants V1,V2] [--top N]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
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
from fastmmio.sim.backend import SimBackend, SimOptions
from fastmmio.sim.kvm.variants import VARIANTS


def timed_cli(out: Path) -> float:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(["compare", "--no-kvm", "--out", str(out)])
    wall = time.perf_counter() - t0
    if code not in (0, 1):
        sys.exit(f"fastmmio compare exited {code}")
    return wall


def baseline() -> tuple[float, int]:
    """Bare simulation of the main matrix: (seconds, simulations)."""
    n = 0
    t0 = time.perf_counter()
    for v in VARIANTS:
        backend = SimBackend(SimOptions(variant=v))
        for r in load_catalogue():
            try:
                measure_route(backend, r, SIM_CPL, BenchOptions(iterations=DEFAULT_ITERATIONS,
                                                                runs=1), price=lambda b: 0.0)
            except IoEventFdError:
                pass
            n += 1
    return time.perf_counter() - t0, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile-variants", default="upstream")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
