"""Helpers shared by the processor property tests (tests/unit/test_vmx_property.py and
test_svm_property.py): flip one bit of a present paging-structure entry, the guest's or the
second level's (EPT or nested), skipping paths that do not exist."""

from __future__ import annotations

from fastmmio.sim.vmx.errors import HostMemoryError
from fastmmio.sim.vmx.testbed import Testbed
from fastmmio.x86.bits import LayoutError

# Linear pages that share upper levels in every combination: PML4 index 1 or 255, PDPT
# index 0 or 1, PD index 0 or 1, PT index 0..2; the guest-physical pages they map; and the
# guest-entry bits a mutation flips (present, R/W, U/S, A, D, PS, G, XD, a reserved bit).
PAGES = [(i4 << 39) | (i3 << 30) | (i2 << 21) | (i1 << 12)
         for i4 in (1, 255) for i3 in (0, 1) for i2 in (0, 1) for i1 in (0, 1, 2)]
DATA_GPAS = [0x100000 + i * 0x1000 for i in range(4)] + [0x300000, 0x301000]
GUEST_BITS = [0, 1, 2, 5, 6, 7, 8, 63, 51]


def flip_guest_bit(tb: Testbed, la: int, level: int, bit: int) -> None:
    """Flip ``bit`` of the present guest entry at ``level`` for ``la`` (if it exists in RAM)."""
    try:
        ea = tb.guest.entry_address(la, level)
    except (HostMemoryError, LayoutError):
        return
    if ea is not None and 0 <= ea < tb.ram_size:
        v = tb.read_gpa_u64(ea)
        if v & 1:
            tb.write_gpa_u64(ea, v ^ (1 << bit))


def flip_second_level_bit(tb: Testbed, gpa: int, level: int, bit: int,
                          present_mask: int) -> None:
    """Flip ``bit`` of the present second-level entry (EPT: ``present_mask`` 7; nested: 1)
    at ``level`` for ``gpa`` (if it exists)."""
    try:
        ea = tb.ept.entry_address(gpa, level)
    except (HostMemoryError, LayoutError):
        return
    if ea is not None and tb.memory.is_backed(ea):
        v = tb.memory.read_u64(ea)
        if v & present_mask:
            tb.memory.write_u64(ea, v ^ (1 << bit))


def apply_mutations(tb: Testbed, mutations, second_bits: list[int], present_mask: int) -> None:
    """Apply drawn ``(kind, page, level, bit index)`` mutations: a guest entry of a page of
    :data:`PAGES`, or a second-level entry of a page of :data:`DATA_GPAS`."""
    for kind, page, level, bit_i in mutations:
        if kind == "guest":
            flip_guest_bit(tb, PAGES[page], level, GUEST_BITS[bit_i % len(GUEST_BITS)])
        else:
            flip_second_level_bit(tb, DATA_GPAS[page % len(DATA_GPAS)], level,
                                  second_bits[bit_i % len(second_bits)], present_mask)
