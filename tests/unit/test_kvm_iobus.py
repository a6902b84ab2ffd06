"""KVM I/O buses (virt/kvm/kvm_main.c: kvm_io_bus_cmp, kvm_io_bus_register_dev,
kvm_io_bus_get_first_dev, __kvm_io_bus_write, __kvm_io_bus_read)."""

from collections import Counter

import pytest

from fastmmio.machine import Bus
from fastmmio.sim.kvm.iobus import (
    NR_IOBUS_DEVS,
    IoBusError,
    KvmBus,
    KvmIoBus,
    KvmIoBuses,
    KvmIoDevice,
    kvm_io_bus_cmp,
)


class Dev(KvmIoDevice):
    def __init__(self, name, accept=True, read_value=None, log=None):
        self.name, self.accept, self.read_value = name, accept, read_value
        self.log = log if log is not None else []

    def write(self, addr, length, value):
        self.log.append((self.name, addr, length, value))
        return self.accept

    def read(self, addr, length):
        self.log.append((self.name, "read", addr, length))
        return self.read_value


def test_cmp_length0_exact_address_and_containment():
    """kvm_io_bus_cmp: len-0 range matches its exact address; otherwise the access must lie
    inside the range."""
    assert kvm_io_bus_cmp(0x100, 4, 0x100, 0) == 0
    assert kvm_io_bus_cmp(0x101, 1, 0x100, 0) == 1
    assert kvm_io_bus_cmp(0xFF, 1, 0x100, 0) == -1
    assert kvm_io_bus_cmp(0x102, 2, 0x100, 4) == 0
    assert kvm_io_bus_cmp(0x102, 4, 0x100, 4) == 1  # runs past the end
    assert kvm_io_bus_cmp(0x100, 0, 0x100, 4) == 0  # a length-0 key inside a range


def test_register_keeps_sorted_and_equal_ranges_in_registration_order():
    """kvm_io_bus_register_dev: inserted after every range not greater than the new one."""
    b = KvmIoBus(KvmBus.KVM_MMIO_BUS)
    d = [Dev(i) for i in range(5)]
    b.register_dev(0x300, 4, d[0])
    b.register_dev(0x100, 4, d[1])
    b.register_dev(0x200, 0, d[2])
    b.register_dev(0x100, 4, d[3])
    b.register_dev(0x100, 2, d[4])
    assert [(r.addr, r.len, r.dev.name) for r in b.range] == [
        (0x100, 2, 4), (0x100, 4, 1), (0x100, 4, 3), (0x200, 0, 2), (0x300, 4, 0)]


def test_first_device_that_accepts_wins_in_order():
    """__kvm_io_bus_write: devices tried in order, first to accept wins; the walk back from
    the bsearch hit finds the first match."""
    log = []
    b = KvmIoBus(KvmBus.KVM_MMIO_BUS)
    b.register_dev(0x100, 4, Dev("a", accept=False, log=log))
    b.register_dev(0x100, 4, Dev("b", accept=True, log=log))
    b.register_dev(0x100, 4, Dev("c", accept=True, log=log))
    assert b.write(0x100, 4, 7)
    assert [x[0] for x in log] == ["a", "b"]


def test_no_device_means_eopnotsupp():
    """__kvm_io_bus_write returns -EOPNOTSUPP when no range matches or nobody accepts."""
    b = KvmIoBus(KvmBus.KVM_PIO_BUS)
    assert not b.write(0x10, 1, 0)
    b.register_dev(0x10, 1, Dev("x", accept=False))
    assert not b.write(0x10, 1, 0)
    assert b.read(0x10, 1) is None


def test_read_goes_to_first_device_with_a_read_op():
    """__kvm_io_bus_read: like the write path, with the devices' read ops."""
    b = KvmIoBus(KvmBus.KVM_MMIO_BUS)
    b.register_dev(0x100, 8, Dev("noread"))
    b.register_dev(0x100, 8, Dev("r", read_value=0x1_0000_00AB))
    assert b.read(0x100, 1) == 0xAB


def test_events_lookup_and_probes_grow_with_devices():
    """kvm.bus.lookup.<BUS> once per access; kvm.bus.probe per bsearch step, walk-back step and
    device tried, so more devices on the bus cost more probes."""
    def probes(n):
        ev = Counter()
        b = KvmIoBus(KvmBus.KVM_FAST_MMIO_BUS, ev)
        for i in range(n):
            b.register_dev(0x1000 + 0x10 * i, 0, Dev(i))
        b.write(0x1000, 0, None)
        assert ev["kvm.bus.lookup.KVM_FAST_MMIO_BUS"] == 1
        return ev["kvm.bus.probe"]
    p1, p16, p256 = probes(1), probes(16), probes(256)
    assert p1 == 2  # one comparison, one device tried
    assert p1 < p16 < p256


def test_bsearch_hit_walks_back_to_first_match():
    """kvm_io_bus_get_first_dev: bsearch may land on any equal element; walk back."""
    b = KvmIoBus(KvmBus.KVM_MMIO_BUS)
    for i in range(7):
        b.register_dev(0x100, 8, Dev(i))
    assert b.get_first_dev(0x100, 4) == 0
    assert b.get_first_dev(0x108, 1) == -1


def test_enospc_for_non_ioeventfd_devices():
    """kvm_io_bus_register_dev: at most NR_IOBUS_DEVS devices that are not ioeventfds."""
    b = KvmIoBus(KvmBus.KVM_PIO_BUS)
    for i in range(NR_IOBUS_DEVS):
        b.register_dev(i, 1, Dev(i))
    with pytest.raises(IoBusError) as e:
        b.register_dev(5000, 1, Dev("x"))
    assert e.value.errno_name == "ENOSPC"


def test_buses_container_and_machine_names():
    """kvm->buses[]: one bus per enum kvm_bus; machine.Bus names map onto them."""
    bs = KvmIoBuses()
    assert KvmBus.from_machine(Bus.FAST_MMIO) is KvmBus.KVM_FAST_MMIO_BUS
    bs[KvmBus.KVM_PIO_BUS].register_dev(0xE000, 2, Dev("p"))
    assert bs.write(KvmBus.KVM_PIO_BUS, 0xE000, 2, 1)
    assert not bs.write(KvmBus.KVM_MMIO_BUS, 0xE000, 2, 1)
    assert bs.events["kvm.bus.lookup.KVM_MMIO_BUS"] == 1
