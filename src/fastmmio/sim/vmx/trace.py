"""Trace replay: feed a stream of (linear address, access kind) through a processor's caches
and walker and return what happened.

Faults are counted, not delivered: a trace is a list of accesses the guest made, not a
program, so nothing here fixes an EPT entry or a guest page table. Pass ``on_fault`` to act on
them (for example to install the missing mapping and retry, as a hypervisor would).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from fastmmio.sim.vmx.processor import READ, Fault, Processor


@dataclass
class TraceResult:
    """Counts of one replay: accesses, translated, faults by kind, the processor's events
    during the replay, and the wall-clock seconds it took."""

    accesses: int = 0
    translated: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def accesses_per_second(self) -> float:
        return self.accesses / self.seconds if self.seconds > 0 else float("inf")

    def walk_references(self) -> int:
        return sum(v for k, v in self.events.items() if k.startswith("walk.ref."))


def replay(proc: Processor, trace: Iterable[tuple[int, int]] | Sequence[tuple[int, int]],
           cpl: int | None = None,
           on_fault: Callable[[Processor, Fault, int, int], bool] | None = None,
           ) -> TraceResult:
    """Translate every ``(linear address, access)`` of ``trace`` (access: READ, WRITE,
    FETCH). ``on_fault(proc, fault, la, access)`` may fix the cause and return True to retry
    the access once. The processor's events during the replay are returned (and also stay
    in ``proc.events``)."""
    before = Counter(proc.events)
    translate = proc.translate
    res = TraceResult()
    faults = res.faults
    n = 0
    ok = 0
    t0 = time.perf_counter()
    if cpl is not None:
        proc.set_cpl(cpl)
    for la, access in trace:
        n += 1
        r = translate(la, access)
        if r.__class__ is int:
            ok += 1
            continue
        if on_fault is not None and on_fault(proc, r, la, access):
            r = translate(la, access)
            if r.__class__ is int:
                ok += 1
                continue
        faults[r.kind] += 1
    res.seconds = time.perf_counter() - t0
    res.accesses = n
    res.translated = ok
    after = proc.events
    res.events = Counter({k: v - before.get(k, 0) for k, v in after.items()
                          if v - before.get(k, 0)})
    return res


def synthetic_trace(pages: Sequence[int], length: int, write_every: int = 4,
                    seed: int = 1, locality: float = 0.9) -> list[tuple[int, int]]:
    """A reproducible trace over ``pages`` (page-aligned linear addresses): with probability
    ``locality`` the next access stays on the current page, otherwise it jumps to a random
    page; every ``write_every``-th access is a write."""
    import random

    rng = random.Random(seed)
    out = []
    cur = pages[0]
    for i in range(length):
        if rng.random() >= locality:
            cur = pages[rng.randrange(len(pages))]
        kind = 1 if write_every and i % write_every == write_every - 1 else READ
        out.append((cur | (rng.randrange(512) * 8), kind))
    return out
