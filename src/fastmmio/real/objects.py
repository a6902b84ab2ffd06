"""Object layer over :mod:`fastmmio.real.binding`: Kvm, Vm, Vcpu, MemSlot, IoEventFd.

Each object owns its file descriptors and mappings and gives them back in ``close()``, which
is idempotent and also runs from ``__exit__``. A ``Vm`` closes the vCPUs, ioeventfds, stats
files and memslot mappings it created, so closing the outermost object releases everything.

Errors a user can meet become :class:`~fastmmio.errors.HostError` (no device, no permission, a
missing capability) or :class:`~fastmmio.errors.IoEventFdError` (a registration KVM refused,
with the rule of ``kvm_assign_ioeventfd()`` / ``kvm_deassign_ioeventfd()`` it broke, worked out
from the arguments and this VM's own registrations after the kernel answered).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass

from fastmmio.errors import FastmmioError, HostError, IoEventFdError, UsageError
from fastmmio.kvmabi import (  # noqa: F401 - the rule names are part of this module's API
    RULE_BUS_FULL,
    RULE_DATAMATCH_ON_WILDCARD,
    RULE_DUPLICATE,
    RULE_FLAGS,
    RULE_LEN0_DATAMATCH,
    RULE_LENGTH,
    RULE_LENGTH0_COLLISION,
    RULE_NOT_EVENTFD,
    RULE_UNKNOWN_DEASSIGN,
    RULE_WILDCARD_ON_DATAMATCH,
    RULE_WRAP,
    IoEventFdKey,
    assign_check,
    collides,
    collision_rule,
    ioeventfd_bus_from_flags,
    ioeventfd_flags,
)
from fastmmio.real import binding as B
from fastmmio.real.stats import KvmStats

PAGE_SIZE = mmap.PAGESIZE


def _host_error_for_open(path: str, exc: OSError) -> HostError:
    reasons = {
        errno.ENOENT: "no such device: KVM is not available here (kvm module not loaded, or a "
        "container without the device)",
        errno.EACCES: "permission denied: run as root or join the group that owns the device "
        "(usually 'kvm')",
        errno.EPERM: "operation not permitted: run as root or join the group that owns it",
        errno.ENXIO: "the device exists but no KVM module serves it (kvm_intel/kvm_amd/kvm_pvm "
        "not loaded?)",
        errno.ENODEV: "the device exists but no KVM module serves it",
        errno.ENOTDIR: "no such device path",
    }
    why = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return HostError(f"cannot open {path} ({B.errno_name(exc.errno or 0)}): {why}")


class Kvm:
    """An open KVM device (``/dev/kvm`` by default): API version, capabilities, CPUID."""

    def __init__(self, device: str = "/dev/kvm"):
        self.device = device
        self.fd = -1
        try:
            self.fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _host_error_for_open(device, exc) from None
        try:
            version = B.get_api_version(self.fd)
        except OSError as exc:
            self.close()
            raise HostError(
                f"{device} is not a KVM device: KVM_GET_API_VERSION failed ({B.errno_name(exc.errno or 0)})"
            ) from None
        if version != B.KVM_API_VERSION:
            self.close()
            raise HostError(f"{device}: KVM API version {version}, this tool needs {B.KVM_API_VERSION}")
        self._mmap_size: int | None = None
        self._cpuid: ctypes.Structure | None = None

    # capabilities ------------------------------------------------------------------------

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when the capability is absent (never raises for that)."""
        self._check_open()
        try:
            return B.check_extension(self.fd, cap)
        except OSError:
            return 0

    def require(self, cap: int, why: str) -> int:
        """The capability's value, or HostError naming it and what needed it."""
        value = self.check_extension(cap)
        if not value:
            name = B.CAP_NAMES.get(cap, f"capability {cap}")
            raise HostError(f"{self.device} lacks {name}, needed for {why}")
        return value

    @property
    def vcpu_mmap_size(self) -> int:
        if self._mmap_size is None:
            self._check_open()
            self._mmap_size = B.get_vcpu_mmap_size(self.fd)
        return self._mmap_size

    def supported_cpuid(self) -> ctypes.Structure:
        """KVM_GET_SUPPORTED_CPUID (cached): what KVM_SET_CPUID2 may expose to a guest."""
        if self._cpuid is None:
            self._check_open()
            self._cpuid = B.get_supported_cpuid(self.fd)
        return self._cpuid

    def create_vm(self) -> "Vm":
        self._check_open()
        return Vm(self)

    # lifetime -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.fd < 0:
            raise FastmmioError(f"{self.device}: already closed")

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemSlot:
    """One KVM memslot backed by an anonymous private mapping (KVM_SET_USER_MEMORY_REGION)."""

    def __init__(self, vm: "Vm", slot: int, gpa: int, size: int, readonly: bool, fill: int):
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
            raise UsageError(f"memslot {slot}: GPA {gpa:#x} and size {size:#x} must be page aligned")
        self.slot, self.gpa, self.size, self.readonly = slot, gpa, size, readonly
        self.mem: mmap.mmap | None = mmap.mmap(
            -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        if fill:
            self.mem.write(bytes([fill & 0xFF]) * size)
            self.mem.seek(0)
        anchor = ctypes.c_char.from_buffer(self.mem)
        self.hva = ctypes.addressof(anchor)
        del anchor  # no exported buffer may outlive close()
        region = B.kvm_userspace_memory_region(
            slot=slot,
            flags=B.KVM_MEM_READONLY if readonly else 0,
            guest_phys_addr=gpa,
            memory_size=size,
            userspace_addr=self.hva,
        )
        try:
            B.set_user_memory_region(vm.fd, region)
        except OSError as exc:
            self.close()
            raise HostError(
                f"KVM_SET_USER_MEMORY_REGION slot {slot} GPA {gpa:#x}+{size:#x}"
                f"{' READONLY' if readonly else ''} refused ({B.errno_name(exc.errno or 0)})"
            ) from None

    def contains(self, gpa: int, size: int = 1) -> bool:
        return self.gpa <= gpa and gpa + size <= self.gpa + self.size

    def read(self, gpa: int, size: int) -> bytes:
        assert self.mem is not None
        off = gpa - self.gpa
        return self.mem[off : off + size]

    def write(self, gpa: int, data: bytes) -> None:
        """Host write into the backing memory (allowed for read-only slots too: only the guest
        is refused)."""
        assert self.mem is not None
        off = gpa - self.gpa
        self.mem[off : off + len(data)] = data

    def close(self) -> None:
        if self.mem is not None:
            mem, self.mem = self.mem, None
            mem.close()


# --------------------------------------------------------------------------------------------
# ioeventfd
# --------------------------------------------------------------------------------------------

class IoEventFd:
    """An eventfd (non-blocking) and the KVM_IOEVENTFD registration it is meant for."""

    def __init__(
        self,
        name: str,
        pio: bool,
        addr: int,
        length: int,
        datamatch: int | None = None,
        *,
        eventfd: int | None = None,
        extra_flags: int = 0,
    ):
        """``eventfd``: register an eventfd someone else owns (several registrations may share
        one eventfd, as in KVM); otherwise a new non-blocking eventfd is created and owned.
        ``extra_flags``: raw bits OR'ed into ``kvm_ioeventfd.flags`` (for testing KVM's
        refusal of unknown flags)."""
        self.name, self.pio, self.addr, self.length, self.datamatch = name, pio, addr, length, datamatch
        self.extra_flags = extra_flags
        self.owns_fd = eventfd is None
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if eventfd is None else eventfd
        self.assigned = False

    @property
    def bus(self) -> str:
        return ioeventfd_bus_from_flags(self.args().flags)

    @property
    def key(self) -> IoEventFdKey:
        """What ioeventfd_check_collision() compares."""
        return IoEventFdKey(self.bus, self.addr, self.length, self.datamatch)

    def args(self, deassign: bool = False) -> B.kvm_ioeventfd:
        flags = ioeventfd_flags(pio=self.pio, datamatch=self.datamatch is not None,
                                deassign=deassign, extra=self.extra_flags)
        return B.kvm_ioeventfd(
            datamatch=(self.datamatch or 0) & 0xFFFF_FFFF_FFFF_FFFF,
            addr=self.addr & 0xFFFF_FFFF_FFFF_FFFF,
            len=self.length & 0xFFFF_FFFF,
            fd=self.fd,
            flags=flags,
        )

    def read(self) -> int:
        """Signals since the last read (the eventfd counter, which reading resets); 0 if none."""
        if self.fd < 0:
            return 0
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def describe(self) -> str:
        kind = "PIO" if self.pio else "MMIO"
        match = "wildcard" if self.datamatch is None else f"datamatch {self.datamatch:#x}"
        return f"'{self.name}' ({kind} {self.addr:#x}, length {self.length}, {match})"

    def same_registration(self, other: "IoEventFd") -> bool:
        """What kvm_deassign_ioeventfd_idx() compares: eventfd, bus, address, length, and the
        datamatch value unless wildcard."""
        return (
            self.fd == other.fd
            and self.pio == other.pio
            and self.addr == other.addr
            and self.length == other.length
            and self.datamatch == other.datamatch
        )

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            if self.owns_fd:
                os.close(fd)

    def __enter__(self) -> "IoEventFd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def explain_ioeventfd_error(err: int, ev: IoEventFd, registered: list[IoEventFd], deassign: bool) -> str:
    """Which rule of virt/kvm/eventfd.c the kernel applied when it answered ``err``.

    The kernel has already decided; this only names the rule, checking them in the kernel's
    order (length, wrap, flags, length 0 with DATAMATCH, then the collision or the look-up)."""
    if deassign:
        if err == errno.ENOENT:
            return RULE_UNKNOWN_DEASSIGN
    elif err == errno.EINVAL:
        broken = assign_check(ev.addr, ev.length, ev.args().flags)
        if broken is not None:
            return broken[1]
    elif err == errno.EEXIST:
        for other in registered:
            if other is ev or not collides(ev.key, other.key):
                continue
            return f"{collision_rule(ev.key, other.key)}; existing {other.describe()}"
        return f"{RULE_DUPLICATE} (registered outside this VM object)"
    elif err == errno.ENOSPC:
        return RULE_BUS_FULL
    if err in (errno.EBADF, errno.EINVAL):
        return RULE_NOT_EVENTFD
    return f"refused for a reason this tool does not know ({os.strerror(err)})"


# --------------------------------------------------------------------------------------------
# VM
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoalescedZoneReg:
    addr: int
    size: int
    pio: bool


class Vm:
    """A KVM VM: memslots, ioeventfds, coalesced zones, binary stats, vCPUs."""

    def __init__(self, kvm: Kvm):
        self.kvm = kvm
        try:
            self.fd = B.create_vm(kvm.fd)
        except OSError as exc:
            raise HostError(f"KVM_CREATE_VM failed on {kvm.device} ({B.errno_name(exc.errno or 0)})") from None
        self.memslots: dict[int, MemSlot] = {}
        self.ioeventfds: list[IoEventFd] = []  # owned: closed with the VM
        self.registered: list[IoEventFd] = []  # currently assigned, in order
        self.coalesced: list[CoalescedZoneReg] = []
        self.vcpus: list[Vcpu] = []
        self._stats: KvmStats | None = None

    # memory ------------------------------------------------------------------------------

    def add_memslot(self, slot: int, gpa: int, size: int, readonly: bool = False, fill: int = 0) -> MemSlot:
        """KVM_SET_USER_MEMORY_REGION; ``readonly`` sets KVM_MEM_READONLY (KVM_CAP_READONLY_MEM)."""
        self._check_open()
        if readonly:
            self.kvm.require(B.KVM_CAP_READONLY_MEM, f"read-only memslot {slot}")
        if slot in self.memslots:
            raise UsageError(f"memslot {slot} defined twice")
        ms = MemSlot(self, slot, gpa, size, readonly, fill)
        self.memslots[slot] = ms
        return ms

    def slot_for(self, gpa: int, size: int = 1) -> MemSlot:
        for ms in self.memslots.values():
            if ms.contains(gpa, size):
                return ms
        raise UsageError(f"GPA {gpa:#x}+{size:#x} is not inside one memslot")

    def write(self, gpa: int, data: bytes) -> None:
        self.slot_for(gpa, len(data)).write(gpa, data)

    def read(self, gpa: int, size: int) -> bytes:
        return self.slot_for(gpa, size).read(gpa, size)

    # ioeventfd ---------------------------------------------------------------------------

    def assign_ioeventfd(self, ev: IoEventFd) -> IoEventFd:
        """KVM_IOEVENTFD (assign); IoEventFdError naming the rule when KVM refuses."""
        self._check_open()
        try:
            B.ioeventfd(self.fd, ev.args())
        except OSError as exc:
            e = exc.errno or 0
            raise IoEventFdError(B.errno_name(e), explain_ioeventfd_error(e, ev, self.registered, False)) from None
        ev.assigned = True
        self.registered.append(ev)
        if ev not in self.ioeventfds:
            self.ioeventfds.append(ev)
        return ev

    def deassign_ioeventfd(self, ev: IoEventFd) -> None:
        """KVM_IOEVENTFD with KVM_IOEVENTFD_FLAG_DEASSIGN; the eventfd stays open (close it, or
        let the VM close it)."""
        self._check_open()
        try:
            B.ioeventfd(self.fd, ev.args(deassign=True))
        except OSError as exc:
            e = exc.errno or 0
            raise IoEventFdError(B.errno_name(e), explain_ioeventfd_error(e, ev, self.registered, True)) from None
        for i, reg in enumerate(self.registered):
            if reg.same_registration(ev):
                reg.assigned = False
                del self.registered[i]
                break
        ev.assigned = False

    def add_ioeventfd(
        self, name: str, pio: bool, addr: int, length: int, datamatch: int | None = None
    ) -> IoEventFd:
        """Create an eventfd and register it; the VM owns it (closed with the VM)."""
        self.kvm.require(B.KVM_CAP_IOEVENTFD, f"ioeventfd '{name}'")
        if length == 0 and not self.kvm.check_extension(B.KVM_CAP_IOEVENTFD_NO_LENGTH):
            raise HostError(f"{self.kvm.device} lacks KVM_CAP_IOEVENTFD_NO_LENGTH, needed for length-0 ioeventfd '{name}'")
        ev = IoEventFd(name, pio, addr, length, datamatch)
        try:
            self.assign_ioeventfd(ev)
        except BaseException:
            ev.close()
            raise
        return ev

    # coalesced MMIO / PIO -----------------------------------------------------------------

    def register_coalesced(self, addr: int, size: int, pio: bool = False) -> None:
        """KVM_REGISTER_COALESCED_MMIO (KVM_CAP_COALESCED_MMIO; a PIO zone needs KVM_CAP_COALESCED_PIO)."""
        self._check_open()
        self.kvm.require(B.KVM_CAP_COALESCED_PIO if pio else B.KVM_CAP_COALESCED_MMIO, "a coalesced zone")
        zone = B.kvm_coalesced_mmio_zone(addr=addr, size=size, pio=1 if pio else 0)
        try:
            B.register_coalesced_mmio(self.fd, zone)
        except OSError as exc:
            raise HostError(
                f"KVM_REGISTER_COALESCED_MMIO {'PIO' if pio else 'MMIO'} {addr:#x}+{size:#x} refused "
                f"({B.errno_name(exc.errno or 0)})"
            ) from None
        self.coalesced.append(CoalescedZoneReg(addr, size, pio))

    def unregister_coalesced(self, addr: int, size: int, pio: bool = False) -> None:
        zone = B.kvm_coalesced_mmio_zone(addr=addr, size=size, pio=1 if pio else 0)
        B.unregister_coalesced_mmio(self.fd, zone)
        self.coalesced = [z for z in self.coalesced if (z.addr, z.size, z.pio) != (addr, size, pio)]

    # in-kernel irqchip ---------------------------------------------------------------------

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP (needs KVM_CAP_IRQCHIP, and no vCPU yet): the in-kernel PIC
        (on KVM_PIO_BUS at 0x20, 0xa0 and 0x4d0), IOAPIC and local APICs."""
        self._check_open()
        self.kvm.require(B.KVM_CAP_IRQCHIP, "the in-kernel irqchip")
        try:
            B.create_irqchip(self.fd)
        except OSError as exc:
            raise HostError(f"KVM_CREATE_IRQCHIP refused ({B.errno_name(exc.errno or 0)})") from None

    # stats, vCPUs --------------------------------------------------------------------------

    def stats(self) -> KvmStats | None:
        """The VM's binary statistics (KVM_GET_STATS_FD), or None without KVM_CAP_BINARY_STATS_FD."""
        self._check_open()
        if self._stats is None and self.kvm.check_extension(B.KVM_CAP_BINARY_STATS_FD):
            self._stats = KvmStats(B.get_stats_fd(self.fd))
        return self._stats

    def create_vcpu(self, vcpu_id: int = 0) -> "Vcpu":
        self._check_open()
        vcpu = Vcpu(self, vcpu_id)
        self.vcpus.append(vcpu)
        return vcpu

    def _check_open(self) -> None:
        if self.fd < 0:
            raise FastmmioError("VM already closed")

    def close(self) -> None:
        """Close vCPUs, stats, the VM fd, eventfds, then unmap guest memory. Idempotent."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        for ev in self.ioeventfds:
            ev.close()
        self.ioeventfds = []
        self.registered = []
        for ms in self.memslots.values():
            ms.close()
        self.memslots = {}

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# vCPU
# --------------------------------------------------------------------------------------------


class Vcpu:
    """A vCPU: its shared ``struct kvm_run`` mapping, registers, CPUID, KVM_RUN."""

    def __init__(self, vm: Vm, vcpu_id: int):
        self.vm = vm
        self.id = vcpu_id
        self.run_map: ctypes.Array | None = None  # the whole vCPU mapping, as c_char[size]
        self.run: B.kvm_run | None = None
        self._run_addr = 0
        self._run_size = 0
        self._stats: KvmStats | None = None
        try:
            self.fd = B.create_vcpu(vm.fd, vcpu_id)
        except OSError as exc:
            raise HostError(f"KVM_CREATE_VCPU {vcpu_id} failed ({B.errno_name(exc.errno or 0)})") from None
        try:
            size = vm.kvm.vcpu_mmap_size
            self._run_addr = B.mmap_shared(self.fd, size)
            self._run_size = size
            self.run_map = (ctypes.c_char * size).from_address(self._run_addr)
            self.run = B.kvm_run.from_address(self._run_addr)
        except BaseException:
            self.close()
            raise
        # True after KVM_RUN returned with an I/O or MMIO exit whose completion is still pending.
        self.pending_completion = False

    # registers ---------------------------------------------------------------------------

    def get_regs(self) -> B.kvm_regs:
        return B.get_regs(self.fd)

    def set_regs(self, regs: B.kvm_regs) -> None:
        """KVM_SET_REGS, after completing a pending I/O or MMIO exit (otherwise the
        completion, run at the next KVM_RUN, overwrites the registers just set)."""
        if self.pending_completion:
            self.complete_pending()
        B.set_regs(self.fd, regs)

    def get_sregs(self) -> B.kvm_sregs:
        return B.get_sregs(self.fd)

    def set_sregs(self, sregs: B.kvm_sregs) -> None:
        if self.pending_completion:
            self.complete_pending()
        B.set_sregs(self.fd, sregs)

    def complete_pending(self) -> None:
        """One KVM_RUN with immediate_exit=1: KVM finishes the pending userspace I/O (the
        ``complete_userspace_io`` callback) and returns EINTR without entering the guest."""
        assert self.run is not None
        self.run.immediate_exit = 1
        try:
            B.run(self.fd)
        finally:
            self.run.immediate_exit = 0
        self.pending_completion = False

    def set_cpuid2(self, cpuid: ctypes.Structure) -> None:
        B.set_cpuid2(self.fd, cpuid)

    def set_supported_cpuid(self) -> None:
        """KVM_SET_CPUID2 with all of KVM_GET_SUPPORTED_CPUID (needed before EFER.LME works)."""
        self.set_cpuid2(self.vm.kvm.supported_cpuid())

    def tsc_khz(self) -> int | None:
        if not self.vm.kvm.check_extension(B.KVM_CAP_GET_TSC_KHZ):
            return None
        try:
            return B.get_tsc_khz(self.fd) or None
        except OSError:
            return None

    def set_signal_mask(self, sigset: int) -> None:
        B.set_signal_mask(self.fd, sigset)

    # running -----------------------------------------------------------------------------

    def kvm_run(self) -> int:
        """One KVM_RUN: 0, or -errno (-EINTR after a signal or with immediate_exit set)."""
        return B.run(self.fd)

    @property
    def exit_reason(self) -> int:
        assert self.run is not None
        return self.run.exit_reason

    def coalesced_ring_offset(self) -> int | None:
        """Byte offset of the coalesced MMIO ring in the vCPU mapping (page 2 on x86), if mapped."""
        off = B.KVM_COALESCED_MMIO_PAGE_OFFSET * PAGE_SIZE
        if self.run_map is None or len(self.run_map) < off + PAGE_SIZE:
            return None
        return off

    def stats(self) -> KvmStats | None:
        if self._stats is None and self.vm.kvm.check_extension(B.KVM_CAP_BINARY_STATS_FD):
            self._stats = KvmStats(B.get_stats_fd(self.fd))
        return self._stats

    def close(self) -> None:
        """Unmap kvm_run, close stats and the vCPU fd. Views made from ``run``/``run_map``
        must not be used afterwards (the run loop drops its own first)."""
        self.run = None
        self.run_map = None
        if self._run_addr:
            addr, self._run_addr = self._run_addr, 0
            B.munmap(addr, self._run_size)
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        if getattr(self, "fd", -1) >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "Vcpu":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
