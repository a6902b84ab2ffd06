"""What surrounds the guest: memslots, holes, ioeventfds, coalesced zones.

A :class:`MachineSpec` is backend-neutral: the real backend turns it into
KVM_SET_USER_MEMORY_REGION / KVM_IOEVENTFD / KVM_REGISTER_COALESCED_MMIO calls, the simulator
into its memslot array and I/O buses. Together with a :class:`~fastmmio.image.GuestImage`
it is a :class:`Machine`, which is what a backend runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from fastmmio import kvmabi
from fastmmio.image import GuestImage


class Bus(str, Enum):
    """KVM's I/O buses, by the names of ``enum kvm_bus``."""

    MMIO = "KVM_MMIO_BUS"
    PIO = "KVM_PIO_BUS"
    FAST_MMIO = "KVM_FAST_MMIO_BUS"  # never registered directly; length-0 MMIO ioeventfds land here too


@dataclass(frozen=True)
class MemSlot:
    slot: int
    gpa: int
    size: int
    readonly: bool = False  # KVM_MEM_READONLY
    fill: int = 0  # initial byte value of the whole slot (before image regions are copied in)


@dataclass(frozen=True)
class IoEventFdSpec:
    """One KVM_IOEVENTFD registration. ``length`` 0 matches on address alone."""

    name: str
    pio: bool
    addr: int
    length: int
    datamatch: int | None = None

    @property
    def flags(self) -> int:
        """``struct kvm_ioeventfd.flags`` for assigning it."""
        return kvmabi.ioeventfd_flags(pio=self.pio, datamatch=self.datamatch is not None)

    @property
    def key(self) -> kvmabi.IoEventFdKey:
        """What ``ioeventfd_check_collision`` compares."""
        return kvmabi.IoEventFdKey(kvmabi.ioeventfd_bus_from_flags(self.flags), self.addr,
                                   self.length, self.datamatch)


@dataclass(frozen=True)
class CoalescedZone:
    addr: int
    size: int
    pio: bool = False  # KVM_CAP_COALESCED_PIO zone


@dataclass(frozen=True)
class MachineSpec:
    memslots: tuple[MemSlot, ...]
    ioeventfds: tuple[IoEventFdSpec, ...] = ()
    coalesced: tuple[CoalescedZone, ...] = ()
    done_port: int = 0x00F4
    # Userspace device model: what a read that exits to userspace returns, by width.
    device_read_value: int = 0x1122_3344_5566_7788
    mmio_holes: tuple[tuple[int, int], ...] = field(default=())  # (gpa, size): no memslot, documented
    # KVM_CREATE_IRQCHIP: the in-kernel PIC (KVM_PIO_BUS) and IOAPIC (KVM_MMIO_BUS)
    irqchip: bool = False


@dataclass(frozen=True)
class Machine:
    image: GuestImage
    spec: MachineSpec
