"""Segment registers and descriptors (x86 formats, shared by the guest builder and the backends).

:class:`Segment` is a segment register's hidden part as KVM's ``struct kvm_segment`` holds it;
:func:`descriptor` encodes a code/data descriptor (Intel SDM Vol. 3A 3.4.5 "Segment
Descriptors", Figure 3-8; 5.2.1 for the L flag of a 64-bit code segment) and
:func:`tss_descriptor` the 16-byte 64-bit TSS descriptor (7.2.3 "TSS Descriptor in 64-bit
mode", Figure 7-4: system type 9 = available 64-bit TSS, 0xB once busy).
"""

from __future__ import annotations

from dataclasses import dataclass

TYPE_CODE_XR_A = 0xB  # execute/read, accessed
TYPE_DATA_RW_A = 0x3  # read/write, accessed
TYPE_TSS64_AVAIL = 0x9
TYPE_TSS64_BUSY = 0xB


@dataclass(frozen=True)
class Segment:
    """A segment register's hidden state, as KVM's ``struct kvm_segment`` holds it."""

    selector: int
    base: int = 0
    limit: int = 0xFFFF_FFFF
    type: int = 0  # 4-bit type field (e.g. 0xB execute/read accessed code, 0x3 r/w accessed data)
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1  # 1 = code/data, 0 = system (TSS, LDT)
    l: int = 0  # 64-bit code segment
    g: int = 1
    avl: int = 0
    unusable: int = 0


def descriptor(seg: Segment) -> int:
    """Encode a code/data segment as the 8-byte descriptor of SDM Figure 3-8."""
    limit = seg.limit >> 12 if seg.g else seg.limit
    d = limit & 0xFFFF
    d |= (seg.base & 0xFFFFFF) << 16
    d |= (seg.type & 0xF) << 40
    d |= (seg.s & 1) << 44
    d |= (seg.dpl & 3) << 45
    d |= (seg.present & 1) << 47
    d |= ((limit >> 16) & 0xF) << 48
    d |= (seg.avl & 1) << 52
    d |= (seg.l & 1) << 53
    d |= (seg.db & 1) << 54
    d |= (seg.g & 1) << 55
    d |= ((seg.base >> 24) & 0xFF) << 56
    return d


def tss_descriptor(base: int, limit: int, busy: bool = True) -> tuple[int, int]:
    """The 16-byte 64-bit TSS descriptor of SDM Figure 7-4, as two qwords."""
    seg = Segment(
        selector=0, base=base & 0xFFFF_FFFF, limit=limit,
        type=TYPE_TSS64_BUSY if busy else TYPE_TSS64_AVAIL, dpl=0, db=0, s=0, l=0, g=0,
    )
    return descriptor(seg), (base >> 32) & 0xFFFF_FFFF
