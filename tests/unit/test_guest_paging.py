"""Walk the guest's page tables in Python for every mapped page (SDM Vol. 3A 4.5, 4.6.1)."""

from __future__ import annotations

import struct

import pytest

from fastmmio import layout
from fastmmio.errors import UsageError
from fastmmio.guest import paging
from fastmmio.guest.build import build_image
from fastmmio.image import GuestImage
from fastmmio.guest.program import Access, AccessKind


def guest_memory(image: GuestImage):
    """A read_qword over the image's regions (everything else reads as 0, as fresh RAM)."""
    mem: dict[int, int] = {}
    for r in image.regions:
        for k, b in enumerate(r.data):
            mem[r.gpa + k] = b

    def read_qword(gpa: int) -> int:
        return int.from_bytes(bytes(mem.get(gpa + k, 0) for k in range(8)), "little")

    return read_qword


def mapped_pages():
    for r in paging.default_ranges():
        yield from ((r, p) for p in range(r.gpa, r.gpa + r.size, layout.PAGE_SIZE))


@pytest.mark.parametrize("cpl", [0, 3])
def test_every_region_page_is_identity_mapped(cpl):
    """Every page of the RAM slot, the read-only slot and the MMIO hole translates to itself,
    writable, with U/S at every level iff CPL is 3 (SDM 4.6.1: user-mode access needs U/S=1
    in every paging-structure entry of the translation)."""
    image = build_image(Access(AccessKind.NONE), cpl)
    read = guest_memory(image)
    count = 0
    for r, page in mapped_pages():
        for offset in (0, 0x7F8, 0xFFF):
            w = paging.walk(read, image.boot.cr3, page + offset)
            assert w is not None, hex(page)
            assert w.phys == page + offset
            assert w.writable  # RO-slot writes must reach the memslot, not fault in the guest
            assert w.user == (cpl == 3)
            assert all(bool(e & paging.PTE_US) == (cpl == 3) for e in w.entries)
        count += 1
    assert count == (layout.RAM_SIZE + layout.RO_SIZE + layout.MMIO_SIZE
                     + layout.NEIGHBOUR_RAM_SIZE) // layout.PAGE_SIZE - 1


def test_unmapped_addresses_do_not_translate():
    image = build_image(Access(AccessKind.NONE), 3)
    read = guest_memory(image)
    for addr in (0, 0xFFF, layout.RO_BASE + layout.RO_SIZE, layout.MMIO_BASE - 1,
                 layout.NEIGHBOUR_RAM_GPA + layout.NEIGHBOUR_RAM_SIZE, 1 << 30, 1 << 39):
        assert paging.walk(read, image.boot.cr3, addr) is None, hex(addr)


def test_flags_per_region():
    """Accessed preset everywhere, dirty preset in PTEs (SDM 4.8), PCD|PWT only for the
    MMIO hole (uncached device memory)."""
    image = build_image(Access(AccessKind.NONE), 3)
    read = guest_memory(image)
    for r, page in mapped_pages():
        w = paging.walk(read, image.boot.cr3, page)
        assert all(e & paging.PTE_A for e in w.entries)
        pte = w.entries[-1]
        assert pte & paging.PTE_D
        assert bool(pte & paging.PTE_PCD) == (r.name == "mmio-hole")
        assert bool(pte & paging.PTE_PWT) == (r.name == "mmio-hole")
        assert not any(e & paging.PTE_PS for e in w.entries[1:3])


def test_tables_fit_in_their_area_and_cover_themselves():
    tables = paging.build_page_tables(user=True)
    assert tables.base == layout.PML4_GPA
    assert layout.PML4_GPA + len(tables.data) <= layout.PAGE_TABLES_END
    assert len(tables.data) % layout.PAGE_SIZE == 0
    # Every table page is itself mapped (it lives in the RAM slot).
    read = lambda gpa: struct.unpack_from("<Q", tables.data, gpa - tables.base)[0] \
        if tables.base <= gpa < tables.base + len(tables.data) else 0
    for t in range(tables.base, tables.base + len(tables.data), layout.PAGE_SIZE):
        assert paging.walk(read, tables.cr3, t).phys == t


def test_table_overflow_and_misaligned_ranges_are_usage_errors():
    with pytest.raises(UsageError):
        paging.build_page_tables(True, (paging.MappedRange(0x1000, 0x800, "x"),))
    far = tuple(paging.MappedRange(i << 30, 0x1000, f"r{i}") for i in range(8))
    with pytest.raises(UsageError):
        paging.build_page_tables(True, far)
