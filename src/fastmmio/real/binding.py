"""Binding layer: the structs and ioctls of ``linux/kvm.h`` and ``asm/kvm.h`` (x86-64), in ctypes.

One ctypes structure per uapi struct the tool uses, laid out exactly as the header declares it
(``tests/unit/test_real_binding.py`` compiles the header and compares every size and offset),
ioctl numbers derived from ``_IO``/``_IOR``/``_IOW``/``_IOWR`` as ``asm-generic/ioctl.h`` defines
them, and one small function per ioctl. Nothing here keeps state: the object layer
(:mod:`fastmmio.real.objects`) owns file descriptors and mappings.

Two calling paths:

* :func:`ioctl` goes through libc's ``ioctl(2)`` with ctypes, passing the argument as an
  unsigned long or a pointer. ``fcntl.ioctl`` would pass a Python int as a *signed C int*
  (Modules/fcntlmodule.c), which truncates 64-bit arguments such as a KVM_SET_TSS_ADDR address.
* :func:`kvm_run` calls ``ioctl(vcpu_fd, KVM_RUN, 0)`` the same way: ctypes releases the GIL for
  the call and does not retry on EINTR (unlike PEP 475 wrappers), so a watchdog thread can
  interrupt a guest that never exits with a signal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os

from fastmmio.kvmabi import (  # noqa: F401 - part of the ioctl's ABI, named here too
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_DEASSIGN,
    KVM_IOEVENTFD_FLAG_PIO,
    KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY,
    KVM_IOEVENTFD_VALID_FLAG_MASK,
)

# --------------------------------------------------------------------------------------------
# asm-generic/ioctl.h
# --------------------------------------------------------------------------------------------

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    assert 0 <= size < (1 << _IOC_SIZEBITS)
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, ctype: type) -> int:
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(ctype))


def _IOW(type_: int, nr: int, ctype: type) -> int:
    return _IOC(_IOC_WRITE, type_, nr, ctypes.sizeof(ctype))


def _IOWR(type_: int, nr: int, ctype: type) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(ctype))


KVMIO = 0xAE

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
s16 = ctypes.c_int16
s32 = ctypes.c_int32

# --------------------------------------------------------------------------------------------
# Structures (linux/kvm.h, asm/kvm.h for x86)
# --------------------------------------------------------------------------------------------


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0


class kvm_cpuid2(ctypes.Structure):
    """Header of ``struct kvm_cpuid2``; the flexible ``entries[]`` follow (see :func:`cpuid2_buffer`)."""

    _fields_ = [("nent", u32), ("padding", u32)]


def cpuid2_buffer(nent: int) -> ctypes.Structure:
    """A ``struct kvm_cpuid2`` with room for ``nent`` entries, ``nent`` already set."""

    class _kvm_cpuid2_n(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * nent)]

    buf = _kvm_cpuid2_n()
    buf.nent = nent
    return buf


# ---- struct kvm_run and its exit unions ----------------------------------------------------

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class _kvm_run_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class _kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _kvm_run_ex(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _kvm_run_io(ctypes.Structure):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),  # relative to the start of kvm_run
    ]


class _kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _kvm_run_emulation_failure(ctypes.Structure):
    _fields_ = [
        ("suberror", u32),
        ("ndata", u32),
        ("flags", u64),
        ("insn_size", u8),
        ("insn_bytes", u8 * 15),
    ]


class _kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("hw", _kvm_run_hw),
        ("fail_entry", _kvm_run_fail_entry),
        ("ex", _kvm_run_ex),
        ("io", _kvm_run_io),
        ("mmio", _kvm_run_mmio),
        ("internal", _kvm_run_internal),
        ("emulation_failure", _kvm_run_emulation_failure),
        ("system_event", _kvm_run_system_event),
        ("padding", ctypes.c_char * 256),
    ]


SYNC_REGS_SIZE_BYTES = 2048


class kvm_run(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("u", _kvm_run_exit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", ctypes.c_char * SYNC_REGS_SIZE_BYTES),
    ]


# Exit reasons (linux/kvm.h), as a table: value -> name.
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_NOTIFY = 37

EXIT_REASON_NAMES = {
    0: "KVM_EXIT_UNKNOWN", 1: "KVM_EXIT_EXCEPTION", 2: "KVM_EXIT_IO", 3: "KVM_EXIT_HYPERCALL",
    4: "KVM_EXIT_DEBUG", 5: "KVM_EXIT_HLT", 6: "KVM_EXIT_MMIO", 7: "KVM_EXIT_IRQ_WINDOW_OPEN",
    8: "KVM_EXIT_SHUTDOWN", 9: "KVM_EXIT_FAIL_ENTRY", 10: "KVM_EXIT_INTR", 11: "KVM_EXIT_SET_TPR",
    12: "KVM_EXIT_TPR_ACCESS", 16: "KVM_EXIT_NMI", 17: "KVM_EXIT_INTERNAL_ERROR",
    21: "KVM_EXIT_WATCHDOG", 24: "KVM_EXIT_SYSTEM_EVENT", 26: "KVM_EXIT_IOAPIC_EOI",
    27: "KVM_EXIT_HYPERV", 29: "KVM_EXIT_X86_RDMSR", 30: "KVM_EXIT_X86_WRMSR",
    31: "KVM_EXIT_DIRTY_RING_FULL", 32: "KVM_EXIT_AP_RESET_HOLD", 33: "KVM_EXIT_X86_BUS_LOCK",
    34: "KVM_EXIT_XEN", 37: "KVM_EXIT_NOTIFY",
}  # fmt: skip

# KVM_EXIT_INTERNAL_ERROR sub-errors
INTERNAL_ERROR_NAMES = {
    1: "KVM_INTERNAL_ERROR_EMULATION",
    2: "KVM_INTERNAL_ERROR_SIMUL_EX",
    3: "KVM_INTERNAL_ERROR_DELIVERY_EV",
    4: "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON",
}
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

# ---- ioeventfd, coalesced MMIO ---------------------------------------------------------------


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


# KVM_IOEVENTFD_FLAG_* and their rules: imported from fastmmio.kvmabi at the top.


class kvm_coalesced_mmio_zone(ctypes.Structure):
    _fields_ = [("addr", u64), ("size", u32), ("pio", u32)]  # pio shares a union with pad


class kvm_coalesced_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("len", u32), ("pio", u32), ("data", u8 * 8)]


class kvm_coalesced_mmio_ring(ctypes.Structure):
    """Header of the ring; ``coalesced_mmio[]`` entries follow it (see :func:`coalesced_max_entries`)."""

    _fields_ = [("first", u32), ("last", u32)]


KVM_COALESCED_MMIO_PAGE_OFFSET = 2  # asm/kvm.h (x86): page index of the ring in the vCPU mmap
KVM_PIO_PAGE_OFFSET = 1


def coalesced_max_entries(page_size: int) -> int:
    """KVM_COALESCED_MMIO_MAX: how many entries fit in one page after the ring header."""
    return (page_size - ctypes.sizeof(kvm_coalesced_mmio_ring)) // ctypes.sizeof(kvm_coalesced_mmio)


# ---- binary statistics -------------------------------------------------------------------------


class kvm_stats_header(ctypes.Structure):
    _fields_ = [
        ("flags", u32),
        ("name_size", u32),
        ("num_desc", u32),
        ("id_offset", u32),
        ("desc_offset", u32),
        ("data_offset", u32),
    ]


class kvm_stats_desc(ctypes.Structure):
    """Fixed part of a descriptor; ``name[name_size]`` follows it in the stats file."""

    _fields_ = [
        ("flags", u32),
        ("exponent", s16),
        ("size", u16),
        ("offset", u32),
        ("bucket_size", u32),
    ]


KVM_STATS_TYPE_SHIFT = 0
KVM_STATS_TYPE_MASK = 0xF << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_CUMULATIVE = 0x0
KVM_STATS_TYPE_INSTANT = 0x1
KVM_STATS_TYPE_PEAK = 0x2
KVM_STATS_TYPE_LINEAR_HIST = 0x3
KVM_STATS_TYPE_LOG_HIST = 0x4
KVM_STATS_UNIT_SHIFT = 4
KVM_STATS_UNIT_MASK = 0xF << KVM_STATS_UNIT_SHIFT
KVM_STATS_BASE_SHIFT = 8
KVM_STATS_BASE_MASK = 0xF << KVM_STATS_BASE_SHIFT

# --------------------------------------------------------------------------------------------
# Capabilities (linux/kvm.h)
# --------------------------------------------------------------------------------------------

KVM_API_VERSION = 12

KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_IOEVENTFD = 36
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IOEVENTFD_NO_LENGTH = 100
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_BINARY_STATS_FD = 203

CAP_NAMES = {
    KVM_CAP_IRQCHIP: "KVM_CAP_IRQCHIP",
    KVM_CAP_USER_MEMORY: "KVM_CAP_USER_MEMORY",
    KVM_CAP_SET_TSS_ADDR: "KVM_CAP_SET_TSS_ADDR",
    KVM_CAP_EXT_CPUID: "KVM_CAP_EXT_CPUID",
    KVM_CAP_NR_VCPUS: "KVM_CAP_NR_VCPUS",
    KVM_CAP_NR_MEMSLOTS: "KVM_CAP_NR_MEMSLOTS",
    KVM_CAP_COALESCED_MMIO: "KVM_CAP_COALESCED_MMIO",
    KVM_CAP_SET_IDENTITY_MAP_ADDR: "KVM_CAP_SET_IDENTITY_MAP_ADDR",
    KVM_CAP_IOEVENTFD: "KVM_CAP_IOEVENTFD",
    KVM_CAP_GET_TSC_KHZ: "KVM_CAP_GET_TSC_KHZ",
    KVM_CAP_MAX_VCPUS: "KVM_CAP_MAX_VCPUS",
    KVM_CAP_READONLY_MEM: "KVM_CAP_READONLY_MEM",
    KVM_CAP_IOEVENTFD_NO_LENGTH: "KVM_CAP_IOEVENTFD_NO_LENGTH",
    KVM_CAP_IOEVENTFD_ANY_LENGTH: "KVM_CAP_IOEVENTFD_ANY_LENGTH",
    KVM_CAP_IMMEDIATE_EXIT: "KVM_CAP_IMMEDIATE_EXIT",
    KVM_CAP_COALESCED_PIO: "KVM_CAP_COALESCED_PIO",
    KVM_CAP_BINARY_STATS_FD: "KVM_CAP_BINARY_STATS_FD",
}

# --------------------------------------------------------------------------------------------
# ioctl numbers
# --------------------------------------------------------------------------------------------

# /dev/kvm
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
# VM
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, u64)
KVM_REGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x67, kvm_coalesced_mmio_zone)
KVM_UNREGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x68, kvm_coalesced_mmio_zone)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, kvm_ioeventfd)
KVM_GET_STATS_FD = _IO(KVMIO, 0xCE)
# vCPU
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_SET_SIGNAL_MASK = _IOW(KVMIO, 0x8B, ctypes.c_uint32)  # struct kvm_signal_mask header (len)


class kvm_signal_mask(ctypes.Structure):
    """``struct kvm_signal_mask`` with the 8-byte kernel sigset_t inline (x86-64)."""

    _fields_ = [("len", u32), ("sigset", u8 * 8)]


# --------------------------------------------------------------------------------------------
# libc ioctl through ctypes
# --------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_ioctl_ptr = _libc.ioctl
_ioctl_ptr.restype = ctypes.c_int
_ioctl_ptr.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl_ul = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).ioctl
_ioctl_ul.restype = ctypes.c_int
_ioctl_ul.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]

_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def mmap_shared(fd: int, size: int, offset: int = 0) -> int:
    """``mmap(NULL, size, PROT_READ|PROT_WRITE, MAP_SHARED, fd, offset)`` through libc: the
    address. Unlike Python's mmap object it keeps no duplicate of ``fd`` and has no buffer
    exports that could stop :func:`munmap`; the caller must not touch views after unmapping."""
    import mmap as _m

    addr = _mmap(None, size, _m.PROT_READ | _m.PROT_WRITE, _m.MAP_SHARED, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        e = ctypes.get_errno()
        raise OSError(e, f"mmap of fd {fd}: {os.strerror(e)}")
    return addr


def munmap(addr: int, size: int) -> None:
    if _munmap(addr, size) < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"munmap: {os.strerror(e)}")


# The KVM_RUN entry point: a separate function object with fixed argtypes, called from the hot
# loop as ``run_ioctl(fd, KVM_RUN, 0)``; it returns -1 and leaves errno in ctypes.get_errno().
run_ioctl = _ioctl_ul
get_errno = ctypes.get_errno


def ioctl(fd: int, request: int, arg: int | ctypes._CData | None = 0) -> int:
    """``ioctl(fd, request, arg)``: ``arg`` is an unsigned long or a ctypes object passed by
    reference. Returns the ioctl's non-negative result; raises OSError(errno) on -1."""
    if isinstance(arg, (int, type(None))):
        ret = _ioctl_ul(fd, request, arg or 0)
    else:
        ret = _ioctl_ptr(fd, request, ctypes.addressof(arg))
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{os.strerror(e)} ({_ioctl_name(request)})")
    return ret


