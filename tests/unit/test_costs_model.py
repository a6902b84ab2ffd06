"""The cost model (fastmmio.costs.model): pricing event counts with a profile."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmmio.costs import COMPONENTS, CostModel, UnpricedEventError, list_profiles, parse_profile
from fastmmio.costs.model import Pricing
from fastmmio.errors import ProfileError, UsageError
from fastmmio.sim import events as ev

PROFILE = """
[profile]
name = "prefixes"
description = "prefix matching test"
cpu = "none"

[price."exit"]
cycles = 1000
component = "exit"
basis = "estimate"
source = "estimate for the test"

[price."exit.EPT_VIOLATION"]
cycles = 1200
component = "exit"
basis = "estimate"
source = "estimate for the test"

[price."kvm.handler"]
cycles = 100
component = "handler"
basis = "estimate"
source = "estimate for the test"

[price."kvm.handler.ept_violation"]
cycles = 300
component = "handler"
basis = "estimate"
source = "estimate for the test"

[price."kvm.emulate"]
cycles = 900
component = "emulation"
basis = "estimate"
source = "estimate for the test"
exact = true

[price."kvm.emulate.decode"]
cycles = 250
component = "emulation"
basis = "estimate"
source = "estimate for the test"

[price."walk.served"]
cycles = 7
component = "walk"
basis = "estimate"
source = "estimate for the test"

[price."walk.served.mem"]
cycles = 200
component = "walk"
basis = "estimate"
source = "estimate for the test"

[free."walk"]
reason = "references are priced where served"

[price."guest.insn"]
cycles = 0.5
component = "guest"
basis = "estimate"
source = "estimate for the test"

[free."vmentry"]
reason = "part of the exit round trip"

[nested]
description = "test nesting"
source = "a test"
scale = { handler = 2 }

