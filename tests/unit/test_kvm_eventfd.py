"""ioeventfds in the KVM model (virt/kvm/eventfd.c). The registration and matching cases are
the table in tests/ioeventfd_cases.py, shared with the real-KVM tests."""

import sys
from collections import Counter
from pathlib import Path

import pytest

from fastmmio.errors import IoEventFdError
from fastmmio.machine import IoEventFdSpec
from fastmmio.sim.kvm.eventfd import (
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_FAST_MMIO,
    KVM_IOEVENTFD_FLAG_PIO,
    EventFd,
    IoEventFds,
    KvmIoEventFdArgs,
)
from fastmmio.sim.kvm.iobus import KvmBus, KvmIoBuses

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ioeventfd_cases as cases  # noqa: E402


class Sim:
    """Adapter: perform a cases.Call on the model."""

    def __init__(self):
        self.buses = KvmIoBuses(Counter())
        self.fds = IoEventFds(self.buses)
        self.eventfds: dict[int, EventFd] = {}

    def fd(self, i):
        return self.eventfds.setdefault(i, EventFd(f"fd{i}"))

    def call(self, c: cases.Call):
        f = self.fds.assign if c.op == "assign" else self.fds.deassign
        f(self.fd(c.fd), c.addr, c.len, pio=c.pio, datamatch=c.datamatch, extra_flags=c.extra_flags)

    def guest_write(self, pio, addr, width, value):
        """What a guest write reaches: KVM_PIO_BUS for OUT; for MMIO the fast bus is not
        involved here (this is the emulator's vcpu_mmio_write -> KVM_MMIO_BUS)."""
        bus = KvmBus.KVM_PIO_BUS if pio else KvmBus.KVM_MMIO_BUS
        return self.buses.write(bus, addr, width, value)


@pytest.mark.parametrize("case", cases.REGISTRATION_CASES, ids=lambda c: c.name)
def test_registration_case(case):
    """kvm_assign_ioeventfd / kvm_deassign_ioeventfd: the shared table."""
    assert cases.run_registration_case(case, Sim().call) == []


@pytest.mark.parametrize("case", cases.MATCH_CASES, ids=lambda c: c.name)
def test_match_case(case):
    """ioeventfd_in_range + kvm_io_bus_cmp: the shared table."""
    s = Sim()
    for c in case.registrations:
        s.call(c)
    taken = s.guest_write(case.pio, case.addr, case.width, case.value)
    assert taken == bool(case.fires)
    for i, fd in s.eventfds.items():
        assert fd.count == (1 if i in case.fires else 0), (i, fd)
    assert s.buses.events["kvm.eventfd.signal"] == len(case.fires)


def test_length0_mmio_also_on_fast_bus_pio_never():
    """kvm_assign_ioeventfd: length-0 MMIO is registered on KVM_FAST_MMIO_BUS too (Jason Wang,
    4.4); PIO and nonzero lengths are not."""
    s = Sim()
    s.call(cases.assign(0x1000, 0))
    s.call(cases.assign(0x2000, 4))
    s.call(cases.assign(0x3000, 0, pio=True))
    fast = s.buses[KvmBus.KVM_FAST_MMIO_BUS]
    assert [(r.addr, r.len) for r in fast.range] == [(0x1000, 0)]
    assert s.buses[KvmBus.KVM_MMIO_BUS].ioeventfd_count == 2
    assert fast.ioeventfd_count == 1
    # the fast-bus write: length 0, no value (handle_ept_misconfig)
    assert s.buses.write(KvmBus.KVM_FAST_MMIO_BUS, 0x1000, 0, None)
    assert s.eventfds[0].count == 1
    assert not s.buses.write(KvmBus.KVM_FAST_MMIO_BUS, 0x2000, 0, None)
    s.call(cases.deassign(0x1000, 0))
    assert fast.range == [] and fast.ioeventfd_count == 0


def test_raw_args_and_fast_mmio_flag_ignored():
    """kvm_ioeventfd with raw struct kvm_ioeventfd; flag bit 4 (FAST_MMIO) is inside
    KVM_IOEVENTFD_VALID_FLAG_MASK and changes nothing on x86."""
    s = Sim()
    fd = EventFd()
    s.fds.kvm_ioeventfd(KvmIoEventFdArgs(0x500, 2, fd, KVM_IOEVENTFD_FLAG_PIO | KVM_IOEVENTFD_FLAG_DATAMATCH
                                         | KVM_IOEVENTFD_FLAG_FAST_MMIO, 3))
    assert s.buses.write(KvmBus.KVM_PIO_BUS, 0x500, 2, 3) and fd.count == 1


def test_eventfd_counter_read_resets_and_saturates():
    """fs/eventfd.c: eventfd_signal adds, saturating at ULLONG_MAX; read returns and resets."""
    fd = EventFd()
    fd.signal()
    fd.signal()
    assert fd.read() == 2 and fd.count == 0
    fd.count = (1 << 64) - 2
    fd.signal(5)
    assert fd.count == (1 << 64) - 1


def test_assign_spec_names_eventfd():
    s = Sim()
    fd = s.fds.assign_spec(IoEventFdSpec("doorbell", pio=False, addr=0x400000, length=0))
    assert fd.name == "doorbell"
    with pytest.raises(IoEventFdError) as e:
        s.fds.assign_spec(IoEventFdSpec("again", pio=False, addr=0x400000, length=4))
    assert e.value.errno_name == "EEXIST"
