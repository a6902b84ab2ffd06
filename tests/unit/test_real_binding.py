"""The ctypes binding against linux/kvm.h and asm/kvm.h (x86-64).

Two layers: fixed values read from the uapi headers (run anywhere), and, where a C compiler
and the headers are installed, a C program compiled against the headers that prints every
``sizeof``/``offsetof``/ioctl number the binding declares, compared one by one.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from fastmmio.real import binding as B

# (ctypes class, C type, fields to check; a dotted name reaches into a nested member)
STRUCTS = [
    (B.kvm_userspace_memory_region, "struct kvm_userspace_memory_region",
     ["slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr"]),
    (B.kvm_regs, "struct kvm_regs", ["rax", "rbx", "rsp", "r8", "r15", "rip", "rflags"]),
    (B.kvm_segment, "struct kvm_segment",
     ["base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl",
      "unusable", "padding"]),
    (B.kvm_dtable, "struct kvm_dtable", ["base", "limit", "padding"]),
    (B.kvm_sregs, "struct kvm_sregs",
     ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt", "gdt", "idt", "cr0", "cr2", "cr3", "cr4",
      "cr8", "efer", "apic_base", "interrupt_bitmap"]),
    (B.kvm_cpuid_entry2, "struct kvm_cpuid_entry2",
     ["function", "index", "flags", "eax", "ebx", "ecx", "edx", "padding"]),
    (B.kvm_cpuid2, "struct kvm_cpuid2", ["nent", "padding"]),
    (B.kvm_run, "struct kvm_run",
     ["request_interrupt_window", "immediate_exit", "exit_reason",
      "ready_for_interrupt_injection", "if_flag", "flags", "cr8", "apic_base",
      "hw.hardware_exit_reason", "fail_entry.hardware_entry_failure_reason", "fail_entry.cpu",
      "ex.exception", "ex.error_code",
      "io.direction", "io.size", "io.port", "io.count", "io.data_offset",
      "mmio.phys_addr", "mmio.data", "mmio.len", "mmio.is_write",
      "internal.suberror", "internal.ndata", "internal.data",
      "emulation_failure.flags", "emulation_failure.insn_size", "emulation_failure.insn_bytes",
      "system_event.type", "system_event.ndata",
      "kvm_valid_regs", "kvm_dirty_regs", "s"]),
    (B.kvm_ioeventfd, "struct kvm_ioeventfd", ["datamatch", "addr", "len", "fd", "flags", "pad"]),
    (B.kvm_coalesced_mmio_zone, "struct kvm_coalesced_mmio_zone", ["addr", "size", "pio"]),
    (B.kvm_coalesced_mmio, "struct kvm_coalesced_mmio", ["phys_addr", "len", "pio", "data"]),
    (B.kvm_coalesced_mmio_ring, "struct kvm_coalesced_mmio_ring", ["first", "last"]),
    (B.kvm_stats_header, "struct kvm_stats_header",
     ["flags", "name_size", "num_desc", "id_offset", "desc_offset", "data_offset"]),
    (B.kvm_stats_desc, "struct kvm_stats_desc", ["flags", "exponent", "size", "offset", "bucket_size"]),
    (B.kvm_signal_mask, "struct kvm_signal_mask", ["len", "sigset"]),
]  # fmt: skip

IOCTLS = [
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION",
    "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR", "KVM_REGISTER_COALESCED_MMIO",
    "KVM_UNREGISTER_COALESCED_MMIO", "KVM_IOEVENTFD", "KVM_GET_STATS_FD", "KVM_RUN",
    "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_SET_CPUID2",
    "KVM_GET_TSC_KHZ", "KVM_SET_SIGNAL_MASK",
]  # fmt: skip

CONSTANTS = [
    "KVM_API_VERSION", "KVM_MEM_READONLY", "KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_EXIT_SHUTDOWN",
    "KVM_EXIT_FAIL_ENTRY", "KVM_EXIT_INTR", "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_HLT",
    "KVM_EXIT_IO_OUT", "KVM_IOEVENTFD_FLAG_DATAMATCH", "KVM_IOEVENTFD_FLAG_PIO",
    "KVM_IOEVENTFD_FLAG_DEASSIGN", "KVM_IOEVENTFD_VALID_FLAG_MASK",
    "KVM_COALESCED_MMIO_PAGE_OFFSET", "KVM_PIO_PAGE_OFFSET", "KVM_CAP_READONLY_MEM",
    "KVM_CAP_IOEVENTFD", "KVM_CAP_IOEVENTFD_NO_LENGTH", "KVM_CAP_IOEVENTFD_ANY_LENGTH",
    "KVM_CAP_COALESCED_MMIO", "KVM_CAP_COALESCED_PIO", "KVM_CAP_IMMEDIATE_EXIT",
    "KVM_CAP_BINARY_STATS_FD", "KVM_CAP_GET_TSC_KHZ", "KVM_STATS_TYPE_MASK",
    "KVM_STATS_UNIT_MASK",
]  # fmt: skip


def _field_type(cls: type, name: str) -> type:
    fields = dict(cls._fields_)
    if name in fields:
        return fields[name]
    for anon in getattr(cls, "_anonymous_", ()):  # a member of an anonymous union
        try:
            return _field_type(fields[anon], name)
        except KeyError:
            continue
    raise KeyError(f"{cls.__name__} has no field {name}")


def _offset(cls: type, dotted: str) -> int:
    """Byte offset of a (dotted) field; ctypes folds anonymous members into the outer class."""
    off = 0
    for part in dotted.split("."):
        off += getattr(cls, part).offset
        cls = _field_type(cls, part)
    return off


# Structs ending in a flexible array: the binding inlines that many bytes of it.
FLEX_INLINE = {B.kvm_signal_mask: 8}


def test_fixed_header_values():
    """Values from linux/kvm.h and asm/kvm.h (x86-64) that the run loop relies on."""
    assert B.KVM_GET_API_VERSION == 0xAE00
    assert B.KVM_CREATE_VM == 0xAE01
    assert B.KVM_RUN == 0xAE80
    assert B.KVM_GET_REGS == 0x8090AE81  # _IOR, sizeof(struct kvm_regs) == 0x90
    assert B.KVM_SET_SREGS == 0x4138AE84  # _IOW, sizeof(struct kvm_sregs) == 0x138
    assert B.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert B.KVM_IOEVENTFD == 0x4040AE79
    assert B.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert B.KVM_SET_CPUID2 == 0x4008AE90
    assert B.KVM_GET_STATS_FD == 0xAECE
    assert ctypes.sizeof(B.kvm_regs) == 144
    assert ctypes.sizeof(B.kvm_segment) == 24
    assert ctypes.sizeof(B.kvm_sregs) == 312
    assert ctypes.sizeof(B.kvm_ioeventfd) == 64
    assert ctypes.sizeof(B.kvm_coalesced_mmio) == 24
    assert ctypes.sizeof(B.kvm_run) == 2352
    assert B.kvm_run.u.offset == 32
    assert _offset(B.kvm_run, "io.data_offset") == 40
    assert _offset(B.kvm_run, "mmio.data") == 40
    assert B.coalesced_max_entries(4096) == 170  # KVM_COALESCED_MMIO_MAX with 4 KiB pages


def test_ioctl_encoding_helpers():
    """asm-generic/ioctl.h: dir in bits 31-30, size 29-16, type 15-8, nr 7-0."""
    assert B._IO(0xAE, 0x80) == 0xAE80
    assert B._IOR(0xAE, 1, ctypes.c_uint64) == (2 << 30) | (8 << 16) | 0xAE01
    assert B._IOW(0xAE, 1, ctypes.c_uint32) == (1 << 30) | (4 << 16) | 0xAE01
    assert B._IOWR(0xAE, 1, ctypes.c_uint16) == (3 << 30) | (2 << 16) | 0xAE01


def _header_available() -> str | None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        return "no C compiler"
    for candidate in ("/usr/include/linux/kvm.h",):
        if not Path(candidate).exists():
            return "linux/kvm.h not installed"
    return None


@pytest.fixture(scope="module")
def header_values(tmp_path_factory) -> dict[str, int]:
    why = _header_available()
    if why:
        pytest.skip(f"cannot compile against the kernel headers: {why}")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void){"]
    for cls, ctype, fields in STRUCTS:
        lines.append(f'printf("sizeof {cls.__name__} %zu\\n", sizeof({ctype}));')
        for f in fields:
            lines.append(f'printf("offsetof {cls.__name__}.{f} %zu\\n", offsetof({ctype}, {f}));')
    for name in IOCTLS + CONSTANTS:
        lines.append(f'printf("value {name} %llu\\n", (unsigned long long)({name}));')
    lines.append("return 0;}")
    d = tmp_path_factory.mktemp("kvmh")
    src, exe = d / "h.c", d / "h"
    src.write_text("\n".join(lines))
    cc = shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=10).stdout
    values = {}
    for line in out.splitlines():
        kind, key, value = line.split()
        values[f"{kind} {key}"] = int(value)
    return values


@pytest.mark.parametrize("cls,ctype,fields", STRUCTS, ids=[s[0].__name__ for s in STRUCTS])
def test_struct_layout_matches_header(header_values, cls, ctype, fields):
    """sizeof and every offsetof of the binding equal the compiled uapi header's."""
    inline = FLEX_INLINE.get(cls, 0)
    assert ctypes.sizeof(cls) - inline == header_values[f"sizeof {cls.__name__}"], f"sizeof({ctype})"
    for f in fields:
        assert _offset(cls, f) == header_values[f"offsetof {cls.__name__}.{f}"], f"offsetof({ctype}, {f})"


@pytest.mark.parametrize("name", IOCTLS + CONSTANTS)
def test_ioctl_numbers_and_constants_match_header(header_values, name):
    assert getattr(B, name) == header_values[f"value {name}"], name


def test_cpuid2_buffer_holds_entries():
    buf = B.cpuid2_buffer(3)
    assert buf.nent == 3
    assert ctypes.sizeof(buf) == ctypes.sizeof(B.kvm_cpuid2) + 3 * ctypes.sizeof(B.kvm_cpuid_entry2)


def test_ioctl_raises_oserror_with_name():
    """The libc path reports errno and the ioctl's name (EBADF on a closed fd)."""
    with pytest.raises(OSError) as info:
        B.ioctl(-1, B.KVM_GET_API_VERSION)
    assert "KVM_GET_API_VERSION" in str(info.value)