_IOCTL_NAMES: dict[int, str] = {}


def _ioctl_name(request: int) -> str:
    if not _IOCTL_NAMES:
        for k, v in globals().items():
            if k.startswith("KVM_") and isinstance(v, int) and (v >> _IOC_TYPESHIFT) & 0xFF == KVMIO:
                _IOCTL_NAMES.setdefault(v, k)
    return _IOCTL_NAMES.get(request, hex(request))


def errno_name(e: int) -> str:
    return _errno.errorcode.get(e, str(e))


# --------------------------------------------------------------------------------------------
# One function per ioctl
# --------------------------------------------------------------------------------------------

# /dev/kvm (system ioctls)


def get_api_version(kvm_fd: int) -> int:
    return ioctl(kvm_fd, KVM_GET_API_VERSION)


def create_vm(kvm_fd: int, machine_type: int = 0) -> int:
    return ioctl(kvm_fd, KVM_CREATE_VM, machine_type)


def check_extension(fd: int, cap: int) -> int:
    """KVM_CHECK_EXTENSION on /dev/kvm or a VM fd: 0 if absent, else a capability-defined value."""
    return ioctl(fd, KVM_CHECK_EXTENSION, cap)


def get_vcpu_mmap_size(kvm_fd: int) -> int:
    return ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE)


