"""ioeventfd: a guest write to a registered address signals an eventfd, without an exit.

Models virt/kvm/eventfd.c:

* ``ioeventfd_in_range``: the address must be exact; a length-0 ioeventfd always matches;
  otherwise the access length must equal the registered one, then a wildcard matches and a
  DATAMATCH one compares the value (zero-extended from the access width) with the u64
  datamatch.
* ``kvm_assign_ioeventfd``: length 0, 1, 2, 4 or 8 (EINVAL); ``addr + len`` must not wrap
  (EINVAL); no flag outside ``KVM_IOEVENTFD_VALID_FLAG_MASK`` (EINVAL); length 0 with
  DATAMATCH is EINVAL; ``ioeventfd_check_collision`` (same bus and address, and either length
  0, or the same length with either side wildcard or equal datamatch) is EEXIST. A length-0
  MMIO ioeventfd is registered a second time on ``KVM_FAST_MMIO_BUS`` (Jason Wang, Linux
  4.4); PIO ones never are.
* ``kvm_deassign_ioeventfd``: finds the ioeventfd with the same bus, eventfd, address,
  length, wildcard-ness and (for DATAMATCH) datamatch; ENOENT if none; a length-0 MMIO one is
  removed from the fast bus too.
* ``eventfd_signal``: the counter goes up by one (saturating at ULLONG_MAX, fs/eventfd.c).

Errors are :class:`fastmmio.errors.IoEventFdError` with the kernel's errno name, the same
type the real backend raises.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from fastmmio.errors import IoEventFdError
from fastmmio.machine import IoEventFdSpec
from fastmmio.sim.kvm.iobus import IoBusError, KvmBus, KvmIoBuses, KvmIoDevice

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY = 1 << 3
KVM_IOEVENTFD_FLAG_FAST_MMIO = 1 << 4  # defined in the uapi, inside the valid mask, unused on x86
KVM_IOEVENTFD_VALID_FLAG_MASK = (1 << 5) - 1

_ULLONG_MAX = (1 << 64) - 1


class EventFd:
    """An eventfd's counter (``struct eventfd_ctx``), as a non-semaphore eventfd."""

    def __init__(self, name: str = ""):
        self.name = name
        self.count = 0

    def signal(self, n: int = 1) -> None:
        """``eventfd_signal``: add ``n``, saturating at ULLONG_MAX."""
        self.count = min(self.count + n, _ULLONG_MAX)

    def read(self) -> int:
        """``read(2)`` of a non-semaphore eventfd: the count, which is reset to 0 (0 here
        where the real read would block or return EAGAIN)."""
        c, self.count = self.count, 0
        return c

    def __repr__(self) -> str:
        return f"EventFd({self.name!r}, count={self.count})"


@dataclass(frozen=True)
class KvmIoEventFdArgs:
    """``struct kvm_ioeventfd`` (``fd`` is the eventfd object itself)."""

    addr: int
    len: int
    fd: EventFd
    flags: int = 0
    datamatch: int = 0


class IoEventFd(KvmIoDevice):
    """``struct _ioeventfd``: an I/O device whose write op signals ``eventfd``."""

    def __init__(self, bus_idx: KvmBus, addr: int, length: int, eventfd: EventFd,
                 datamatch: int | None, events: Counter):
        self.bus_idx = bus_idx
        self.addr = addr
        self.length = length
        self.eventfd = eventfd
        self.wildcard = datamatch is None
        self.datamatch = 0 if datamatch is None else datamatch & _ULLONG_MAX
        self.events = events

    def in_range(self, addr: int, length: int, value: int | None) -> bool:
        """``ioeventfd_in_range``."""
        if addr != self.addr:
            return False
        if not self.length:
            return True
        if length != self.length:
            return False
        if self.wildcard:
            return True
        if length not in (1, 2, 4, 8) or value is None:
            return False
        return (value & ((1 << (8 * length)) - 1)) == self.datamatch

    def write(self, addr: int, length: int, value: int | None) -> bool:
        """``ioeventfd_write``: signal the eventfd when the access is in range."""
        if not self.in_range(addr, length, value):
            return False
        self.eventfd.signal(1)
        self.events["kvm.eventfd.signal"] += 1
        return True

    def __repr__(self) -> str:
        dm = "wildcard" if self.wildcard else f"datamatch={self.datamatch:#x}"
        return f"IoEventFd({self.bus_idx.name}, {self.addr:#x}, len={self.length}, {dm})"


def ioeventfd_bus_from_flags(flags: int) -> KvmBus:
    """``ioeventfd_bus_from_flags``."""
    if flags & KVM_IOEVENTFD_FLAG_PIO:
        return KvmBus.KVM_PIO_BUS
    if flags & KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY:
        return KvmBus.KVM_VIRTIO_CCW_NOTIFY_BUS
    return KvmBus.KVM_MMIO_BUS


