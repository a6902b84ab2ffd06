"""KVM's I/O buses: sorted arrays of address ranges with devices behind them.

Models ``struct kvm_io_bus`` and its functions in virt/kvm/kvm_main.c:

* ``kvm_io_bus_cmp(key, range)``: a key below the range's address sorts before it; a range of
  length 0 matches only its exact address; otherwise the access ``[addr, addr+len)`` must lie
  inside the range (a key whose end passes the range's end sorts after it).
* ``kvm_io_bus_register_dev``: the new range goes after every range that does not compare
  greater than it, so among equal ranges the first registered is tried first; at most
  ``NR_IOBUS_DEVS`` devices that are not ioeventfds (ENOSPC).
* ``kvm_io_bus_get_first_dev``: the kernel's ``bsearch()`` (lib/bsearch.c) finds *a* matching
  range; the search then walks back to the first match.
* ``__kvm_io_bus_write`` / ``__kvm_io_bus_read``: matching devices are tried in order; the
  first that accepts (returns 0) wins; ``-EOPNOTSUPP`` when none does.

Events: one ``kvm.bus.lookup.<BUS>`` per read or write, and one ``kvm.bus.probe`` for every
binary-search comparison, every walk-back comparison and every device tried, so the cost of a
look-up grows with the number of devices as it does in the kernel.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import IntEnum

from fastmmio.errors import FastmmioError
from fastmmio.machine import Bus

NR_IOBUS_DEVS = 1000
_U64 = (1 << 64) - 1


class KvmBus(IntEnum):
    """``enum kvm_bus`` (include/linux/kvm_host.h), in the kernel's order."""

    KVM_MMIO_BUS = 0
    KVM_PIO_BUS = 1
    KVM_VIRTIO_CCW_NOTIFY_BUS = 2
    KVM_FAST_MMIO_BUS = 3

    @classmethod
    def from_machine(cls, bus: Bus) -> "KvmBus":
        return cls[bus.value]


# the members by their kernel names, for the exit paths (an enum attribute look-up costs more
# than the bus look-up it names)
KVM_MMIO_BUS = KvmBus.KVM_MMIO_BUS
KVM_PIO_BUS = KvmBus.KVM_PIO_BUS
KVM_FAST_MMIO_BUS = KvmBus.KVM_FAST_MMIO_BUS


class IoBusError(FastmmioError):
    """``kvm_io_bus_register_dev`` refused a device (ENOSPC, ENOMEM)."""

    def __init__(self, errno_name: str, rule: str):
        self.errno_name = errno_name
        self.rule = rule
        super().__init__(f"I/O bus registration rejected ({errno_name}): {rule}")


class KvmIoDevice:
    """``struct kvm_io_device`` with its ops. A device without an op refuses the access
    (``kvm_iodevice_write``/``_read`` return ``-EOPNOTSUPP`` when the op is NULL).

    ``write`` gets ``value`` None for a length-0 write (``KVM_FAST_MMIO_BUS``, val NULL).
    Return True to accept (0), False to refuse (-EOPNOTSUPP).
    """

    def write(self, addr: int, length: int, value: int | None) -> bool:
        return False

    def read(self, addr: int, length: int) -> int | None:
        """Return the value read, or None to refuse."""
        return None


@dataclass(frozen=True)
class KvmIoRange:
    """``struct kvm_io_range``."""

    addr: int
    len: int
    dev: KvmIoDevice


def kvm_io_bus_cmp(addr1: int, len1: int, addr2: int, len2: int) -> int:
    """``kvm_io_bus_cmp(r1, r2)``: -1, 0 or 1 (the key is r1, the registered range r2)."""
    if addr1 < addr2:
        return -1
    if len2:
        addr1 += len1
        addr2 += len2
    if addr1 > addr2:
        return 1
    return 0


_LOOK_UP_MEMO = 4096  # distinct (addr, len) answers KvmIoBus keeps