def get_supported_cpuid(kvm_fd: int) -> ctypes.Structure:
    """KVM_GET_SUPPORTED_CPUID, growing the buffer while the kernel answers E2BIG."""
    nent = 64
    while True:
        buf = cpuid2_buffer(nent)
        try:
            ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, buf)
        except OSError as exc:
            if exc.errno == _errno.E2BIG and nent < 4096:
                nent *= 2
                continue
            raise
        return buf


# VM ioctls


def create_vcpu(vm_fd: int, vcpu_id: int) -> int:
    return ioctl(vm_fd, KVM_CREATE_VCPU, vcpu_id)


def set_user_memory_region(vm_fd: int, region: kvm_userspace_memory_region) -> None:
    ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, region)


def create_irqchip(vm_fd: int) -> None:
    """KVM_CREATE_IRQCHIP (KVM_CAP_IRQCHIP): the in-kernel PIC, IOAPIC and local APICs; before
    any vCPU is created."""
    ioctl(vm_fd, KVM_CREATE_IRQCHIP)


def set_tss_addr(vm_fd: int, addr: int) -> None:
    ioctl(vm_fd, KVM_SET_TSS_ADDR, addr)


def register_coalesced_mmio(vm_fd: int, zone: kvm_coalesced_mmio_zone) -> None:
    ioctl(vm_fd, KVM_REGISTER_COALESCED_MMIO, zone)


