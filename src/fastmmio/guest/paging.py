"""4-level IA-32e paging structures that identity-map the guest's regions with 4 KiB pages.

Formats from Intel SDM Vol. 3A, 4.5 "4-Level Paging" (2016 edition: Tables 4-14 to 4-19):
every entry has P (bit 0), R/W (bit 1), U/S (bit 2), PWT (bit 3), PCD (bit 4), A (bit 5);
a PTE also has D (bit 6); bits 51:12 hold the physical address of the next structure or the
page frame. A user-mode access (CPL 3) is allowed only if U/S is 1 in *every* paging-structure
entry used to translate the address (4.6.1 "Determination of Access Rights"), so a CPL3 guest
needs U at every level.

The accessed and dirty flags are set in advance: the timed loops then never make the
processor write them back during a batch (SDM 4.8 "Accessed and Dirty Flags").
The page at guest-physical 0 is left unmapped so that a null pointer in guest code faults.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

from fastmmio import layout
from fastmmio.errors import UsageError
# the entry bits are declared once, with the x86 formats the processor models read
from fastmmio.x86.paging import (
    PTE_A,
    PTE_D,
    PTE_P,
    PTE_PCD,
    PTE_PS,
    PTE_PWT,
    PTE_RW,
    PTE_US,
    phys_addr_mask,
)

ADDR_MASK = phys_addr_mask(52)  # bits 51:12

ENTRIES = 512


@dataclass(frozen=True)
class MappedRange:
    """A range identity-mapped with 4 KiB pages; ``uncached`` sets PCD|PWT in its PTEs."""

    gpa: int
    size: int
    name: str
    uncached: bool = False


def default_ranges() -> tuple[MappedRange, ...]:
    """Every region of :mod:`fastmmio.layout`: the RAM slot (minus page 0), the read-only
    slot, the MMIO hole (uncached, as an OS maps device memory with ioremap) and the RAM page
    next to it (backed only for routes with ``neighbour_ram``)."""
    return (
        MappedRange(layout.RAM_BASE + layout.PAGE_SIZE, layout.RAM_SIZE - layout.PAGE_SIZE, "ram"),
        MappedRange(layout.RO_BASE, layout.RO_SIZE, "ro-slot"),
        MappedRange(layout.MMIO_BASE, layout.MMIO_SIZE, "mmio-hole", uncached=True),
        MappedRange(layout.NEIGHBOUR_RAM_GPA, layout.NEIGHBOUR_RAM_SIZE, "neighbour-ram"),
    )


@dataclass(frozen=True)
class PageTables:
    """The paging structures as one byte string to place at ``base`` (CR3 = ``base``)."""

    base: int
    data: bytes
    user: bool

    @property
    def cr3(self) -> int:
        return self.base


def build_page_tables(
    user: bool,
    ranges: tuple[MappedRange, ...] | None = None,
    base: int = layout.PML4_GPA,
    limit: int = layout.PAGE_TABLES_END,
) -> PageTables:
    """Build PML4, PDPTs, PDs and PTs in ``[base, limit)`` identity-mapping ``ranges``.

    ``user`` sets U/S in every entry at every level (needed for CPL3, SDM 4.6.1). Tables are
    allocated in order: the PML4 at ``base``, then each lower-level table on first use.
    Raises :class:`UsageError` if the ranges need more tables than fit below ``limit`` or a
    range is not page-aligned.
    """
    if ranges is None:
        ranges = default_ranges()
    return _build_page_tables(user, tuple(ranges), base, limit)


@functools.lru_cache(maxsize=64)
def _build_page_tables(user: bool, ranges: tuple[MappedRange, ...], base: int,
                       limit: int) -> PageTables:
    """:func:`build_page_tables`, kept per arguments: the result is immutable, and every
    simulation of a compare or sweep builds the same two (CPL0 and CPL3)."""
    tables: dict[int, bytearray] = {base: bytearray(layout.PAGE_SIZE)}
    next_free = base + layout.PAGE_SIZE
    common = PTE_P | PTE_RW | PTE_A | (PTE_US if user else 0)

    def child(table_gpa: int, index: int) -> int:
        nonlocal next_free
        table = tables[table_gpa]
        (entry,) = struct.unpack_from("<Q", table, index * 8)
        if entry & PTE_P:
            return entry & ADDR_MASK
        if next_free + layout.PAGE_SIZE > limit:
            raise UsageError(f"page tables do not fit in [{base:#x}, {limit:#x})")
        new = next_free
        next_free += layout.PAGE_SIZE
        tables[new] = bytearray(layout.PAGE_SIZE)
        struct.pack_into("<Q", table, index * 8, new | common)
        return new

    for r in ranges:
        if r.gpa % layout.PAGE_SIZE or r.size % layout.PAGE_SIZE or r.size <= 0:
            raise UsageError(f"mapped range {r.name} is not page-aligned: {r.gpa:#x}+{r.size:#x}")
        for page in range(r.gpa, r.gpa + r.size, layout.PAGE_SIZE):
            if page >> 48:
                raise UsageError(f"{r.name}: address {page:#x} beyond 48-bit linear space")
            pdpt = child(base, (page >> 39) & 0x1FF)
            pd = child(pdpt, (page >> 30) & 0x1FF)
            pt = child(pd, (page >> 21) & 0x1FF)
            pte = page | common | PTE_D
            if r.uncached:
                pte |= PTE_PCD | PTE_PWT
            struct.pack_into("<Q", tables[pt], ((page >> 12) & 0x1FF) * 8, pte)

    data = bytearray(next_free - base)
    for gpa, table in tables.items():
        data[gpa - base : gpa - base + layout.PAGE_SIZE] = table
    return PageTables(base=base, data=bytes(data), user=user)


@dataclass(frozen=True)
class WalkResult:
    """A translation found by :func:`walk`: the physical address and the AND of the
    R/W and U/S flags over all four levels (SDM 4.6.1)."""

    phys: int
    writable: bool
    user: bool
    entries: tuple[int, int, int, int]


def walk(read_qword, cr3: int, linear: int) -> WalkResult | None:
    """Translate ``linear`` through 4-level paging (SDM 4.5, Figure 4-8 for 4 KiB pages).

    ``read_qword(gpa)`` returns the 8-byte entry at a physical address. Returns ``None`` when an
    entry on the way is not present. Large pages (PS) are not produced by
    :func:`build_page_tables` and are reported as an error.
    """
    table = cr3 & ADDR_MASK
    writable = user = True
    entries = []
    for shift in (39, 30, 21, 12):
        entry = read_qword(table + ((linear >> shift) & 0x1FF) * 8)
        if not entry & PTE_P:
            return None
        if shift != 12 and entry & PTE_PS:
            raise ValueError(f"large page at level shift {shift}: not built by fastmmio")
        writable &= bool(entry & PTE_RW)
        user &= bool(entry & PTE_US)
        entries.append(entry)
        table = entry & ADDR_MASK
    return WalkResult(table | (linear & 0xFFF), writable, user, tuple(entries))  # type: ignore[arg-type]