class KvmIoBus:
    """One ``struct kvm_io_bus``."""

    def __init__(self, bus: KvmBus, events: Counter | None = None):
        self.bus = bus
        self.events: Counter = events if events is not None else Counter()
        self.range: list[KvmIoRange] = []
        self.ioeventfd_count = 0
        self._lookup_event = f"kvm.bus.lookup.{bus.name}"
        # _look_up's answers, (addr, len) -> (index, probes, devices), until the ranges change
        self._looked_up: dict[tuple[int, int], tuple[int, int, tuple[KvmIoDevice, ...]]] = {}

    @property
    def dev_count(self) -> int:
        return len(self.range)

    # -- registration -----------------------------------------------------------------------

    def register_dev(self, addr: int, length: int, dev: KvmIoDevice) -> None:
        """``kvm_io_bus_register_dev``: insert after every range not greater than the new one."""
        if self.dev_count - self.ioeventfd_count > NR_IOBUS_DEVS - 1:
            raise IoBusError("ENOSPC", f"{self.bus.name} already holds {NR_IOBUS_DEVS} devices "
                             "that are not ioeventfds")
        i = 0
        while i < self.dev_count:
            r = self.range[i]
            if kvm_io_bus_cmp(r.addr, r.len, addr, length) > 0:
                break
            i += 1
        self.range.insert(i, KvmIoRange(addr, length, dev))
        self._looked_up.clear()

    def unregister_dev(self, dev: KvmIoDevice) -> bool:
        """``kvm_io_bus_unregister_dev``: remove the device; False if it was not there."""
        for i, r in enumerate(self.range):
            if r.dev is dev:
                del self.range[i]
                self._looked_up.clear()
                return True
        return False

    # -- look-up ----------------------------------------------------------------------------

    def get_first_dev(self, addr: int, length: int) -> int:
        """``kvm_io_bus_get_first_dev``: index of the first matching range, or -1 (-ENOENT).

        The binary search is lib/bsearch.c's: the pivot is ``base + num/2``; on "greater" the
        base moves past the pivot and ``num`` loses one before halving. Each range compared
        counts ``kvm.bus.probe``.
        """
        return self._look_up(addr, length)[0]

    def _look_up(self, addr: int, length: int) -> tuple[int, int, tuple[KvmIoDevice, ...]]:
        """:meth:`get_first_dev` (its probes counted) with the devices of the matching ranges
        from there on, in order (those ``__kvm_io_bus_write`` and ``__kvm_io_bus_read`` offer
        the access to until one takes it). The ranges change only by :meth:`register_dev` and
        :meth:`unregister_dev`, so an answer is kept until they do."""
        key = (addr, length)
        known = self._looked_up.get(key)
        if known is None:
            known = self._looked_up[key] = self._search(addr, length)
            if len(self._looked_up) > _LOOK_UP_MEMO:
                self._looked_up.clear()
        if known[1]:
            self.events["kvm.bus.probe"] += known[1]
        return known

    def _search(self, addr: int, length: int) -> tuple[int, int, tuple[KvmIoDevice, ...]]:
        """get_first_dev's search: (index or -1, ranges compared, matching devices)."""
        rng = self.range
        base, num = 0, len(rng)
        found = -1
        probes = 0
        while num > 0:
            pivot = base + (num >> 1)
            r = rng[pivot]
            probes += 1
            c = kvm_io_bus_cmp(addr, length, r.addr, r.len)
            if c == 0:
                found = pivot
                break
            if c > 0:
                base = pivot + 1
                num -= 1
            num >>= 1
        if found < 0:
            return -1, probes, ()
        while found > 0:
            r = rng[found - 1]
            probes += 1
            if kvm_io_bus_cmp(addr, length, r.addr, r.len) != 0:
                break
            found -= 1
        devs = []
        for r in rng[found:]:
            if kvm_io_bus_cmp(addr, length, r.addr, r.len) != 0:
                break
            devs.append(r.dev)
        return found, probes, tuple(devs)

    def write(self, addr: int, length: int, value: int | None) -> bool:
        """``kvm_io_bus_write``: True when a device accepted the write (return value 0).
        Each matching range offered the write counts ``kvm.bus.probe``."""
        ev = self.events
        ev[self._lookup_event] += 1
        for dev in self._look_up(addr, length)[2]:
            ev["kvm.bus.probe"] += 1
            if dev.write(addr, length, value):
                return True
        return False

    def read(self, addr: int, length: int) -> int | None:
        """``kvm_io_bus_read``: the value read by the first device that accepts, or None."""
        ev = self.events
        ev[self._lookup_event] += 1
        for dev in self._look_up(addr, length)[2]:
            ev["kvm.bus.probe"] += 1
            v = dev.read(addr, length)
            if v is not None:
                return v & ((1 << (8 * length)) - 1) if length else v
        return None


class KvmIoBuses:
    """``kvm->buses[]``: one :class:`KvmIoBus` per ``enum kvm_bus``, sharing one counter
    (``buses`` by member; an exit finds its bus by the member's number, as the kernel's
    array does: hashing an enum member costs more than the look-up it serves)."""

    def __init__(self, events: Counter | None = None):
        self.events: Counter = events if events is not None else Counter()
        self.buses = {b: KvmIoBus(b, self.events) for b in KvmBus}
        self._array = [self.buses[b] for b in sorted(KvmBus)]

    def __getitem__(self, bus: KvmBus) -> KvmIoBus:
        return self._array[bus]

    def write(self, bus: KvmBus, addr: int, length: int, value: int | None) -> bool:
        """``kvm_io_bus_write(vcpu, bus, addr, len, val)``; True means it returned 0."""
        return self._array[bus].write(addr & _U64, length, value)

    def read(self, bus: KvmBus, addr: int, length: int) -> int | None:
        """``kvm_io_bus_read``; None means -EOPNOTSUPP (nobody took it)."""
        return self._array[bus].read(addr & _U64, length)