class IoEventFds:
    """``kvm->ioeventfds``: every registered ioeventfd, with the ``KVM_IOEVENTFD`` ioctl."""

    def __init__(self, buses: KvmIoBuses, no_length: bool = True):
        """``no_length``: ``KVM_CAP_IOEVENTFD_NO_LENGTH`` (f848a5a8, 2014); without it length 0
        is refused like any other unsupported length (KVM before 2014)."""
        self.buses = buses
        self.no_length = no_length
        self.events = buses.events
        self.items: list[IoEventFd] = []  # registration order (list_add_tail)

    def kvm_ioeventfd(self, args: KvmIoEventFdArgs) -> None:
        """``kvm_ioeventfd``: assign, or deassign with ``KVM_IOEVENTFD_FLAG_DEASSIGN``."""
        if args.flags & KVM_IOEVENTFD_FLAG_DEASSIGN:
            self._deassign(args)
        else:
            self._assign(args)

    def assign(self, fd: EventFd, addr: int, length: int, *, pio: bool = False,
               datamatch: int | None = None, extra_flags: int = 0) -> None:
        flags = extra_flags | (KVM_IOEVENTFD_FLAG_PIO if pio else 0)
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        self.kvm_ioeventfd(KvmIoEventFdArgs(addr, length, fd, flags, datamatch or 0))

    def deassign(self, fd: EventFd, addr: int, length: int, *, pio: bool = False,
                 datamatch: int | None = None, extra_flags: int = 0) -> None:
        flags = extra_flags | KVM_IOEVENTFD_FLAG_DEASSIGN | (KVM_IOEVENTFD_FLAG_PIO if pio else 0)
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        self.kvm_ioeventfd(KvmIoEventFdArgs(addr, length, fd, flags, datamatch or 0))

    def assign_spec(self, spec: IoEventFdSpec) -> EventFd:
        """Register a :class:`~fastmmio.machine.IoEventFdSpec` with a new eventfd named after it."""
        fd = EventFd(spec.name)
        self.assign(fd, spec.addr, spec.length, pio=spec.pio, datamatch=spec.datamatch)
        return fd

    # -- kvm_assign_ioeventfd ---------------------------------------------------------------

    def _assign(self, args: KvmIoEventFdArgs) -> None:
        bus_idx = ioeventfd_bus_from_flags(args.flags)
        if args.len not in ((0, 1, 2, 4, 8) if self.no_length else (1, 2, 4, 8)):
            raise IoEventFdError("EINVAL", f"length {args.len} is not "
                                 + ("0, 1, 2, 4 or 8" if self.no_length else "1, 2, 4 or 8 (no KVM_CAP_IOEVENTFD_NO_LENGTH)"))
        if not 0 <= args.addr <= _ULLONG_MAX:
            raise IoEventFdError("EINVAL", f"address {args.addr:#x} is not a u64")
        if args.addr + args.len > _ULLONG_MAX:
            raise IoEventFdError("EINVAL", f"address {args.addr:#x} + length {args.len} wraps")
        if args.flags & ~KVM_IOEVENTFD_VALID_FLAG_MASK:
            raise IoEventFdError(
                "EINVAL", f"unknown flags {args.flags & ~KVM_IOEVENTFD_VALID_FLAG_MASK:#x}")
        if not args.len and args.flags & KVM_IOEVENTFD_FLAG_DATAMATCH:
            raise IoEventFdError("EINVAL", "length 0 cannot be combined with DATAMATCH")
        self._assign_idx(bus_idx, args)
        if not args.len and bus_idx == KvmBus.KVM_MMIO_BUS:
            try:
                self._assign_idx(KvmBus.KVM_FAST_MMIO_BUS, args)
            except IoEventFdError:
                self._deassign_idx(bus_idx, args)
                raise

    def _assign_idx(self, bus_idx: KvmBus, args: KvmIoEventFdArgs) -> None:
        """``kvm_assign_ioeventfd_idx``."""
        datamatch = args.datamatch if args.flags & KVM_IOEVENTFD_FLAG_DATAMATCH else None
        p = IoEventFd(bus_idx, args.addr, args.len, args.fd, datamatch, self.events)
        for q in self.items:
            if self._collides(q, p):
                raise IoEventFdError(
                    "EEXIST", f"{bus_idx.name} {args.addr:#x}: collides with {q!r}")
        bus = self.buses[bus_idx]
        try:
            bus.register_dev(p.addr, p.length, p)
        except IoBusError as e:
            raise IoEventFdError(e.errno_name, e.rule) from None
        bus.ioeventfd_count += 1
        self.items.append(p)

    @staticmethod
    def _collides(a: IoEventFd, b: IoEventFd) -> bool:
        """``ioeventfd_check_collision``."""
        return (a.bus_idx == b.bus_idx and a.addr == b.addr
                and (not a.length or not b.length
                     or (a.length == b.length
                         and (a.wildcard or b.wildcard or a.datamatch == b.datamatch))))

    # -- kvm_deassign_ioeventfd -------------------------------------------------------------

    def _deassign(self, args: KvmIoEventFdArgs) -> None:
        bus_idx = ioeventfd_bus_from_flags(args.flags)
        found = self._deassign_idx(bus_idx, args)
        if not args.len and bus_idx == KvmBus.KVM_MMIO_BUS:
            self._deassign_idx(KvmBus.KVM_FAST_MMIO_BUS, args)
        if not found:
            raise IoEventFdError("ENOENT", f"no such ioeventfd on {bus_idx.name} at {args.addr:#x}")

    def _deassign_idx(self, bus_idx: KvmBus, args: KvmIoEventFdArgs) -> bool:
        """``kvm_deassign_ioeventfd_idx``: True when one was removed."""
        wildcard = not args.flags & KVM_IOEVENTFD_FLAG_DATAMATCH
        for p in self.items:
            if (p.bus_idx != bus_idx or p.eventfd is not args.fd or p.addr != args.addr
                    or p.length != args.len or p.wildcard != wildcard):
                continue
            if not p.wildcard and p.datamatch != args.datamatch & _ULLONG_MAX:
                continue
            bus = self.buses[bus_idx]
            bus.unregister_dev(p)
            bus.ioeventfd_count -= 1
            self.items.remove(p)
            return True
        return False
