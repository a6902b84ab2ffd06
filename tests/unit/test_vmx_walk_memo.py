"""The walk memo (``Walker.walk_memo``, on by default) is invisible: a processor that replays
recorded walks ending in an EPT misconfiguration (SDM 28.3.2: nothing is cached from a
misconfigured EPT entry, so the walk repeats as long as its inputs do) gives the same
results, counts the same events, leaves the same translation caches (contents, LRU order,
evictions, random state), the same walk data-cache model and the same memory as one that
walks every time (``walk_memo=False``), after every step of random sequences of accesses,
invalidations and paging-structure writes made with or without the invalidation the SDM asks
for (guest code writes its tables through unicorn without telling the model). Every cache
configuration, VPID on/off, EPT A/D on/off, guest A/D on/off; and the simulator's doorbell
loop (plain and nested), where the memo must actually be used."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_vmx_property import ALL_CONFIGS, EPT_BITS, OPS, build, layouts, outcome, step
from walk_mutations import DATA_GPAS, PAGES, flip_guest_bit, flip_second_level_bit

from fastmmio import layout
from fastmmio.routes import build_machine, get_route
from fastmmio.sim.backend import SimBackend, SimOptions
from fastmmio.sim.vmx import layouts as L
from fastmmio.sim.vmx.caches import CONFIGS, Cache
from fastmmio.sim.vmx.errors import HostMemoryError, LayoutError
from fastmmio.sim.vmx.walker import WRITE, Fault

CONFIG_IDS = [*ALL_CONFIGS, CONFIGS["none"]]


def _entry(e: object) -> object:
    slots = getattr(type(e), "__slots__", None)
    return tuple(getattr(e, s) for s in slots) if slots else e


def _cache_state(c: Cache) -> tuple:
    return (c.name,
            {tag: {k: _entry(e) for k, e in t.items()} for tag, t in c.tables.items() if t},
            [(i, list(s)) for i, s in enumerate(c.sets) if s], c.evictions,
            c._rng.getstate())


def snapshot(p) -> tuple:
    """Everything a translation may change in the processor model (events aside)."""
    caches = [*p.tlb.caches, *p.gtlb.caches,
              *(x for x in (*p.psc.values(), *p.epsc.values()) if x is not None)]
    dcache = None
    if p.dcache is not None:
        dcache = [[(i, list(s)) for i, s in enumerate(sets) if s]
                  for _, _, _, sets in p.dcache._geo]
    return [_cache_state(c) for c in caches], dcache


def memory_state(mem) -> dict:
    return {pfn: bytes(pg) for pfn, pg in mem.pages.items()}


@st.composite
def memo_op(draw):
    """The property tests' operations, plus what makes the memo matter: repeated accesses
    (the doorbell), EPT leaves turned misconfigured (KVM's MMIO SPTE), entries written
    without any invalidation, a change of CPL."""
    w = draw(st.integers(0, 99))
    if w < 45:
        return draw(OPS)
    if w < 70:
        return ("repeat", draw(st.integers(2, 6)))
    if w < 80:
        return ("misconfig", draw(st.integers(0, len(DATA_GPAS) - 1)),
                draw(st.sampled_from([0b010, 0b110, 0b100 | (2 << 3), 0b111 | (7 << 3)])))
    if w < 90:
        return ("raw", draw(st.sampled_from(["guest", "ept"])),
                draw(st.integers(0, len(PAGES) - 1)), draw(st.integers(1, 4)),
                draw(st.integers(0, 11)))
    return ("cpl", draw(st.sampled_from([0, 3])))


def memo_step(tb, op, layout_, last):
    p = tb.proc
    kind = op[0]
    if kind == "repeat":
        if last is None:
            return None, last
        return [step(tb, last, layout_) for _ in range(op[1])], last
    if kind == "misconfig":  # no invalidation: nothing may be cached from such an entry
        gpa = DATA_GPAS[op[1]]
        try:
            tb.ept.set_entry(gpa, 1, (tb.ram_hpa + gpa) | op[2])
        except (HostMemoryError, LayoutError):
            pass
        return None, last
    if kind == "raw":
        _, where, page, level, bit = op
        if where == "guest":
            flip_guest_bit(tb, PAGES[page], level, [0, 1, 2, 5, 6, 7, 8, 63, 51][bit % 9])
        else:
            flip_second_level_bit(tb, DATA_GPAS[page % len(DATA_GPAS)], level,
                                  EPT_BITS[bit % len(EPT_BITS)], 7)
        return None, last
    if kind == "cpl":
        p.set_cpl(op[1])
        return None, last
    r = step(tb, op, layout_)
    return r, (op if kind == "access" else last)


def _out(r):
    return [outcome(x) for x in r] if isinstance(r, list) else outcome(r)


@pytest.mark.parametrize("config", CONFIG_IDS, ids=lambda c: c.name)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout_=layouts(), ops=st.lists(memo_op(), min_size=20, max_size=70))
def test_memo_is_invisible(config, layout_, ops):
    fast = build(config, layout_)
    ref = build(config, layout_)
    ref.proc.walk_memo = False
    assert fast.proc.walk_memo
    lf = lr = None
    for i, op in enumerate(ops):
        a, lf = memo_step(fast, op, layout_, lf)
        b, lr = memo_step(ref, op, layout_, lr)
        assert _out(a) == _out(b), (i, op)
        if isinstance(a, Fault):
            assert (a.structure, a.level) == (b.structure, b.level)
        # the counts, and the order event names entered the counter
        assert list(fast.proc.events.items()) == list(ref.proc.events.items()), (i, op)
        assert snapshot(fast.proc) == snapshot(ref.proc), (i, op)
        assert memory_state(fast.memory) == memory_state(ref.memory), (i, op)


def _doorbell(tb, gpa):
    """An MMIO SPTE at ``gpa`` (W only: misconfigured, SDM 28.2.3.1) and a guest page
    mapping it; returns its linear address."""
    la = PAGES[0]
    tb.map_guest(la, gpa)
    tb.ept.set_entry(gpa, 1, (tb.ram_hpa + gpa) | 0b010)
    return la


@pytest.mark.parametrize("config", CONFIG_IDS, ids=lambda c: c.name)
def test_the_doorbell_is_replayed_and_a_changed_entry_is_walked_again(config):
    layout_ = ([(0, 0, True, True, False, False)] * 4, [7] * len(DATA_GPAS), [],
               {"nxe": True, "wp": True, "smep": False, "pge": False, "ept_ad": True,
                "set_ad": True, "execute_only": True, "vpid_enabled": True}, 7)
    fast, ref = build(config, layout_), build(config, layout_)
    ref.proc.walk_memo = False
    replays = []
    orig = fast.proc._replay
    n = 0
    fast.proc._replay = lambda rec: replays.append((n, orig(rec))) or replays[-1][1]
    las = [_doorbell(tb, DATA_GPAS[2]) for tb in (fast, ref)]
    for n in range(8):
        if n == 4:  # the guest rewrites its PTE (no INVLPG): the record no longer holds
            for tb in (fast, ref):
                ea = tb.guest.entry_address(las[0], 1)
                tb.write_gpa_u64(ea, tb.read_gpa_u64(ea) ^ (1 << 62))  # PTE bit 62: ignored
        a = fast.proc.translate(las[0] | 8, WRITE)
        b = ref.proc.translate(las[1] | 8, WRITE)
        assert isinstance(a, Fault) and a.kind == "ept_misconfig"
        assert outcome(a) == outcome(b)
        assert fast.proc.events == ref.proc.events
        assert snapshot(fast.proc) == snapshot(ref.proc)
    # a walk is recorded the second time it repeats unchanged (the first walks set A flags
    # and, with caches, fill the paging-structure caches), then replayed; at 4 the replay
    # finds the changed PTE and refuses (the walk runs), and the memo is rebuilt
    done = dict(replays)
    assert done[3] == a and done[4] is None and done[6] == a and done[7] == a


@pytest.mark.parametrize("config", ["skylake-sp", "golden-cove"])
def test_alternating_doorbells_replay_the_lru_updates(config):
    """Two doorbells whose paging-structure-cache entries share a set of a bounded LRU
    structure (PDE cache: 8 sets of 4; linear addresses 16 MiB apart), written in turn:
    each replay moves its own entry to the most recently used place, as the walk's hit
    does; then more walks fill the set, and the evictions (which follow that order) match."""
    layout_ = ([(0, 0, True, True, False, False)] * 4, [7] * len(DATA_GPAS), [],
                {"nxe": True, "wp": True, "smep": False, "pge": False, "ept_ad": True,
                 "set_ad": True, "execute_only": True, "vpid_enabled": True}, 7)
    fast, ref = build(config, layout_), build(config, layout_)
    ref.proc.walk_memo = False
    base = 1 << 39
    las = [base + i * (16 << 20) for i in range(6)]  # PDE-cache keys 8 apart: one set
    for tb in (fast, ref):
        for i, la in enumerate(las):
            gpa = DATA_GPAS[2 + i % 2]
            tb.map_guest(la, gpa)
            tb.ept.set_entry(gpa, 1, (tb.ram_hpa + gpa) | 0b010)  # misconfigured (MMIO SPTE)
    replays = []
    orig = fast.proc._replay
    fast.proc._replay = lambda rec: replays.append(orig(rec)) or replays[-1]
    order = [0, 1] * 5 + [0, 0, 1, 0] + [2, 3, 4, 5, 1, 0]
    for n, i in enumerate(order):
        a = fast.proc.translate(las[i], WRITE)
        b = ref.proc.translate(las[i], WRITE)
        assert outcome(a) == outcome(b) and a.kind == "ept_misconfig", n
        assert list(fast.proc.events.items()) == list(ref.proc.events.items()), n
        assert snapshot(fast.proc) == snapshot(ref.proc), n
    assert sum(r is not None for r in replays) >= 8
    assert fast.proc.psc[2].evictions == ref.proc.psc[2].evictions > 0


@pytest.mark.parametrize("watcher", ["ref_log", "logging counter", "listener"])
def test_the_memo_stands_aside_while_the_walk_is_watched(watcher):
    """A reference log (explain's), a counter that logs each increment, a listener: they see
    the walk as it runs, in order, so the memo neither records nor replays; what they see is
    what the reference shows them."""
    layout_ = ([(0, 0, True, True, False, False)] * 4, [7] * len(DATA_GPAS), [],
               {"nxe": True, "wp": True, "smep": False, "pge": False, "ept_ad": True,
                "set_ad": True, "execute_only": True, "vpid_enabled": True}, 7)
    seen: dict[str, list] = {"fast": [], "ref": []}

    class LoggingCounter(Counter):
        def __setitem__(self, key, value):
            self.seen.append((key, value))
            super().__setitem__(key, value)

    tbs = {"fast": build("sdm-max", layout_), "ref": build("sdm-max", layout_)}
    tbs["ref"].proc.walk_memo = False
    for name, tb in tbs.items():
        p = tb.proc
        if watcher == "ref_log":
            p.ref_log = seen[name]
        elif watcher == "logging counter":
            p._counts = LoggingCounter(p._counts)
            p._counts.seen = seen[name]
        else:
            p.listeners.append(seen[name].append)
    fast, ref = tbs["fast"], tbs["ref"]
    fast.proc._replay = lambda rec: pytest.fail("replayed while watched")
    las = [_doorbell(tb, DATA_GPAS[2]) for tb in (fast, ref)]
    for _ in range(5):
        a = fast.proc.translate(las[0] | 8, WRITE)
        b = ref.proc.translate(las[1] | 8, WRITE)
        assert outcome(a) == outcome(b) and a.kind == "ept_misconfig"
    assert seen["fast"] == seen["ref"]
    assert list(fast.proc.events.items()) == list(ref.proc.events.items())
    assert bool(seen["fast"]) == (watcher != "listener")  # a misconfiguration notifies none
    assert not any(rec is not None for _, rec in fast.proc._memo.values())


def _machine_state(s):
    p = s.processor
    return dict(s.events), snapshot(p)


SIM_SETTINGS = {
    "default": SimOptions(),
    "caches-none": SimOptions(caches="none"),
    "skylake-novpid": SimOptions(caches="skylake-sp", vpid=False),
    "skylake-noad": SimOptions(caches="skylake-sp", ept_ad=False),
    "golden-cove": SimOptions(caches="golden-cove"),
    "nested": SimOptions(nested=True),
    "nested-skylake": SimOptions(nested=True, caches="skylake-sp"),
}


@pytest.mark.parametrize("setting", list(SIM_SETTINGS))
@pytest.mark.parametrize("cpl", [0, 3])
def test_the_simulated_doorbell_loop_counts_the_same_with_the_memo(setting, cpl):
    opts = SIM_SETTINGS[setting]
    machine = build_machine(get_route("mmio-eventfd-len0"), cpl)
    with SimBackend(opts).open(machine) as fast, SimBackend(opts).open(machine) as ref:
        ref.processor.walk_memo = False
        for n in (4, 16, 9):
            a, b = fast.run_batch(n), ref.run_batch(n)
            assert (a.events, a.exits) == (b.events, b.exits)
            assert _machine_state(fast) == _machine_state(ref)
        # the memo is in use in the steady state where the walk does not change the caches.
        # Not without VPID (every exit flushes the combined mappings, 28.3.3.1, and the walk
        # refills them) nor nested (the doorbell is an EPT violation on EPT02, which
        # invalidates the linear address's mappings, and the next walk refills them)
        used = any(rec is not None for _, rec in fast.processor._memo.values())
        assert used == ("nested" not in setting and "novpid" not in setting)
        assert fast.processor.translate(layout.MMIO_BASE, WRITE) == \
            ref.processor.translate(layout.MMIO_BASE, WRITE)


def test_a_walker_with_its_own_second_dimension_runs_without_the_memo():
    """The memo replays only what the VMX walk logs (its reads through ``_ref``, its cache
    hits): the SVM processor's nested walk is its own, so the memo stays off there."""
    from fastmmio.sim.svm.processor import SvmProcessor
    from fastmmio.sim.vmx.memory import HostMemory
    from fastmmio.sim.vmx.processor import Processor

    assert Processor(HostMemory()).walk_memo
    assert not Processor(HostMemory(), walk_memo=False).walk_memo
    assert not SvmProcessor(HostMemory()).walk_memo
