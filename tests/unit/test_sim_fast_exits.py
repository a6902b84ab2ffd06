"""Exits handled without stopping unicorn (``SimOptions(fast_exits=True)``, the default)
count exactly what the reference path counts (``fast_exits=False``: unicorn stops at the
refused translation, the exit is handled, unicorn restarts): every route of the catalogue
under every KVM variant and machine setting, event for event, with the same batch results,
exit records, statistics, final registers and guest memory.

The fast path is taken for stores whose EPT exit KVM answers with a skip (the doorbell on
``KVM_FAST_MMIO_BUS``: ``handle_ept_misconfig``, 68c3b4d1; and the RFC variants' skips on
EPT violations); the test also checks that it is taken where it should be, so that it
cannot pass by never running.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from fastmmio.routes import build_machine, get_route, load_catalogue
from fastmmio.sim import cpu as sim_cpu
from fastmmio.sim.backend import EnginePool, SimBackend, SimOptions
from fastmmio.sim.kvm.variants import VARIANTS

from test_sim_reuse import _observe

ROUTES = [r.name for r in load_catalogue()]
SETTINGS = {
    "default": SimOptions(),
    "caches-none": SimOptions(caches="none"),
    "skylake-novpid": SimOptions(caches="skylake-sp", vpid=False),
    "nested": SimOptions(nested=True),
    "mmio-caching-off": SimOptions(mmio_caching=False),
}


@pytest.fixture(scope="module")
def pool():
    with EnginePool() as p:
        yield p


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fast_exits_count_what_the_reference_path_counts(variant, setting, pool):
    base = replace(SETTINGS[setting], variant=variant)
    for i, route in enumerate(ROUTES):  # CPL 3 and CPL 0 in turn (half the time of both)
        cpl = (3, 0)[(i + len(setting)) % 2]
        fast = _observe(SimBackend(base, engines=pool), route, cpl)
        ref = _observe(SimBackend(replace(base, fast_exits=False), engines=pool), route, cpl)
        assert fast == ref, f"{route} under {base.describe()}"


def test_the_doorbell_exit_is_handled_without_stopping(monkeypatch):
    """mmio-eventfd-len0 under upstream: after the first exits (EPT violation, then the MMIO
    SPTE), every doorbell write is a fast-path exit; the reference path takes none."""
    taken = []
    orig = sim_cpu.GuestCpu._fast_ept_exit

    def spy(self, *a):
        r = orig(self, *a)
        taken.append(r)
        return r

    monkeypatch.setattr(sim_cpu.GuestCpu, "_fast_ept_exit", spy)
    machine = build_machine(get_route("mmio-eventfd-len0"), 3)
    with SimBackend(SimOptions()).open(machine) as s:
        s.run_batch(4)
        taken.clear()
        b = s.run_batch(50)
    assert b.events["exit.EPT_MISCONFIG"] == 50 and taken == [True] * 50
    taken.clear()
    with SimBackend(SimOptions(fast_exits=False)).open(machine) as s:
        s.run_batch(4)
        s.run_batch(50)
    assert taken == []
