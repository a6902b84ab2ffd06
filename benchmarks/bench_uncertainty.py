"""The uncertainty of ``fastmmio compare --uncertainty N``: N sampled price vectors over every
cell of a compare run, against the plain pricing of one vector, measured in the same run.

1. One ``compare --no-kvm --no-review`` run through the API (its simulations are not timed
   here: they are the stored cells both sides read).
2. Baseline: every cell of the run priced once with its profile
   (:meth:`fastmmio.costs.CostModel.price` on the stored events: what compare does per cell).
3. Uncertainty: :func:`fastmmio.verdict.judge.uncertainty` over the same cells with N samples
   (each cell's coefficient row built from its events, N price vectors drawn, one matrix
   product, per-cell quantiles and as-fast shares), cold (rows built) each repetition.
4. Printed: both medians over the repetitions, their ratio, and the ratio against the mean
   time of one simulation of the run (a warm-up batch and a steady-state batch of one route).

    .venv/bin/python benchmarks/bench_uncertainty.py [--samples 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from fastmmio.compare.run import CompareOptions, run_compare
from fastmmio.verdict.judge import Rows, uncertainty


def plain_pricing(run) -> float:
    t0 = time.perf_counter()
    n = 0
    for c in run.all_cells():
        res = c.run.result
        if c.pricing is None or res is None:
            continue
        run.comparison.model(c.run.options.nested).price(res.events, res.iterations)
        n += 1
    return time.perf_counter() - t0


def sampled(run, samples: int, seed: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    u = uncertainty(Rows(run.comparison), run.all_cells(), samples, seed=seed)
    return time.perf_counter() - t0, len(u.cells)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    run = run_compare(CompareOptions(kvm=False, review=False))
    cells = [c for c in run.all_cells() if c.pricing is not None]
    sims = run.timings.counts["simulate"]
    per_sim = run.timings.seconds["simulate"] / max(sims, 1)
    plain, samp = [], []
    n_cells = 0
    for i in range(args.repeat):  # interleaved, so that load on the machine hits both
        plain.append(plain_pricing(run))
        s, n_cells = sampled(run, args.samples, seed=i)
        samp.append(s)
    p, s = statistics.median(plain), statistics.median(samp)
    print(f"cells: {len(cells)} priced cells of one compare run ({n_cells} with statistics), "
          f"{len(run.comparison.profile.prices)} prices in {run.profile.name}")
    print(f"plain pricing of one price vector over every cell: {1000 * p:8.2f} ms "
          f"(median of {args.repeat})")
    print(f"{args.samples} sampled price vectors over every cell: {1000 * s:8.2f} ms "
          f"(median of {args.repeat})")
    print(f"ratio sampled / plain = {s / p:.1f}x: one sampled price vector over every cell "
          f"costs {s / p / args.samples:.5f} of one plain pricing")
    total = run.timings.seconds["simulate"]
    print(f"simulation in this run: {sims} simulations, {total:.1f} s, {1000 * per_sim:.0f} ms "
          f"each on average; sampled / one simulation = {s / per_sim:.2f}x, sampled / all "
          f"of the run's simulations = {s / total:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
