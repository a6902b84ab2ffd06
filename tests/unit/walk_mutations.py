"""Helpers shared by the processor property tests (tests/unit/test_vmx_property.py and
test_svm_property.py): flip one bit of a present paging-structure entry, the guest's or the
second level's (EPT or nested), skipping paths that do not exist."""

from __future__ import annotations

from fastmmio.sim.vmx.errors import HostMemoryError
from fastmmio.sim.vmx.testbed import Testbed
from fastmmio.x86.bits import LayoutError


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
