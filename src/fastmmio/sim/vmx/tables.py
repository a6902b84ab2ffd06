"""Building 4-level paging structures in memory: EPT tables and guest IA-32e tables.

One builder serves both kinds: it is given how to read and write a 64-bit entry at an address
of *its own* address space (host-physical for EPT, guest-physical for guest tables) and how to
allocate a zeroed 4 KiB table there. The KVM model uses it (or its own code) to build SPTEs;
tests use it to lay out random guest and EPT tables.

Non-leaf entries get R/W/X (EPT) or P/RW/US (guest) = bits 2:0 set, the most permissive
value, so the leaf decides permissions unless a caller writes an entry with
:meth:`PageTableBuilder.set_entry`.
"""

from __future__ import annotations

from typing import Callable

from fastmmio.sim.vmx.errors import LayoutError
from fastmmio.sim.vmx.layouts import EPT_LARGE, EPT_RWX, MT_WB, make_ept_entry
from fastmmio.x86.paging import LEVEL_SHIFT, PTE_P, PTE_PS, PTE_RW, PTE_US, make_guest_entry
from fastmmio.sim.vmx.memory import HostMemory, PageAllocator

_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF
_LEVEL_FOR_SIZE = {1 << 12: 1, 1 << 21: 2, 1 << 30: 3}


class PageTableBuilder:
    """Builds and edits a 4-level radix tree of 512-entry tables.

    ``kind`` is ``"ept"`` or ``"guest"``. ``root`` is the address of the top table (the EPT
    PML4 table's HPA, or the guest CR3 GPA).
    """

    def __init__(self, kind: str, root: int, read_u64: Callable[[int], int],
                 write_u64: Callable[[int, int], None], alloc_table: Callable[[], int]):
        if kind not in ("ept", "guest"):
            raise LayoutError(f"table kind must be 'ept' or 'guest', got {kind!r}")
        self.kind = kind
        self.root = root
        self.read_u64 = read_u64
        self.write_u64 = write_u64
        self.alloc_table = alloc_table
        self.tables = {root}  # every table address this builder created or was given

    @classmethod
    def ept(cls, memory: HostMemory, alloc: PageAllocator) -> "PageTableBuilder":
        """A new, empty EPT hierarchy in host memory (PML4 table allocated)."""
        return cls("ept", alloc.alloc_page(), memory.read_u64, memory.write_u64,
                   alloc.alloc_page)

    def _nonleaf(self, table: int) -> int:
        return table | (EPT_RWX if self.kind == "ept" else (PTE_P | PTE_RW | PTE_US))

    def _is_leaf(self, entry: int, level: int) -> bool:
        if level == 1:
            return True
        bit = EPT_LARGE if self.kind == "ept" else PTE_PS
        return level in (2, 3) and bool(entry & bit)

    def _present(self, entry: int) -> bool:
        return bool(entry & 7) if self.kind == "ept" else bool(entry & PTE_P)

    def entry_address(self, addr: int, level: int, create: bool = False) -> int | None:
        """Address of the entry at ``level`` (4..1) that translates ``addr``.

        With ``create``, missing tables above are allocated and linked with permissive
        non-leaf entries; without it, ``None`` if the path is not present. Raises if a
        large-page leaf sits above ``level``.
        """
        if level not in (1, 2, 3, 4):
            raise LayoutError(f"level must be 1..4, got {level}")
        table = self.root
        for lv in range(4, level, -1):
            ea = table + ((addr >> LEVEL_SHIFT[lv]) & 511) * 8
            e = self.read_u64(ea)
            if not self._present(e):
                if not create:
                    return None
                new = self.alloc_table()
                self.tables.add(new)
                self.write_u64(ea, self._nonleaf(new))
                table = new
                continue
            if self._is_leaf(e, lv):
                raise LayoutError(f"{self.kind} address {addr:#x}: a large page at level {lv} "
                                  f"is in the way of a level-{level} entry")
            table = e & _ADDR_MASK
        return table + ((addr >> LEVEL_SHIFT[level]) & 511) * 8

    def get_entry(self, addr: int, level: int) -> int | None:
        ea = self.entry_address(addr, level)
        return None if ea is None else self.read_u64(ea)

    def set_entry(self, addr: int, level: int, value: int) -> int:
        """Write a raw entry value at ``level`` for ``addr`` (creating tables above).
        Returns the entry's address."""
        ea = self.entry_address(addr, level, create=True)
        assert ea is not None
        self.write_u64(ea, value)
        return ea

    def map(self, addr: int, target: int, page_size: int = 1 << 12, *, r: bool = True,
            w: bool = True, x: bool = True, memtype: int = MT_WB, ipat: bool = False,
            us: bool = True, g: bool = False, xd: bool = False) -> int:
        """Map the page at ``addr`` to ``target`` with a leaf of ``page_size`` (4K/2M/1G).

        EPT leaves use ``r``/``w``/``x``/``memtype``/``ipat``; guest leaves use ``w`` (RW),
        ``us``, ``g``, ``xd``. Returns the leaf's address.
        """
        level = _LEVEL_FOR_SIZE.get(page_size)
        if level is None:
            raise LayoutError(f"page size must be 4 KiB, 2 MiB or 1 GiB, got {page_size:#x}")
        if addr & (page_size - 1) or target & (page_size - 1):
            raise LayoutError(f"{addr:#x} -> {target:#x} not aligned to {page_size:#x}")
        if self.kind == "ept":
            value = make_ept_entry(target, r, w, x, memtype, ipat, large=level > 1, leaf=True)
        else:
            value = make_guest_entry(target, rw=w, us=us, ps=level > 1, g=g, xd=xd)
        return self.set_entry(addr, level, value)

    def unmap(self, addr: int, level: int = 1) -> None:
        """Make the entry at ``level`` for ``addr`` not present (no-op if the path is absent)."""
        ea = self.entry_address(addr, level)
        if ea is not None:
            self.write_u64(ea, 0)
