"""Synthetic cells for the verdict's tests: a hand-built profile and hand-written event
vectors, stored in a Comparison's memo so that nothing is simulated. The figures below are the
whole input; the tests' expected lists and ratios are worked out by hand from them (and do not
move when the models' or the bundled profiles' figures do)."""

from __future__ import annotations

from fastmmio.compare.core import FAIL, OK, Comparison, SimRun, sim_key
from fastmmio.costs.profile import parse_profile
from fastmmio.result import RunResult
from fastmmio.routes import get_route
from fastmmio.verdict import SCENARIOS, doorbell_route, subjects

N = 4  # iterations of each synthetic batch

PROFILE = """
[profile]
name = "synth"
description = "hand-built for the verdict tests"
cpu = "none"

[price."exit"]
cycles = 1000
component = "exit"
basis = "measured"
source = "the test's own figure"

[price."kvm.handler.io"]
cycles = 100
component = "handler"
basis = "derived"
source = "derived for the test from kvm.handler.cpuid"
low = 50
high = 300
why = "the test's interval"
depends = ["kvm.handler.cpuid"]

[price."kvm.handler.cpuid"]
cycles = 100
component = "handler"
basis = "estimate"
source = "estimate for the test"
low = 50
high = 250
why = "the test's interval"

[price."kvm.handler.ept_misconfig"]
cycles = 150
component = "handler"
basis = "estimate"
source = "estimate for the test"
low = 100
high = 300
why = "a kernel path of ~100-300 instructions"

[price."kvm.handler.ept_violation"]
cycles = 200
component = "handler"
basis = "estimate"
source = "estimate for the test"
low = 100
high = 400
why = "the test's interval"

[price."kvm.emulate"]
cycles = 1000
component = "emulation"
basis = "estimate"
source = "estimate for the test"
low = 900
high = 1100
why = "the test's interval"

[price."kvm.bus"]
cycles = 40
component = "bus"
basis = "measured"
source = "the test's own figure"

[price."kvm.eventfd.signal"]
cycles = 150
component = "eventfd"
basis = "measured"
source = "the test's own figure"

[price."kvm.skip"]
cycles = 20
component = "skip"
basis = "measured"
source = "the test's own figure"

[price."walk.served"]
cycles = 4
component = "walk"
basis = "measured"
source = "the test's own figure"

[free."vmentry"]
reason = "test"
[free."walk.ref"]
reason = "test"
[free."inv"]
reason = "test"

[nested]
description = "the test's nested setting"
source = "the test's own figure"

[nested.price."exit"]
cycles = 8000
component = "exit"
basis = "derived"
source = "derived for the test"
low = 7000
high = 9000
why = "the test's interval"
depends = ["kvm.handler.cpuid"]
"""

VARIANTS = ["upstream-2013", "upstream", "rfc-2015", "rfc-2015-fixed"]

# Per notification. PIO 1,310 cycles; upstream 1,368 (1.0443x); rfc-2015 1,438 (1.0977x);
# upstream-2013 2,368 (1.8076x); rfc-2015-fixed as rfc-2015 but its checks fail.
PIO = {"exit.IO_INSTRUCTION": 1, "kvm.handler.io": 1, "kvm.bus.lookup": 1,
       "kvm.eventfd.signal": 1, "kvm.skip.vmcs_length": 1, "vmentry": 1}
FAST_MMIO = {"exit.EPT_MISCONFIG": 1, "kvm.handler.ept_misconfig": 1, "kvm.bus.lookup": 1,
             "kvm.eventfd.signal": 1, "kvm.skip.vmcs_length": 1, "walk.served.l1": 2,
             "walk.ref.guest.pte": 1, "walk.ref.ept.pte": 1, "vmentry": 1}
RFC = {"exit.EPT_VIOLATION": 1, "kvm.handler.ept_violation": 1, "kvm.bus.lookup": 1,
       "kvm.eventfd.signal": 1, "kvm.skip.vmcs_length": 1, "walk.served.l1": 7,
       "inv.ept_violation": 1, "walk.ref.guest.pml4e": 1, "walk.ref.guest.pdpte": 1,
       "walk.ref.guest.pde": 1, "walk.ref.guest.pte": 1, "walk.ref.ept.pml4e": 1,
       "walk.ref.ept.pdpte": 1, "walk.ref.ept.pde": 1, "vmentry": 1}
EMULATED = {**FAST_MMIO, "kvm.emulate": 1}
DOORBELL = {"upstream": FAST_MMIO, "rfc-2015": RFC, "rfc-2015-fixed": RFC,
            "upstream-2013": EMULATED}
ENTRY = {"upstream": "misconfigured", "rfc-2015": "not present",
         "rfc-2015-fixed": "read-only", "upstream-2013": "misconfigured"}
# "none" caching: 50 more walk references per doorbell write, 25 more per OUT.
EXTRA_WALK = {"none": (50, 25)}

CYCLES = {  # per notification, by hand
    "sdm-max": {"pio": 1310, "upstream": 1368, "rfc-2015": 1438, "rfc-2015-fixed": 1438,
                "upstream-2013": 2368},
    "none": {"pio": 1410, "upstream": 1568, "rfc-2015": 1638, "rfc-2015-fixed": 1638,
             "upstream-2013": 2568},
    "nested": {"pio": 8310, "upstream": 8368, "rfc-2015": 8438, "rfc-2015-fixed": 8438,
               "upstream-2013": 9368},
}
CYCLES["skylake-sp"] = CYCLES["vpid-off"] = CYCLES["sdm-max"]


def _events(per: dict, walk: int) -> dict[str, int]:
    ev = {k: v * N for k, v in per.items()}
    if walk:
        ev["walk.served.l1"] = ev.get("walk.served.l1", 0) + walk * N
    return ev


def _run(route: str, options, per: dict, walk: int, ok: bool, entry: str | None) -> SimRun:
    r = get_route(route)
    result = RunResult(route=route, backend=f"sim:{options.variant}", cycles=0.0,
                       cycles_spread=(0.0, 0.0), iterations=N, eventfd_signals=N,
                       user_exits=0, correct=ok,
                       checks=["ok"] if ok else ["FAIL: synthetic failure of the checks"],
                       events=_events(per, walk))
    return SimRun(r, options, OK if ok else FAIL, result,
                  "" if ok else "synthetic failure of the checks", entry)


def synthetic_comparison(profile_text: str = PROFILE) -> Comparison:
    """A Comparison whose memo holds every cell the verdict reads, for :data:`VARIANTS`."""
    comp = Comparison(parse_profile(profile_text, "synth.toml"))
    for sc in SCENARIOS:
        door_walk, pio_walk = EXTRA_WALK.get(sc.key, (0, 0))
        for s in subjects(VARIANTS):
            opts = sc.options(s.variant)
            k = sim_key(get_route("pio-eventfd-len1").name, opts)
            comp._runs.setdefault(k, _run("pio-eventfd-len1", opts, PIO, pio_walk, True, None))
            if s.is_pio:
                continue
            route = doorbell_route(s.variant)
            comp._runs[sim_key(route, opts)] = _run(
                route, opts, DOORBELL[s.variant], door_walk, s.variant != "rfc-2015-fixed",
                ENTRY[s.variant])
    return comp


def main_cells(comp: Comparison):
    """The compare run's cells (base setting): each variant's doorbell and PIO."""
    base = SCENARIOS[0]
    out = []
    for v in VARIANTS:
        out.append(comp.cell(doorbell_route(v), base.options(v)))
        out.append(comp.cell("pio-eventfd-len1", base.options(v)))
    return out
