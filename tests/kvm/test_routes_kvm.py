"""Every route of the catalogue on this host's KVM, with its correctness checks.

Small fixed N (200) keeps this fast even where an exit costs ~200k cycles (PVM, nested).
The behaviours asserted come from the kernel: ioeventfd_write()/ioeventfd_in_range()
(virt/kvm/eventfd.c) signal on a matching write and swallow it; a DATAMATCH that does not
match leaves the write to userspace (KVM_EXIT_IO / KVM_EXIT_MMIO); a write to a
KVM_MEM_READONLY slot is emulated and completed by userspace as KVM_EXIT_MMIO
(handle_ept_violation -> emulation -> vcpu_mmio_write), the slot's memory unchanged; a read of it is ordinary memory.
"""

from __future__ import annotations

import pytest

from fastmmio import layout
from fastmmio.bench import BenchOptions, measure_route
from fastmmio.real.backend import RealBackend
from fastmmio.result import ExitRecord
from fastmmio.routes import build_machine, get_route, load_catalogue

N = 200
ROUTES = [r.name for r in load_catalogue() if r.upstream]


@pytest.fixture
def backend(kvm_device):
    return RealBackend(device=kvm_device)


@pytest.mark.parametrize("name", ROUTES)
def test_route_is_correct_at_host_cpl(backend, guest_cpl, skip_unsupported, name):
    route = get_route(name)
    skip_unsupported(route, guest_cpl)
    r = measure_route(backend, route, guest_cpl, BenchOptions(iterations=N, runs=2))
    assert r.correct, "\n".join(r.checks)
    assert r.iterations == N
    assert r.cycles > 0
    if route.ioeventfd is not None and route.expect.eventfd:
        # Every write signalled exactly once, none reached userspace.
        assert r.eventfd_signals == N
        assert r.user_exits == 0
    if route.expect.user_exits and not route.expect.coalesced:
        assert r.user_exits == N


@pytest.mark.parametrize("name", ["pio-user", "mmio-eventfd-len0", "ro-write", "ro-read",
                                  "coalesced-mmio", "mmio-read-user"])
def test_route_is_correct_at_the_other_cpl(backend, guest_cpl, name):
    """The same image at the other CPL (on PVM CPL0 runs in KVM's emulator: slower, but the
    guest-visible outcome must be identical)."""
    other = 0 if guest_cpl == 3 else 3
    r = measure_route(backend, get_route(name), other, BenchOptions(iterations=50, runs=1))
    assert r.correct, "\n".join(r.checks)


@pytest.mark.parametrize("name", ["pio-datamatch-miss", "mmio-datamatch-miss"])
def test_nonmatching_datamatch_exits_to_userspace_on_every_write(backend, guest_cpl, name):
    route = get_route(name)
    with backend.open(build_machine(route, guest_cpl)) as s:
        s.run_batch(8)
        b = s.run_batch(N)
    assert b.user_exits == N
    assert b.eventfd_signals == {"doorbell": 0}
    kind = "io" if route.access.is_pio else "mmio"
    assert b.exits and all(
        e == ExitRecord(kind, route.access.target, 1, True, route.access.value) for e in b.exits
    )


def test_ro_write_exits_as_mmio_and_leaves_the_slot_unchanged(backend, guest_cpl):
    route = get_route("ro-write")
    with backend.open(build_machine(route, guest_cpl)) as s:
        b = s.run_batch(N)
        ro = s.read_guest(layout.RO_BASE, layout.RO_SIZE)
    assert b.user_exits == N
    assert b.exits and all(
        e == ExitRecord("mmio", layout.RO_BASE, 1, True, route.access.value) for e in b.exits
    )
    assert ro == bytes([layout.RO_PATTERN]) * layout.RO_SIZE


def test_ro_read_returns_the_contents_without_exit(backend, guest_cpl):
    with backend.open(build_machine(get_route("ro-read"), guest_cpl)) as s:
        b = s.run_batch(N)
        last = int.from_bytes(s.read_guest(layout.MAILBOX_GPA + layout.MAILBOX_LAST_READ, 8), "little")
    assert b.user_exits == 0 and not b.exits
    assert last == int.from_bytes(bytes([layout.RO_PATTERN]) * 4, "little")


def test_ioeventfd_on_a_readonly_slot_fires_through_the_emulator(backend, guest_cpl):
    """Upstream already signals an ioeventfd over a read-only memslot (the emulated write
    goes to vcpu_mmio_write(), i.e. KVM_MMIO_BUS): no user exit, memory unchanged."""
    with backend.open(build_machine(get_route("ro-write-eventfd"), guest_cpl)) as s:
        b = s.run_batch(N)
        ro = s.read_guest(layout.RO_BASE, layout.RO_SIZE)
    assert b.eventfd_signals == {"doorbell": N} and b.user_exits == 0
    assert ro == bytes([layout.RO_PATTERN]) * layout.RO_SIZE
