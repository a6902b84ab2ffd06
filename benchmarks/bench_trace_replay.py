"""Trace-replay speed of the processor model (fastmmio.sim.vmx) against a bare dict look-up
loop over the same trace, measured in the same run.

    python benchmarks/bench_trace_replay.py [--accesses N] [--pages P] [--configs a,b,...]

For each cache configuration it prints accesses per second of ``trace.replay`` (full model:
TLB look-up, permission check, walks with paging-structure caches on misses, event counts)
and of the baseline (``d[la >> 12] | (la & 0xfff)`` over the same trace), and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time

from fastmmio.sim.vmx.testbed import Testbed
from fastmmio.sim.vmx.trace import replay, synthetic_trace


def build(config: str, pages: int) -> tuple[Testbed, list[int]]:
    tb = Testbed(config)
    tb.map_all_ept(1 << 21)
    las = []
    for i in range(pages):
        la = 0x7F00_0000_0000 + i * 0x1000
        tb.map_guest(la, 0x100000 + i * 0x1000)
        las.append(la)
    return tb, las


def baseline(trace: list[tuple[int, int]], table: dict[int, int]) -> float:
    t0 = time.perf_counter()
    acc = 0
    for la, access in trace:
        acc ^= table[la >> 12] | (la & 0xFFF)
    dt = time.perf_counter() - t0
    if acc == -1:  # keep the loop's result alive
        print(acc)
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accesses", type=int, default=1_000_000)
    ap.add_argument("--pages", type=int, default=256)
    ap.add_argument("--configs", default="sdm-max,skylake-sp,golden-cove,none")
    args = ap.parse_args(argv)
    if args.accesses <= 0 or not 1 <= args.pages <= 100_000:
        print("bench_trace_replay: --accesses must be > 0, --pages 1..100000", file=sys.stderr)
        return 2
    print(f"trace: {args.accesses} accesses over {args.pages} pages (90% stay on the page, "
          f"1 in 4 a write); guest 4 KiB pages over 2 MiB EPT pages")
    print(f"{'config':<12} {'model acc/s':>12} {'dict acc/s':>12} {'ratio':>7} "
          f"{'TLB hit %':>9} {'refs/access':>11}")
    print("(each page is translated once before timing: the TLB starts warm where it fits)")
    for config in args.configs.split(","):
        tb, las = build(config, args.pages)
        trace = synthetic_trace(las, args.accesses)
        table = {la >> 12: tb.proc.translate(la) for la in las}
        tb.proc.reset_events()
        res = replay(tb.proc, trace)
        assert res.translated == res.accesses, res.faults
        dt_base = baseline(trace, table)
        ev = res.events
        misses = ev["tlb.combined.miss"]
        base_rate = args.accesses / dt_base
        print(f"{config:<12} {res.accesses_per_second:>12,.0f} {base_rate:>12,.0f} "
              f"{res.accesses_per_second / base_rate:>7.3f} {100 * (1 - misses / res.accesses):>9.2f} "
              f"{res.walk_references() / res.accesses:>11.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
