"""Host-physical memory, the page allocator and the table builder (fastmmio.sim.vmx)."""

from __future__ import annotations

import pytest

from fastmmio.sim.vmx.errors import HostMemoryError, LayoutError
from fastmmio.sim.vmx.layouts import EPT_LARGE, MT_WB
from fastmmio.sim.vmx.memory import PAGE_SIZE, HostMemory, PageAllocator
from fastmmio.sim.vmx.tables import PageTableBuilder


def test_reads_and_writes_of_each_size_little_endian():
    m = HostMemory(40)
    m.back(0x5000, 2 * PAGE_SIZE)
    for size in (1, 2, 4, 8):
        m.write(0x5008, size, 0x1122334455667788)
        assert m.read(0x5008, size) == 0x1122334455667788 & ((1 << (8 * size)) - 1)
    m.write(0x5FFC, 8, 0x0102030405060708)  # crosses into the next page
    assert m.read(0x5FFC, 8) == 0x0102030405060708
    assert m.read(0x6000, 1) == 0x04


def test_unbacked_and_bad_accesses_raise():
    m = HostMemory(40)
    with pytest.raises(HostMemoryError):
        m.read_u64(0x1000)
    m.back(0x1000)
    with pytest.raises(HostMemoryError):
        m.read_u64(0x1004)
    with pytest.raises(HostMemoryError):
        m.read(0x1000, 3)
    with pytest.raises(HostMemoryError):
        m.back(1 << 40)


def test_allocator_zeroed_aligned_and_bounded():
    m = HostMemory(40)
    a = PageAllocator(m, base=0x10000, limit=0x10000 + 4 * 0x200000)
    p = a.alloc_page()
    m.write_u64(p, 0xFFFF)
    a.free_pages(p)
    assert a.alloc_page() == p and m.read_u64(p) == 0
    big = a.alloc_pages(512, align=0x200000)
    assert big % 0x200000 == 0 and m.is_backed(big + 511 * PAGE_SIZE)
    with pytest.raises(HostMemoryError):
        a.alloc_pages(4 * 512)


def test_builder_maps_4k_and_large_pages():
    m = HostMemory(46)
    a = PageAllocator(m)
    b = PageTableBuilder.ept(m, a)
    b.map(0x7000, 0x9000, r=True, w=False, x=False, memtype=MT_WB)
    assert b.get_entry(0x7000, 1) == 0x9000 | 1 | (MT_WB << 3)
    b.map(0x4000_0000, 0x8000_0000, page_size=1 << 30)
    assert b.get_entry(0x4000_0000, 3) & EPT_LARGE
    with pytest.raises(LayoutError):
        b.map(0x4000_1000, 0x1000)  # a 1 GiB leaf is in the way
    b.unmap(0x7000)
    assert b.get_entry(0x7000, 1) == 0
