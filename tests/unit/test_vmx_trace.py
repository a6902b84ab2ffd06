"""Trace replay (fastmmio.sim.vmx.trace)."""

from __future__ import annotations

from fastmmio.sim.vmx.processor import READ, WRITE
from fastmmio.sim.vmx.testbed import Testbed
from fastmmio.sim.vmx.trace import replay, synthetic_trace


def bed(config="sdm-max"):
    tb = Testbed(config)
    tb.map_all_ept()
    pages = [0x7F00_0000_0000 + i * 0x1000 for i in range(8)]
    for i, la in enumerate(pages):
        tb.map_guest(la, 0x100000 + i * 0x1000)
    return tb, pages


def test_replay_counts_hits_walks_and_faults():
    """Each page's first access walks (TLB miss); the rest hit (SDM 4.10.2.3)."""
    tb, pages = bed()
    trace = [(la, READ) for la in pages] * 3 + [(0x7F00_0010_0000, WRITE)]
    res = replay(tb.proc, trace)
    assert res.accesses == 25 and res.translated == 24
    assert res.faults == {"page_fault": 1}
    assert res.events["tlb.combined.hit"] == 16
    assert res.events["tlb.combined.miss"] == 9
    assert res.walk_references() > 0


def test_replay_matches_uncached_translation_and_on_fault_retry():
    """The same trace under sdm-max and none translates identically; on_fault may fix the
    cause (here: map the page) and the access is retried once."""
    tb, pages = bed()
    ref, _ = bed("none")
    trace = synthetic_trace(pages, 500, seed=7)
    a = [tb.proc.translate(la, acc) for la, acc in trace]
    b = [ref.proc.translate(la, acc) for la, acc in trace]
    assert a == b

    def fix(proc, fault, la, access):
        tb.map_guest(la & ~0xFFF, 0x200000)
        return True

    res = replay(tb.proc, [(0x7F00_0020_0000, READ)], on_fault=fix)
    assert res.translated == 1 and not res.faults


def test_synthetic_trace_is_reproducible():
    pages = [0x1000, 0x2000, 0x3000]
    t1 = synthetic_trace(pages, 100, seed=3)
    assert t1 == synthetic_trace(pages, 100, seed=3)
    assert sum(1 for _, a in t1 if a == WRITE) == 25
    assert {la & ~0xFFF for la, _ in t1} <= set(pages)
