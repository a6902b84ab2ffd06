"""Bounded soak on /dev/kvm: 20,000 notifications through each in-kernel ioeventfd route.

``ioeventfd_write()`` (virt/kvm/eventfd.c) signals the eventfd once per matching write and the
exit is handled in the kernel, so over any number of notifications the eventfd counter must
equal the number of notifications exactly and KVM_RUN must never return to userspace except
for the done OUT. ``make soak`` runs the same with a million per route.
"""

from __future__ import annotations

import pytest

from fastmmio.errors import UsageError
from fastmmio.fuzz.soak import SoakResult, is_soak_route, soak, soak_route
from fastmmio.routes import get_route, load_catalogue

NOTIFICATIONS = 20_000
BATCH = 5_000  # four batches: the counters are checked across batch boundaries too

SOAK_ROUTES = [r.name for r in load_catalogue() if is_soak_route(r)]


def test_the_catalogue_has_pio_and_mmio_soak_routes():
    """The soak covers both buses: KVM_PIO_BUS and KVM_MMIO_BUS (+ KVM_FAST_MMIO_BUS)."""
    routes = [get_route(n) for n in SOAK_ROUTES]
    assert any(r.access.is_pio for r in routes)
    assert any(r.access.is_memory and r.ioeventfd.length == 0 for r in routes)
    assert not any(is_soak_route(get_route(n)) for n in ("pio-user", "pio-datamatch-miss", "coalesced-mmio"))


@pytest.mark.parametrize("name", SOAK_ROUTES)
def test_no_eventfd_signal_lost(kvm_device, guest_cpl, name):
    """Counter == notifications exactly, zero userspace exits, every batch's checks pass, and
    KVM's own exit count (binary stats) shows at least one in-kernel exit per notification."""
    res = soak_route(get_route(name), NOTIFICATIONS, BATCH, kvm_device, guest_cpl)
    assert res.error is None, res.error
    assert res.batches == NOTIFICATIONS // BATCH
    assert res.signals == NOTIFICATIONS and res.lost == 0, res.line()
    assert res.user_exits == 0, res.line()
    assert not [c for c in res.checks if c.startswith("FAIL")], res.checks
    if res.kernel_exits:  # KVM_GET_STATS_FD present
        assert res.kernel_exits >= NOTIFICATIONS
    assert res.ok


def test_a_lost_signal_would_fail():
    """SoakResult.ok is False when one signal is missing or one exit reached userspace."""
    assert SoakResult("r", 10, signals=10).ok
    assert not SoakResult("r", 10, signals=9).ok and SoakResult("r", 10, signals=9).lost == 1
    assert not SoakResult("r", 10, signals=10, user_exits=1).ok
    assert not SoakResult("r", 10, signals=10, checks=["FAIL: x"]).ok


def test_soak_refuses_routes_that_exit_to_userspace(kvm_device):
    """A route that is meant to exit to userspace cannot be soaked for lost signals."""
    with pytest.raises(UsageError, match="not an in-kernel ioeventfd route"):
        soak(["pio-user"], 10, 10, kvm_device)
