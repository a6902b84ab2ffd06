"""GDT and 64-bit TSS: the descriptors a long-mode guest at CPL0 or CPL3 needs.

The descriptor formats are :mod:`fastmmio.x86.segments`'; the TSS is SDM Vol. 3A 7.7 "Task
Management in 64-bit Mode" (Figure 7-11, the 104-byte TSS).

The selectors follow the SYSCALL/SYSRET layout (kernel CS, kernel SS, user SS, user CS), so a
later program could use STAR without reordering.
"""

from __future__ import annotations

import struct

from fastmmio import layout
from fastmmio.x86.segments import (  # noqa: F401 - the descriptor types are this module's API too
    TYPE_CODE_XR_A,
    TYPE_DATA_RW_A,
    TYPE_TSS64_AVAIL,
    TYPE_TSS64_BUSY,
    Segment,
    descriptor,
    tss_descriptor,
)

SEL_NULL = 0x00
SEL_KERNEL_CODE = 0x08
SEL_KERNEL_DATA = 0x10
SEL_USER_DATA = 0x18 | 3
SEL_USER_CODE = 0x20 | 3
SEL_TSS = 0x28

TSS_SIZE = 104  # 64-bit TSS, SDM Figure 7-11
IO_BITMAP_OFFSET = TSS_SIZE  # the I/O permission bitmap follows the TSS proper
IO_BITMAP_SIZE = 0x10000 // 8  # one bit per port, 0 = allowed
TSS_LIMIT = IO_BITMAP_OFFSET + IO_BITMAP_SIZE  # covers the bitmap and its 0xFF terminator byte
KERNEL_STACK_TOP = layout.STACK_TOP - 0x800  # RSP0: used only if the guest ever entered CPL0



def code_segment(dpl: int) -> Segment:
    """A 64-bit code segment (L=1, D=0: SDM 5.2.1) with the given DPL."""
    sel = SEL_USER_CODE if dpl == 3 else SEL_KERNEL_CODE
    return Segment(selector=sel, type=TYPE_CODE_XR_A, dpl=dpl, db=0, s=1, l=1, g=1)


def data_segment(dpl: int) -> Segment:
    """A flat read/write data segment (also used for SS, whose DPL must equal CPL)."""
    sel = SEL_USER_DATA if dpl == 3 else SEL_KERNEL_DATA
    return Segment(selector=sel, type=TYPE_DATA_RW_A, dpl=dpl, db=1, s=1, l=0, g=1)


def tss_segment() -> Segment:
    """TR's hidden state: the busy 64-bit TSS (a VM entry requires type 11, SDM 26.3.1.2)."""
    return Segment(
        selector=SEL_TSS, base=layout.TSS_GPA, limit=TSS_LIMIT, type=TYPE_TSS64_BUSY,
        dpl=0, db=0, s=0, l=0, g=0,
    )


def ldt_segment() -> Segment:
    """LDTR: null and unusable."""
    return Segment(selector=0, base=0, limit=0, type=0x2, present=0, s=0, g=0, unusable=1)


def build_gdt() -> bytes:
    """Null, kernel code64, kernel data, user data, user code64 (DPL3), 64-bit TSS."""
    entries = [
        0,
        descriptor(code_segment(0)),
        descriptor(data_segment(0)),
        descriptor(data_segment(3)),
        descriptor(code_segment(3)),
        *tss_descriptor(layout.TSS_GPA, TSS_LIMIT),
    ]
    return struct.pack(f"<{len(entries)}Q", *entries)


def build_tss() -> bytes:
    """A 64-bit TSS (RSP0 set, no IST) followed by an I/O permission bitmap that allows every
    port, and the all-ones byte that must follow the bitmap (SDM Vol. 1 18.5.2 "I/O
    Permission Bit Map").

    On bare metal and VMX, RFLAGS.IOPL=3 alone lets CPL3 code do port I/O (Vol. 1 18.5.1) and
    the bitmap is never read. PVM runs the guest with the hardware IOPL at 0; the #GP goes to
    KVM's emulator, which (measured on this project's host) refused IN/OUT at CPL3 until the
    TSS carried a bitmap allowing the port, as ``emulator_io_port_access_allowed()`` reads it.
    """
    tss = bytearray(TSS_LIMIT + 1)
    struct.pack_into("<Q", tss, 4, KERNEL_STACK_TOP)  # RSP0
    struct.pack_into("<H", tss, 102, IO_BITMAP_OFFSET)  # I/O map base address
    tss[TSS_LIMIT] = 0xFF  # terminator: the processor may read one byte past the last port
    return bytes(tss)
