"""Coalesced MMIO/PIO (virt/kvm/coalesced_mmio.c: coalesced_mmio_in_range,
coalesced_mmio_write, the ring of KVM_COALESCED_MMIO_MAX entries) and the VM container."""

from collections import Counter

import pytest

from fastmmio import layout
from fastmmio.routes import build_machine, get_route
from fastmmio.sim.kvm.coalesced import KVM_COALESCED_MMIO_MAX, CoalescedRing, register_coalesced_zone
from fastmmio.sim.kvm.iobus import KvmBus, KvmIoBuses
from fastmmio.sim.kvm.memslots import MemslotError
from fastmmio.sim.kvm.vm import KvmVm


def test_ring_size_and_one_free_slot():
    """KVM_COALESCED_MMIO_MAX = (PAGE_SIZE - sizeof ring header) / sizeof entry = 170; the
    producer stops one short of the consumer, so 169 entries fit."""
    assert KVM_COALESCED_MMIO_MAX == 170
    buses = KvmIoBuses(Counter())
    ring = CoalescedRing()
    register_coalesced_zone(buses, ring, 0x1000, 0x100)
    taken = sum(buses.write(KvmBus.KVM_MMIO_BUS, 0x1000, 4, i) for i in range(200))
    assert taken == 169 and len(ring) == 169
    assert buses.events["kvm.coalesced.append"] == 169
    entries = ring.drain()
    assert [e.data for e in entries[:3]] == [0, 1, 2] and len(ring) == 0
    assert buses.write(KvmBus.KVM_MMIO_BUS, 0x1000, 4, 7)


def test_in_range_and_pio_flag():
    """coalesced_mmio_in_range: the whole access inside the zone; a PIO zone sits on
    KVM_PIO_BUS and marks its entries pio."""
    buses = KvmIoBuses(Counter())
    ring = CoalescedRing()
    register_coalesced_zone(buses, ring, 0xE010, 4, pio=True)
    assert buses.write(KvmBus.KVM_PIO_BUS, 0xE012, 2, 0xBEEF)
    assert not buses.write(KvmBus.KVM_PIO_BUS, 0xE013, 2, 0)
    assert not buses.write(KvmBus.KVM_MMIO_BUS, 0xE010, 1, 0)
    (e,) = ring.drain()
    assert (e.phys_addr, e.len, e.data, e.pio) == (0xE012, 2, 0xBEEF, True)


def test_coalesced_route_has_no_user_exit_until_ring_full():
    """The coalesced-mmio route end to end: writes land in the ring without exits."""
    from kvm_sim_harness import MachineRun

    run = MachineRun(build_machine(get_route("coalesced-mmio"), 0), n=8)
    assert run.ev["kvm.coalesced.append"] == 8 and not run.user_exits
    assert len(run.vm.coalesced_ring) == 8


def test_vm_from_spec_loads_image_and_rejects_holes():
    """KvmVm.from_spec: memslots, ioeventfds and the image's regions copied into the backing;
    writing where no memslot is gives a MemslotError (EFAULT)."""
    m = build_machine(get_route("mmio-eventfd-len0"), 0)
    vm = KvmVm.from_spec(m.spec, m.image)
    code = next(r for r in m.image.regions if r.name == "code")
    assert vm.guest_memory.read_guest(code.gpa, len(code.data)) == code.data
    assert vm.guest_memory.read_guest(layout.RO_BASE, 4) == bytes([layout.RO_PATTERN]) * 4
    assert set(vm.eventfds) == {"doorbell"}
    with pytest.raises(MemslotError) as e:
        vm.write_backing(layout.MMIO_BASE, b"x")
    assert e.value.errno_name == "EFAULT"