def unregister_coalesced_mmio(vm_fd: int, zone: kvm_coalesced_mmio_zone) -> None:
    ioctl(vm_fd, KVM_UNREGISTER_COALESCED_MMIO, zone)


def ioeventfd(vm_fd: int, args: kvm_ioeventfd) -> None:
    ioctl(vm_fd, KVM_IOEVENTFD, args)


def get_stats_fd(fd: int) -> int:
    """KVM_GET_STATS_FD on a VM or vCPU fd: a new read-only fd of binary statistics."""
    return ioctl(fd, KVM_GET_STATS_FD)


# vCPU ioctls


def get_regs(vcpu_fd: int, regs: kvm_regs | None = None) -> kvm_regs:
    regs = regs if regs is not None else kvm_regs()
    ioctl(vcpu_fd, KVM_GET_REGS, regs)
    return regs


def set_regs(vcpu_fd: int, regs: kvm_regs) -> None:
    ioctl(vcpu_fd, KVM_SET_REGS, regs)


def get_sregs(vcpu_fd: int, sregs: kvm_sregs | None = None) -> kvm_sregs:
    sregs = sregs if sregs is not None else kvm_sregs()
    ioctl(vcpu_fd, KVM_GET_SREGS, sregs)
    return sregs


def set_sregs(vcpu_fd: int, sregs: kvm_sregs) -> None:
    ioctl(vcpu_fd, KVM_SET_SREGS, sregs)


def set_cpuid2(vcpu_fd: int, cpuid: ctypes.Structure) -> None:
    ioctl(vcpu_fd, KVM_SET_CPUID2, cpuid)


def get_tsc_khz(vcpu_fd: int) -> int:
    return ioctl(vcpu_fd, KVM_GET_TSC_KHZ)


def set_signal_mask(vcpu_fd: int, sigset: int) -> None:
    """KVM_SET_SIGNAL_MASK: the signal mask in force while this vCPU is inside KVM_RUN
    (``sigset`` is a bit mask, bit n-1 for signal n, as the kernel's sigset_t)."""
    arg = kvm_signal_mask(len=8)
    arg.sigset[:] = list(sigset.to_bytes(8, "little"))
    ioctl(vcpu_fd, KVM_SET_SIGNAL_MASK, arg)


def run(vcpu_fd: int) -> int:
    """One KVM_RUN. Returns 0, or -errno (EINTR when a signal or immediate_exit stopped it)."""
    if run_ioctl(vcpu_fd, KVM_RUN, 0) < 0:
        return -ctypes.get_errno()
    return 0
