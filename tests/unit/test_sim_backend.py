"""The simulator backend runs every route of the catalogue with the same correctness checks
as the real backend (fastmmio.bench.check_batch), under the upstream KVM model."""

from __future__ import annotations

import pytest

from fastmmio.bench import BenchOptions, measure_route
from fastmmio.errors import GuestError, UsageError
from fastmmio.guest.build import build_image
from fastmmio.guest.program import Access, AccessKind
from fastmmio.machine import Machine
from fastmmio.routes import build_machine, get_route, load_catalogue
from fastmmio.sim.backend import SimBackend, SimOptions

ROUTES = [r.name for r in load_catalogue()]


def _exits(batch) -> float:
    return float(sum(v for k, v in batch.events.items() if k.startswith("exit.")))


@pytest.mark.parametrize("name", ROUTES)
def test_every_route_runs_correctly_on_the_simulator(name):
    route = get_route(name)
    cpl = 0 if route.cpl0_only else 3  # MOV CR8 is #GP at CPL3
    res = measure_route(SimBackend(), route, cpl, BenchOptions(iterations=16, runs=1), price=_exits)
    assert res.correct, res.checks
    assert res.backend == "sim:upstream"


def test_events_are_those_of_the_timed_region_only():
    """The batch's events are counted between the guest's two RDTSCs: the done-port OUT that
    follows the second RDTSC is not among them (kvm-unit-tests times the same region)."""
    s = SimBackend().open(build_machine(get_route("pio-eventfd-len1"), 3))
    s.run_batch(8)
    b = s.run_batch(8)
    assert b.events["exit.IO_INSTRUCTION"] == 8
    assert b.events["kvm.eventfd.signal"] == 8
    assert "kvm.user_exit.io" not in b.events


def test_steady_state_mmio_eventfd_len0_takes_the_fast_mmio_bus():
    """Upstream (68c3b4d1): once the MMIO SPTE is installed, each doorbell write is an EPT
    misconfiguration answered on KVM_FAST_MMIO_BUS and skipped without the emulator."""
    s = SimBackend().open(build_machine(get_route("mmio-eventfd-len0"), 3))
    s.run_batch(4)
    b = s.run_batch(10)
    ev = b.events
    assert ev["exit.EPT_MISCONFIG"] == 10 and ev.get("exit.EPT_VIOLATION", 0) == 0
    assert ev["kvm.bus.lookup.KVM_FAST_MMIO_BUS"] == 10
    assert ev.get("kvm.emulate", 0) == 0 and ev["kvm.skip.vmcs_length"] == 10


def test_never_ending_guest_is_stopped_by_the_watchdog():
    image = build_image(Access(AccessKind.NONE), 3)
    spec = build_machine(get_route("empty"), 3).spec
    s = SimBackend(SimOptions(timeout_s=0.3)).open(Machine(image, spec))
    with pytest.raises(GuestError, match="watchdog"):
        s.run_batch(1 << 62)


def test_bad_options_are_usage_errors():
    with pytest.raises(UsageError, match="variant"):
        SimOptions(variant="nope")
    with pytest.raises(UsageError, match="cache configuration"):
        SimOptions(caches="nope")


def test_close_releases_the_engine_and_is_idempotent():
    s = SimBackend().open(build_machine(get_route("pio-eventfd-len1"), 3))
    s.run_batch(2)
    s.close()
    assert not hasattr(s.cpu, "uc")
    s.close()
    with pytest.raises(GuestError, match="closed"):
        s.run_batch(1)


def test_close_runs_uc_close_at_once():
    """The engine is closed by close() itself (its weakref finalizer has run), not left to the
    garbage collector, which only finds it later through the engine <-> hooks cycle."""
    s = SimBackend().open(build_machine(get_route("mmio-eventfd-len0"), 3))
    finalizer = s.cpu.uc._Uc__finalizer
    s.run_batch(2)
    assert finalizer.alive
    s.close()
    assert not finalizer.alive


# -- caches "none": every access walks, instruction fetches included ----------------------
#
# Hand count (SDM 4.5 and 28.2.2, no TLB and no paging-structure cache of either kind): one
# translation of a linear address reads the 4 guest entries (PML4E, PDPTE, PDE, PTE), and each
# of their guest-physical addresses is first translated through the 4 EPT levels, then the
# final guest-physical address through 4 more: 4 x (4 + 1) + 4 = 24 references.
REFS_PER_TRANSLATION = 4 * (4 + 1) + 4


def _refs_per_notification(route: str, caches: str) -> float:
    """Walk references per notification: the difference of two steady-state batches, so that
    the batch's own set-up instructions cancel."""
    s = SimBackend(SimOptions(caches=caches)).open(build_machine(get_route(route), 0))
    s.run_batch(4)

    def refs(n):
        ev = s.run_batch(n).events
        return (sum(v for k, v in ev.items() if k.startswith("walk.ref.")),
                ev.get("guest.insn", 0))

    (r8, i8), (r24, i24) = refs(8), refs(24)
    s.close()
    return (r24 - r8) / 16, (i24 - i8) / 16


@pytest.mark.parametrize("route,insns,data", [
    ("empty", 2, 0),  # dec, jne
    ("ram-write", 3, 1),  # mov [ram], dec, jne: one data write, no exit
    ("pio-eventfd-len1", 3, 0),  # out (no memory operand), dec, jne
    ("mmio-eventfd-len0", 3, 1),  # mov [doorbell] (walked to the EPT misconfiguration), dec, jne
])
def test_no_caching_walks_every_fetch_and_every_data_access(route, insns, data):
    """With ``--caches none`` each instruction's fetch is a full walk, and so is each data
    access, also between exits (unicorn's own TLB must not stand in for a combined TLB the
    configuration does not have)."""
    refs, executed = _refs_per_notification(route, "none")
    assert executed == insns
    assert refs == REFS_PER_TRANSLATION * (insns + data)


@pytest.mark.parametrize("route", ["empty", "ram-write", "pio-eventfd-len1"])
def test_with_a_tlb_nothing_is_walked_between_exits(route):
    """The same loops under SDM-maximal caching: every translation hits (unchanged by the
    per-instruction walking of ``none``)."""
    assert _refs_per_notification(route, "sdm-max")[0] == 0
