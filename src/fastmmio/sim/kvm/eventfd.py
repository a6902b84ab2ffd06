"""ioeventfd: a guest write to a registered address signals an eventfd, without an exit.

Models virt/kvm/eventfd.c:

* ``ioeventfd_in_range``: the address must be exact; a length-0 ioeventfd always matches;
  otherwise the access length must equal the registered one, then a wildcard matches and a
  DATAMATCH one compares the value (zero-extended from the access width) with the u64
  datamatch.
* ``kvm_assign_ioeventfd``: the argument checks (EINVAL) and ``ioeventfd_check_collision``
  (EEXIST) are :mod:`fastmmio.kvmabi`'s, shared with the real backend. A length-0
  MMIO ioeventfd is registered a second time on ``KVM_FAST_MMIO_BUS`` (Jason Wang, Linux
  4.4); PIO ones never are. Two older rule sets are selectable: before f848a5a8 (2014) length
  0 is EINVAL (``no_length=False``); from f848a5a8 to Linux 4.3 (so in 4.2, Aug 2015) a
  length-0 *PIO* ioeventfd is EINVAL too (the check was ``!len && flags & (PIO |
  DATAMATCH)``; ``pio_no_length=False``), and a length-0 MMIO one was a single device
  registered on both buses rather than two, which no look-up or signal can tell apart, so the
  model registers it the same way under both rule sets.
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
from fastmmio.kvmabi import (  # noqa: F401 - the flags are part of this model's API
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_DEASSIGN,
    KVM_IOEVENTFD_FLAG_FAST_MMIO,
    KVM_IOEVENTFD_FLAG_PIO,
    KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY,
    KVM_IOEVENTFD_VALID_FLAG_MASK,
    U64_MAX,
    IoEventFdKey,
    assign_check,
    collides,
    ioeventfd_flags,
)
from fastmmio.kvmabi import ioeventfd_bus_from_flags as _bus_name
from fastmmio.machine import IoEventFdSpec
from fastmmio.sim.kvm.iobus import IoBusError, KvmBus, KvmIoBuses, KvmIoDevice

_ULLONG_MAX = U64_MAX


class EventFd:
    """An eventfd's counter (``struct eventfd_ctx``), as a non-semaphore eventfd."""

    def __init__(self, name: str = ""):
        self.name = name
        self.count = 0

    def signal(self, n: int = 1) -> None:
        """``eventfd_signal``: add ``n``, saturating at ULLONG_MAX."""
        count = self.count + n
        self.count = count if count < _ULLONG_MAX else _ULLONG_MAX

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

    @property
    def key(self) -> IoEventFdKey:
        """What ``ioeventfd_check_collision`` compares."""
        return IoEventFdKey(self.bus_idx, self.addr, self.length,
                            None if self.wildcard else self.datamatch)

    def __repr__(self) -> str:
        dm = "wildcard" if self.wildcard else f"datamatch={self.datamatch:#x}"
        return f"IoEventFd({self.bus_idx.name}, {self.addr:#x}, len={self.length}, {dm})"


def ioeventfd_bus_from_flags(flags: int) -> KvmBus:
    """``ioeventfd_bus_from_flags``."""
    return KvmBus[_bus_name(flags)]


class IoEventFds:
    """``kvm->ioeventfds``: every registered ioeventfd, with the ``KVM_IOEVENTFD`` ioctl."""

    def __init__(self, buses: KvmIoBuses, no_length: bool = True, pio_no_length: bool = True):
        """``no_length``: ``KVM_CAP_IOEVENTFD_NO_LENGTH`` (f848a5a8, 2014); without it length 0
        is refused like any other unsupported length (KVM before 2014). ``pio_no_length``:
        length 0 on ``KVM_PIO_BUS`` (Linux 4.4, ``KVM_CAP_IOEVENTFD_ANY_LENGTH``); without it
        a length-0 PIO ioeventfd is EINVAL (f848a5a8 to Linux 4.3)."""
        self.buses = buses
        self.no_length = no_length
        self.pio_no_length = pio_no_length
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
        flags = ioeventfd_flags(pio=pio, datamatch=datamatch is not None, extra=extra_flags)
        self.kvm_ioeventfd(KvmIoEventFdArgs(addr, length, fd, flags, datamatch or 0))

    def deassign(self, fd: EventFd, addr: int, length: int, *, pio: bool = False,
                 datamatch: int | None = None, extra_flags: int = 0) -> None:
        flags = ioeventfd_flags(pio=pio, datamatch=datamatch is not None, deassign=True,
                                extra=extra_flags)
        self.kvm_ioeventfd(KvmIoEventFdArgs(addr, length, fd, flags, datamatch or 0))

    def assign_spec(self, spec: IoEventFdSpec) -> EventFd:
        """Register a :class:`~fastmmio.machine.IoEventFdSpec` with a new eventfd named after it."""
        fd = EventFd(spec.name)
        self.assign(fd, spec.addr, spec.length, pio=spec.pio, datamatch=spec.datamatch)
        return fd

    # -- kvm_assign_ioeventfd ---------------------------------------------------------------

    def _assign(self, args: KvmIoEventFdArgs) -> None:
        bus_idx = ioeventfd_bus_from_flags(args.flags)
        if not 0 <= args.addr <= _ULLONG_MAX:
            raise IoEventFdError("EINVAL", f"address {args.addr:#x} is not a u64")
        broken = assign_check(args.addr, args.len, args.flags, no_length=self.no_length,
                              pio_no_length=self.pio_no_length)
        if broken is not None:
            raise IoEventFdError(*broken)
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
            if collides(q.key, p.key):
                raise IoEventFdError(
                    "EEXIST", f"{bus_idx.name} {args.addr:#x}: collides with {q!r}")
        bus = self.buses[bus_idx]
        try:
            bus.register_dev(p.addr, p.length, p)
        except IoBusError as e:
            raise IoEventFdError(e.errno_name, e.rule) from None
        bus.ioeventfd_count += 1
        self.items.append(p)

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
