"""The 2015 thread's review, as checks computed on the simulator.

Xiao Guangrong's objections to "[PATCH RFC 1/3] vmx: allow ioeventfd for EPT violations"
(kvm list, 30-31 Aug 2015, the thread of the RFC series) and the cover letter's claim become properties that a
KVM variant's behaviour either has or lacks, measured by running guest code on the models:

``read-not-skipped`` (objection 1)
    A guest *read* of the doorbell region returns memory and signals nothing. Measured with
    route ``ro-read-eventfd``: signals per read, the value the guest read.
``doorbell-spte-present`` (objection 4)
    After steady-state doorbell writes, the doorbell page's EPT entry is present, so the
    processor *may* cache a translation for it (SDM 28.3.2: nothing is cached from a
    not-present EPT entry). Measured with route ``ro-write-eventfd``: the leaf SPTE.
``demand-faults-no-bus-lookup`` (objection 2)
    An ordinary demand fault (first touch of a RAM page: an EPT violation) pays no I/O-bus
    look-up. Measured with route ``page-touch``: bus look-ups per EPT violation over the
    first batch of a fresh VM.
``write-translation-cached`` (the cover letter's claim, objection 5)
    A steady-state doorbell write is served by a cached translation: no walk reference at all
    (the premise of "MMIO becomes as fast as port I/O"). Measured with ``ro-write-eventfd``:
    walk references per write, and whether a combined translation for the doorbell is cached
    after the write.
``writes-signal-once`` (correctness)
    Each doorbell write signals the ioeventfd exactly once and never exits to userspace.
``nested-skip-defined`` (correctness when KVM runs nested)
    Under an L0 that leaves the VM-exit instruction length undefined where SDM 27.2.4 does
    (:data:`fastmmio.sim.nested.L0_MODELS`: ``hyperv``), the variant's doorbell writes
    (routes ``ro-write-eventfd`` and ``mmio-eventfd-len0``) still complete: no skip relies on
    the length of an EPT violation or misconfiguration. A variant that skips by it there is
    incorrect (KVM_RUN fails with an internal error in the model), not fast.

Objection 3 (the patch bypasses KVM's read-only-memslot handling) shows through the first
two: reads are not served by the read-only mapping, and no SPTE is ever installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

from fastmmio import layout
from fastmmio.errors import GuestError, IoEventFdError
from fastmmio.routes import build_machine, get_route
from fastmmio.sim.backend import SimBackend, SimOptions
from fastmmio.sim.kvm.variants import get_variant
from fastmmio.sim.nested import L0_MODELS

STEADY_N = 16
TOUCH_N = 64


@dataclass
class ReviewCheck:
    name: str
    source: str  # which review point or claim it settles
    claim: str  # the property, in words
    passed: bool | None  # None: the variant cannot set the route up (not applicable)
    detail: str
    numbers: dict[str, float] = field(default_factory=dict)


def _walk_refs(events: dict[str, int]) -> int:
    return sum(v for k, v in events.items() if k.startswith("walk.ref."))


def _session(route: str, options: SimOptions, cpl: int):
    return SimBackend(options).open(build_machine(get_route(route), cpl))


def check_read_not_skipped(runs: _Runs) -> ReviewCheck:
    options, cpl = runs.options, runs.cpl
    with _session("ro-read-eventfd", options, cpl) as s:
        s.run_batch(4)
        b = s.run_batch(STEADY_N)
    signals = sum(b.eventfd_signals.values()) / STEADY_N
    mb = layout.MAILBOX_GPA + layout.MAILBOX_LAST_READ
    value = int.from_bytes(s.read_guest(mb, 8), "little") & 0xFF  # memory outlives the engine
    ok = signals == 0 and value == layout.RO_PATTERN
    detail = (f"a read of the doorbell signals {signals:g} eventfd per read and returns "
              f"{value:#04x} (memory holds {layout.RO_PATTERN:#04x})")
    if not ok:
        detail += ": the load is skipped and taken for a notification"
    return ReviewCheck("read-not-skipped", "Xiao Guangrong, objection 1",
                       "a guest read of the doorbell region returns memory and signals nothing",
                       ok, detail, {"signals_per_read": signals, "value_read": value})


class _Runs:
    """The simulations the checks read, each made once per :func:`review_checks` call."""

    def __init__(self, options: SimOptions, cpl: int):
        self.options = options
        self.cpl = cpl

    @cached_property
    def doorbell_writes(self):
        """A steady-state batch of doorbell writes (route ``ro-write-eventfd``); the session
        is closed (its engine released) but its models stay readable."""
        with _session("ro-write-eventfd", self.options, self.cpl) as s:
            s.run_batch(4)
            b = s.run_batch(STEADY_N)
        return s, b


def check_doorbell_spte_present(runs: _Runs) -> ReviewCheck:
    s, b = runs.doorbell_writes
    spte = s.vm.mmu.get_spte(layout.RO_BASE)
    fmt = s.vm.mmu.fmt
    if fmt.name == "npt":  # KVM on SVM: an NPT entry (P, W; the MMIO SPTE has a reserved bit)
        present = bool(spte & 1) and not (fmt.mmio_mask and spte & fmt.mmio_mask == fmt.mmio_mask)
        state = ("present" if present else "not present or reserved: nothing is cached from "
                 "it (APM 15.25.6)")
        return ReviewCheck("doorbell-spte-present", "Xiao Guangrong, objection 4",
                           "the doorbell page gets a present, valid NPT entry, so a translation "
                           "may be cached", present,
                           f"after {STEADY_N + 4} doorbell writes the doorbell page's NPT entry "
                           f"is {state}", {"spte_cacheable": float(present)})
    rwx_bits = spte & 0b111
    rwx = "".join(c if spte >> i & 1 else "-" for i, c in enumerate("rwx"))
    # SDM 28.2.3.1: bits 2:0 = 010b or 110b (write without read) is a misconfiguration;
    # 28.3.2: no mapping is cached from a not-present or misconfigured entry.
    if not rwx_bits:
        state = "not present: nothing can be cached from it (SDM 28.3.2)"
    elif not rwx_bits & 1:
        state = (f"misconfigured ({rwx}, an MMIO SPTE): nothing can be cached from it "
                 "(SDM 28.2.3.1, 28.3.2)")
    else:
        state = f"present ({rwx})"
    cacheable = bool(rwx_bits & 1)
    detail = f"after {STEADY_N + 4} doorbell writes the doorbell page's EPT entry is {state}"
    return ReviewCheck("doorbell-spte-present", "Xiao Guangrong, objection 4",
                       "the doorbell page gets a present, valid EPT entry, so a translation "
                       "may be cached", cacheable, detail,
                       {"spte_cacheable": float(cacheable), "spte_rwx": float(rwx_bits)})


def check_write_translation_cached(runs: _Runs) -> ReviewCheck:
    s, b = runs.doorbell_writes
    refs = _walk_refs(b.events) / STEADY_N
    cached = s.processor.has_translation(layout.RO_BASE)
    ok = refs == 0
    detail = (f"each doorbell write makes {refs:g} paging-structure references; after it a "
              f"translation for the doorbell is {'cached' if cached else 'not cached'}")
    if not ok and cached:
        detail += " (read-only: a write cannot use it, SDM 28.3.3.4)"
    return ReviewCheck("write-translation-cached", "cover letter claim; Xiao Guangrong, objection 5",
                       "a steady-state doorbell write needs no page walk",
                       ok, detail, {"walk_refs_per_write": refs, "translation_cached": float(cached)})


def check_writes_signal_once(runs: _Runs) -> ReviewCheck:
    s, b = runs.doorbell_writes
    signals = sum(b.eventfd_signals.values()) / STEADY_N
    exits = b.user_exits / STEADY_N
    ok = signals == 1 and exits == 0
    return ReviewCheck("writes-signal-once", "correctness",
                       "each doorbell write signals the ioeventfd once, with no userspace exit",
                       ok, f"{signals:g} signals and {exits:g} userspace exits per write",
                       {"signals_per_write": signals, "user_exits_per_write": exits})


def check_demand_faults(runs: _Runs) -> ReviewCheck:
    options, cpl = runs.options, runs.cpl
    with _session("page-touch", options, cpl) as s:
        b = s.run_batch(TOUCH_N)
    faults = b.events.get("exit.EPT_VIOLATION", 0) + b.events.get("exit.NPF", 0)  # VMX, SVM
    lookups = sum(v for k, v in b.events.items() if k.startswith("kvm.bus.lookup."))
    per_fault = lookups / faults if faults else 0.0
    ok = lookups == 0
    return ReviewCheck("demand-faults-no-bus-lookup", "Xiao Guangrong, objection 2",
                       "an ordinary demand fault pays no I/O-bus look-up",
                       ok, f"{faults} demand faults (EPT violations or #NPFs) made {lookups} bus look-ups "
                       f"({per_fault:g} per fault)",
                       {"ept_violations": faults, "bus_lookups": lookups,
                        "bus_lookups_per_fault": per_fault})


#: the doorbell routes the nested skip check runs: the RFC's (an EPT violation) and upstream's
#: (an EPT misconfiguration)
NESTED_SKIP_ROUTES = ("ro-write-eventfd", "mmio-eventfd-len0")


def check_nested_skip_defined(runs: _Runs) -> ReviewCheck:
    """Run the doorbell routes under every L0 model that does not fill the VM-exit
    instruction length on EPT exits (SDM 27.2.4 leaves it undefined there)."""
    options, cpl = runs.options, runs.cpl
    if options.arch == "svm":
        return ReviewCheck("nested-skip-defined", "SDM 27.2.4; d391f1207067",
                           "no skip relies on an undefined VM-exit instruction length", None,
                           "the L0 models are VMX models (an SVM skip uses the VMCB's next RIP "
                           "or decodes, APM 15.7.1)")
    undefined = [m for m in L0_MODELS.values() if not m.fills_length_on_ept]
    failures: list[str] = []
    skips: dict[str, float] = {}
    ran = 0
    for l0 in undefined:
        for route in NESTED_SKIP_ROUTES:
            try:
                with _session(route, replace(options, nested=l0.name), cpl) as s:
                    s.run_batch(4)
                    b = s.run_batch(STEADY_N)
            except IoEventFdError:
                continue  # the variant cannot set the route up (upstream-2013, length 0)
            except GuestError as exc:
                ran += 1
                failures.append(f"{route} under L0 {l0.name}: {exc}")
                continue
            ran += 1
            for k, v in b.events.items():
                if k.startswith("kvm.skip."):
                    skips[f"{route}:{k}"] = v / STEADY_N
    if not ran:
        return ReviewCheck("nested-skip-defined", "SDM 27.2.4; d391f1207067",
                           "no skip relies on an undefined VM-exit instruction length", None,
                           "the variant runs none of the doorbell routes")
    names = ", ".join(m.name for m in undefined)
    if failures:
        detail = ("incorrect under an L0 that leaves the VM-exit instruction length undefined "
                  f"({names}; SDM 27.2.4: not defined for EPT violations or misconfigurations): "
                  "the doorbell write is skipped by that length, so KVM_RUN fails: "
                  + "; ".join(failures))
    else:
        rule = get_variant(options.variant).nested_skip_text()
        detail = (f"under L0 {names} (length undefined on EPT exits, SDM 27.2.4) every doorbell "
                  f"write completes; {rule}")
    return ReviewCheck("nested-skip-defined", "SDM 27.2.4; d391f1207067",
                       "no skip relies on a VM-exit instruction length SDM 27.2.4 leaves "
                       "undefined (an L0 need not fill it)", not failures, detail,
                       {**skips, "failed_routes": float(len(failures))})


def nested_skip_defined(options: SimOptions, cpl: int = 3) -> ReviewCheck:
    """The ``nested-skip-defined`` check alone (for callers that need only it)."""
    return check_nested_skip_defined(_Runs(options, cpl))


CHECKS = (check_read_not_skipped, check_doorbell_spte_present, check_demand_faults,
          check_write_translation_cached, check_writes_signal_once, check_nested_skip_defined)


def review_checks(options: SimOptions, cpl: int = 3) -> list[ReviewCheck]:
    """Every check for ``options.variant``. A check whose guest fails to complete counts as
    failed with the guest's error as its detail; one whose machine the variant cannot build
    (a length-0 ioeventfd before KVM_CAP_IOEVENTFD_NO_LENGTH) is not applicable."""
    out = []
    runs = _Runs(options, cpl)
    for check in CHECKS:
        name = check.__name__.removeprefix("check_").replace("_", "-")
        try:
            out.append(check(runs))
        except GuestError as exc:
            out.append(ReviewCheck(name, "guest error", name, False, str(exc)))
        except IoEventFdError as exc:
            out.append(ReviewCheck(name, "not applicable", name, None, str(exc)))
    return out


def review_all(variants: list[str], options: SimOptions | None = None,
               cpl: int = 3) -> dict[str, list[ReviewCheck]]:
    base = options or SimOptions()
    return {v: review_checks(replace(base, variant=v), cpl) for v in variants}
