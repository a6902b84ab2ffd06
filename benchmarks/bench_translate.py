"""The processor model's translation of the doorbell store, with and without the walk memo.

In the steady state of ``mmio-eventfd-len0`` (after a warm-up batch) every doorbell write is
``Processor.translate(MMIO_BASE, WRITE)`` ending in an EPT misconfiguration on the MMIO SPTE:
the combined TLB misses (nothing is cached from a misconfigured entry, SDM 28.3.2) and the
walk runs from the PDE cache to the guest PTE and the EPT PTE. The walk memo
(``Walker.walk_memo``, default on) replays that walk; the reference (``walk_memo=False``)
walks every time. Both are timed on the same processor, interleaved round by round, in CPU
time of this thread (best round of each), for several cache configurations.

Printed: microseconds per call, optimised and reference, and the speed-up reference /
optimised; the last line ``worst speed-up X``.

    .venv/bin/python benchmarks/bench_translate.py [CALLS] [ROUNDS]
"""

from __future__ import annotations

import sys
import time

from fastmmio.layout import MMIO_BASE
from fastmmio.routes import build_machine, get_route
from fastmmio.sim.backend import SimBackend, SimOptions
from fastmmio.sim.vmx.walker import WRITE, Fault

SETTINGS = {
    "sdm-max": SimOptions(),
    "skylake-sp": SimOptions(caches="skylake-sp"),
    "none": SimOptions(caches="none"),
    "sdm-max, no EPT A/D": SimOptions(ept_ad=False),
}


def _per_call_ns(proc, calls: int) -> float:
    translate = proc.translate
    c0 = time.thread_time_ns()
    for _ in range(calls):
        translate(MMIO_BASE, WRITE)
    return (time.thread_time_ns() - c0) / calls


def measure(options: SimOptions, calls: int, rounds: int) -> tuple[float, float]:
    """Best nanoseconds per doorbell translation (optimised, reference) on one session."""
    with SimBackend(options).open(build_machine(get_route("mmio-eventfd-len0"), 0)) as s:
        s.run_batch(16)  # warm-up: first-touch EPT violation, the MMIO SPTE, caches
        proc = s.processor
        r = proc.translate(MMIO_BASE, WRITE)
        if not (isinstance(r, Fault) and r.kind == "ept_misconfig"):
            raise RuntimeError(f"the doorbell translation is {r!r}, not a misconfiguration")
        best = {True: float("inf"), False: float("inf")}
        for _ in range(rounds):
            for memo in (True, False):
                proc.walk_memo = memo
                best[memo] = min(best[memo], _per_call_ns(proc, calls))
        proc.walk_memo = True
    return best[True], best[False]


def main() -> int:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    print(f"Processor.translate(MMIO_BASE, WRITE) in the doorbell's steady state; {calls} calls "
          f"a round, best of {rounds} interleaved rounds, CPU time of this thread")
    print(f"{'configuration':22} {'memo us':>8} {'ref us':>8} {'speed-up':>9}")
    worst = None
    for name, options in SETTINGS.items():
        fast, ref = measure(options, calls, rounds)
        ratio = ref / fast
        worst = ratio if worst is None else min(worst, ratio)
        print(f"{name:22} {fast / 1e3:8.2f} {ref / 1e3:8.2f} {ratio:9.2f}")
    print(f"worst speed-up {worst:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
