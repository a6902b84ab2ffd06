"""Coalesced MMIO/PIO: writes to a zone are appended to a ring instead of exiting.

Models virt/kvm/coalesced_mmio.c: ``KVM_REGISTER_COALESCED_MMIO`` registers a device on
``KVM_MMIO_BUS`` (or ``KVM_PIO_BUS`` for a PIO zone, ``KVM_CAP_COALESCED_PIO``) covering the
zone; ``coalesced_mmio_write`` accepts a write that lies inside the zone when the ring has
room, copying address, length, data and the PIO flag into the next entry; a full ring refuses
(``-EOPNOTSUPP``), so the access exits to userspace, which drains the ring. The ring is the
one page of ``struct kvm_coalesced_mmio_ring``: ``KVM_COALESCED_MMIO_MAX`` =
(4096 - 8) / 24 = 170 entries, one of which always stays free. Reads are not handled.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from fastmmio.sim.kvm.iobus import KvmBus, KvmIoBuses, KvmIoDevice

KVM_COALESCED_MMIO_MAX = (4096 - 8) // 24


@dataclass(frozen=True)
class CoalescedEntry:
    """``struct kvm_coalesced_mmio``."""

    phys_addr: int
    len: int
    data: int
    pio: bool


class CoalescedRing:
    """``struct kvm_coalesced_mmio_ring``: ``first`` (consumer) and ``last`` (producer)."""

    def __init__(self) -> None:
        self.first = 0
        self.last = 0
        self.entries: list[CoalescedEntry | None] = [None] * KVM_COALESCED_MMIO_MAX

    def has_room(self) -> bool:
        return (self.last + 1) % KVM_COALESCED_MMIO_MAX != self.first

    def append(self, entry: CoalescedEntry) -> None:
        self.entries[self.last] = entry
        self.last = (self.last + 1) % KVM_COALESCED_MMIO_MAX

    def drain(self) -> list[CoalescedEntry]:
        """What userspace does: take every entry from ``first`` to ``last``."""
        out = []
        while self.first != self.last:
            e = self.entries[self.first]
            assert e is not None
            out.append(e)
            self.first = (self.first + 1) % KVM_COALESCED_MMIO_MAX
        return out

    def __len__(self) -> int:
        return (self.last - self.first) % KVM_COALESCED_MMIO_MAX


class CoalescedMmioDev(KvmIoDevice):
    """``struct kvm_coalesced_mmio_dev`` for one zone."""

    def __init__(self, ring: CoalescedRing, addr: int, size: int, pio: bool, events: Counter):
        self.ring = ring
        self.addr = addr
        self.size = size
        self.pio = pio
        self.events = events

    def in_range(self, addr: int, length: int) -> bool:
        """``coalesced_mmio_in_range``."""
        if length < 0 or addr + length < addr:
            return False
        return self.addr <= addr and addr + length <= self.addr + self.size

    def write(self, addr: int, length: int, value: int | None) -> bool:
        if not self.in_range(addr, length) or not self.ring.has_room():
            return False
        self.ring.append(CoalescedEntry(addr, length, (value or 0) & ((1 << (8 * length)) - 1) if length else 0,
                                        self.pio))
        self.events["kvm.coalesced.append"] += 1
        return True


def register_coalesced_zone(buses: KvmIoBuses, ring: CoalescedRing, addr: int, size: int,
                            pio: bool = False) -> CoalescedMmioDev:
    """``kvm_vm_ioctl_register_coalesced_mmio``."""
    dev = CoalescedMmioDev(ring, addr, size, pio, buses.events)
    buses[KvmBus.KVM_PIO_BUS if pio else KvmBus.KVM_MMIO_BUS].register_dev(addr, size, dev)
    return dev