[nested.price."exit"]
cycles = 8000
component = "exit"
basis = "derived"
source = "derived for the test"
"""


@pytest.fixture(scope="module")
def model():
    return CostModel(parse_profile(PROFILE, "prefixes.toml"))


def test_most_specific_prefix_wins(model):
    assert model.unit("exit.CPUID") == 1000
    assert model.unit("exit.EPT_VIOLATION") == 1200
    assert model.unit("kvm.handler.io") == 100
    assert model.unit("kvm.handler.ept_violation") == 300
    assert model.unit("walk.served.l1") == 7
    assert model.unit("walk.served.mem") == 200
    # a [free] prefix shorter than a [price] key does not hide it; a longer one would
    assert model.resolve("walk.ref.guest.pte").free
    assert model.resolve("walk.served.llc").key == "walk.served"


def test_prefix_matches_whole_dotted_parts_only(model):
    with pytest.raises(UnpricedEventError):
        model.resolve("exitx")
    with pytest.raises(UnpricedEventError):
        model.resolve("guest.insns")


def test_exact_entry_does_not_price_its_family(model):
    assert model.unit("kvm.emulate") == 900
    assert model.unit("kvm.emulate.decode") == 250
    with pytest.raises(UnpricedEventError) as e:
        model.resolve("kvm.emulate.fetch")
    assert "kvm.emulate.fetch" in str(e.value)


def test_unknown_event_error_names_event_and_profile(model):
    with pytest.raises(UnpricedEventError) as e:
        model.price(Counter({"exit.CPUID": 1, "kvm.brand_new.thing": 2}))
    msg = str(e.value)
    assert "kvm.brand_new.thing" in msg and "prefixes" in msg
    assert e.value.event == "kvm.brand_new.thing"
    assert isinstance(e.value, ProfileError)


def test_unknown_event_with_zero_count_is_still_an_error(model):
    """A name the profile does not know is a profile gap even if it did not occur this time."""
    with pytest.raises(UnpricedEventError):
        model.price({"kvm.brand_new.thing": 0})


def test_free_events_are_listed_and_cost_nothing(model):
    p = model.price({"exit.CPUID": 1, "vmentry": 1, "walk.ref.ept.pte": 5})
    assert p.cycles == 1000
    assert set(p.free_events()) == {"vmentry", "walk.ref.ept.pte"}


def test_breakdown_by_component_and_per_notification(model):
    events = {"exit.EPT_VIOLATION": 10, "kvm.handler.ept_violation": 10, "kvm.emulate": 10,
              "kvm.emulate.decode": 10, "walk.served.mem": 20, "guest.insn": 30}
    p = model.price(events, iterations=10)
    assert p.breakdown["exit"] == 1200
    assert p.breakdown["handler"] == 300
    assert p.breakdown["emulation"] == 1150
    assert p.breakdown["walk"] == 400
    assert p.breakdown["guest"] == 1.5
    assert p.breakdown["userspace"] == 0
    assert list(p.breakdown) == list(COMPONENTS)
    assert p.cycles == 1200 + 300 + 1150 + 400 + 1.5
    assert p.total_cycles == p.cycles * 10
    assert p.sources["exit.EPT_VIOLATION"] == "estimate for the test"


def test_nested_override_and_scale(model):
    nested = CostModel(model.profile, nested=True)
    assert nested.unit("exit.CPUID") == 8000  # override of the "exit" family
    # base "exit.EPT_VIOLATION" is more specific than the nested "exit" override: it wins
    assert nested.unit("exit.EPT_VIOLATION") == 1200
    assert nested.unit("kvm.handler.io") == 200  # handler scaled x2
    assert nested.resolve("kvm.handler.io").nested_rule == "scale x2"
    assert nested.unit("guest.insn") == 0.5  # no scale for guest
    assert nested.price({"exit.CPUID": 1}).nested


def test_nested_refused_without_nested_table():
    text = PROFILE.split("[nested]")[0]
    prof = parse_profile(text, "flat.toml")
    with pytest.raises(ProfileError, match="nested"):
        CostModel(prof, nested=True)


@pytest.mark.parametrize("iterations", [0, -1, 1.5, True, "3"])
def test_bad_iterations(model, iterations):
    with pytest.raises(UsageError):
        model.price({"exit.CPUID": 1}, iterations)


@pytest.mark.parametrize("count", [-1, float("nan"), float("inf"), "2", None])
def test_bad_counts_name_the_event(model, count):
    with pytest.raises(UsageError, match="exit.CPUID"):
        model.price({"exit.CPUID": count})


NAMES = ["exit.CPUID", "exit.EPT_VIOLATION", "exit.IO_INSTRUCTION", "kvm.handler.io",
         "kvm.handler.ept_violation", "kvm.emulate", "kvm.emulate.decode", "walk.served.l1",
         "walk.served.mem", "walk.ref.guest.pte", "guest.insn", "vmentry"]


@settings(max_examples=200, deadline=None)
@given(counts=st.dictionaries(st.sampled_from(NAMES),
                              st.one_of(st.integers(0, 10**9),
                                        st.floats(0, 1e9, allow_nan=False)), max_size=12),
       iterations=st.integers(1, 10**6), nested=st.booleans())
def test_total_is_exactly_sum_of_breakdown(model, counts, iterations, nested):
    m = CostModel(model.profile, nested=nested)
    p = m.price(counts, iterations)
    assert p.cycles == sum(p.breakdown.values())
    assert p.total_cycles == sum(p.total_breakdown.values())
    assert set(p.breakdown) == set(COMPONENTS)
    # and the components are the line items, grouped
    for comp in COMPONENTS:
        line = sum(i.cycles for i in p.items if i.component == comp)
        assert math.isclose(p.total_breakdown[comp], line, rel_tol=1e-12, abs_tol=1e-9)
    assert math.isclose(p.cycles * iterations, p.total_cycles, rel_tol=1e-9, abs_tol=1e-6)


# Every event name the models may report today (sim/events.py), with its placeholders filled.
VOCABULARY = (
    [f"walk.ref.{s}.{lvl}" for s in ("guest", "ept") for lvl in ev.PAGING_LEVELS]
    + [f"walk.served.{w}" for w in ev.SERVED_BY]
    + [f"walk.ad.{s}.{lvl}" for s in ("guest", "ept") for lvl in ev.PAGING_LEVELS]
    + [f"tlb.{k}.{o}" for k in ("combined", "guest_physical", "linear")
       for o in ("hit", "miss", "dirty_assist")]
    + [f"psc.{k}.{lvl}.{o}" for k in ("combined", "guest_physical", "linear")
       for lvl in ev.PSC_LEVELS for o in ("hit", "miss")]
    + [f"inv.{c}" for c in ("ept_violation", "vmexit_novpid", "vmentry_novpid", "invept_single",
                            "invept_all", "invvpid_address", "invvpid_single", "invvpid_all",
                            "invvpid_single_retain_globals", "mov_cr3", "mov_cr4", "mov_cr0",
                            "invlpg")]
    + [f"fault.{k}" for k in ("page_fault", "ept_misconfig", "gp")]
    + [f"exit.{r}" for r in ("EPT_VIOLATION", "EPT_MISCONFIG", "IO_INSTRUCTION", "CPUID", "HLT",
                             "VMCALL")]
    + ["vmentry"]
    + [f"kvm.handler.{h}" for h in ("ept_violation", "ept_misconfig", "io", "cpuid", "hlt")]
    + ["kvm.mmu.page_fault", "kvm.mmu.fast_page_fault", "kvm.mmu.fast_page_fault.fixed",
       "kvm.mmu.slow_path", "kvm.mmu.memslot_lookup", "kvm.mmu.spte_install",
       "kvm.mmu.spte_install.mmio", "kvm.mmu.mmio_spte_stale", "kvm.mmu.bad_page",
       "kvm.mmu.mmio_info_hit", "kvm.mmu.spte_walk", "kvm.mmu.spurious", "kvm.mmu.retry",
       "kvm.mmu.table_alloc", "kvm.mmu.zap", "kvm.mmu.zap_all_fast", "kvm.user_exit.hlt",
       "kvm.user_exit.shutdown"]
    + [f"kvm.bus.lookup.{b}" for b in ("KVM_PIO_BUS", "KVM_MMIO_BUS", "KVM_FAST_MMIO_BUS")]
    + ["kvm.bus.probe", "kvm.eventfd.signal", "kvm.emulate", "kvm.emulate.fetch",
       "kvm.emulate.decode", "kvm.emulate.walk", "kvm.emulate.walk.ref", "kvm.emulate.exception",
       "kvm.emulate.failure", "kvm.skip.vmcs_length", "kvm.skip.decode", "kvm.user_exit.io",
       "kvm.user_exit.mmio", "kvm.user_exit.internal_error", "kvm.coalesced.append", "guest.insn"]
)


def documented_names() -> set[str]:
    """Event names read from the vocabulary in fastmmio.sim.events' docstring: each entry's
    name(s) (``a.hit / .miss`` gives both), ``<level>`` and ``<where>`` expanded, any other
    placeholder or ``*`` replaced by a sample part (the family must be priced by prefix)."""
    names: set[str] = set()
    subs = {"<level>": ev.PAGING_LEVELS + ev.PSC_LEVELS, "<where>": ev.SERVED_BY}
    prev = ""
    for line in ev.__doc__.splitlines():
        m = re.match(r"^    (\S.*?)(\s{2,}|$)", line)
        if not m:
            continue
        for part in re.split(r"\s*/\s*", m.group(1)):
            part = part.strip()
            if part.startswith(".") and prev:
                part = prev.rsplit(".", 1)[0] + part
            if not re.match(r"^[a-z][\w.<>*]*$", part):
                continue
            prev = part
            todo = [part]
            for ph, vals in subs.items():
                if ph in part:
                    todo = [t.replace(ph, v) for t in todo for v in vals]
            names.update(re.sub(r"<[^>]+>", "SAMPLE", t).replace("*", "hit") for t in todo)
    return names


def test_documented_names_are_read():
    names = documented_names()
    assert {"walk.served.mem", "kvm.bus.lookup.SAMPLE", "exit.SAMPLE", "tlb.combined.miss",
            "kvm.emulate.walk.ref"} <= names


@pytest.mark.parametrize("name", list_profiles())
def test_bundled_profiles_know_the_whole_vocabulary(name):
    """Every event the models report (fastmmio.sim.events, read from its docstring, plus the
    names listed here) is priced or explicitly free in every bundled profile, nested too where
    the profile describes it: a new model event can never silently cost zero."""
    model = CostModel(name)
    vocabulary = set(VOCABULARY) | documented_names()
    p = model.price(Counter(dict.fromkeys(sorted(vocabulary), 1)))
    assert p.cycles > 0
    if model.profile.nested is not None:
        CostModel(name, nested=True).check(vocabulary)


def test_walk_references_priced_once_by_where_served():
    """Each walk reference is counted twice by the processor model (walk.ref.* by structure and
    level, walk.served.* by where it was found) and must be priced once (skylake-sp)."""
    m = CostModel("skylake-sp")
    refs = {"walk.ref.ept.pte": 3, "walk.ref.guest.pde": 1,
            "walk.served.l1": 2, "walk.served.mem": 2}
    p = m.price(refs)
    assert p.breakdown["walk"] == 2 * m.unit("walk.served.l1") + 2 * m.unit("walk.served.mem")
    assert m.unit("walk.served.l1") < m.unit("walk.served.l2") < m.unit("walk.served.llc") \
        < m.unit("walk.served.mem")


def test_bus_cost_grows_with_probes():
    """kvm_io_bus look-up: a base plus a price per bsearch step or device tried."""
    m = CostModel("skylake-sp")
    few = m.price({"kvm.bus.lookup.KVM_MMIO_BUS": 1, "kvm.bus.probe": 2}).breakdown["bus"]
    many = m.price({"kvm.bus.lookup.KVM_MMIO_BUS": 1, "kvm.bus.probe": 9}).breakdown["bus"]
    assert many - few == 7 * m.unit("kvm.bus.probe") > 0


def test_pci_testdev_2013_reproduces_its_recorded_fit():
    """Pricing the recorded event vectors with the fitted profile gives the recorded fitted
    figures, each within 1.1% of the published 2013 figure (QEMU commit 22773d60)."""
    m = CostModel("pci-testdev-2013")
    fit = m.profile.fit
    assert fit is not None and len(fit.targets) == 6
    published = {"pio-user": 5287, "pio-eventfd-len1": 1762, "pio-datamatch": 1777,
                 "mmio-user": 8796, "mmio-eventfd-len1": 3609, "mmio-datamatch": 3685}
    for t in fit.targets:
        assert t.cycles == published[t.route]
        p = m.cost(t.events)
        assert isinstance(p, Pricing)
        assert math.isclose(p.cycles, t.fitted, abs_tol=0.01), t.route
        assert abs(p.cycles - t.cycles) / t.cycles < 0.011, t.route


def test_skylake_nested_prices_add_up_to_the_evmcs_figure():
    """A reflected CPUID under Hyper-V (the events the nested model counts for one) costs the
    8304 cycles of the evmcs-kuznetsov CPUID loop the three Hyper-V prices were derived from;
    the base prices are unchanged by the nested setting (no override, no scale)."""
    events = {"exit.CPUID": 1, "vmentry": 1, "kvm.handler.cpuid": 1, "kvm.skip.vmcs_length": 1,
              "guest.insn": 3}
    l0 = {"nested.reflect.hyperv": 1, "nested.vmresume.hyperv": 1, "nested.enter_l2.hyperv": 1}
    flat = CostModel("skylake-sp").cost(events)
    nested = CostModel("skylake-sp", nested=True).cost({**events, **l0})
    assert math.isclose(flat.cycles, 1050)  # the kvm-unit-tests cpuid figure it was derived from
    assert math.isclose(nested.cycles, 8304)  # the nested CPUID loop it was derived from
    assert nested.breakdown["handler"] == flat.breakdown["handler"]
    assert CostModel("skylake-sp", nested=True).unit("exit.CPUID") == flat.breakdown["exit"]