"""A minimal VMX machine for tests, trace replay and benchmarks: host memory, one contiguous
block of guest RAM (like a single memslot), EPT tables mapping it, guest IA-32e tables, and a
:class:`~fastmmio.sim.vmx.processor.Processor` set up to use them.

Not a model of KVM: the EPT here is built directly, the way a test (or the KVM model's MMU)
would write entries. Guest paging structures are allocated from the top of guest RAM down.
"""

from __future__ import annotations

from typing import Any

from fastmmio.sim.vmx.errors import HostMemoryError
from fastmmio.sim.vmx.layouts import make_eptp
from fastmmio.sim.vmx.memory import PAGE_SIZE, HostMemory, PageAllocator
from fastmmio.sim.vmx.processor import Processor
from fastmmio.sim.vmx.tables import PageTableBuilder


class Testbed:
    """Guest RAM ``[0, ram_size)`` backed at ``ram_hpa`` (pages backed when first touched).

    ``ept`` builds EPT entries (host-physical), ``guest`` builds guest paging entries
    (guest-physical, written through the RAM mapping). ``proc`` is the processor, with CR3
    pointing at the guest PML4 table and the EPTP at the EPT PML4 table.
    """

    __test__ = False  # not a pytest class

    def __init__(self, config: Any = "sdm-max", ram_size: int = 1 << 30,
                 maxphyaddr: int = 46, ept_ad: bool = False, **proc_kw: Any):
        self.memory = HostMemory(maxphyaddr)
        self.alloc = PageAllocator(self.memory, base=1 << 32)
        self.ram_size = ram_size
        self.ram_hpa = self.alloc.reserve(ram_size // PAGE_SIZE, align=1 << 30)
        self.ept = self._second_level_builder()
        self._next_table_gpa = ram_size
        self.extra: dict[int, int] = {}  # GPA page -> HPA page, outside guest RAM
        self.guest = PageTableBuilder("guest", self._alloc_guest_table(), self.read_gpa_u64,
                                      self.write_gpa_u64, self._alloc_guest_table)
        self.proc = self._make_processor(config, ept_ad, **proc_kw)
        self.proc.load_guest_state(cr3=self.guest.root)

    def _second_level_builder(self) -> PageTableBuilder:
        """The second-level tables (EPT here; nested page tables in the SVM testbed)."""
        return PageTableBuilder.ept(self.memory, self.alloc)

    def _make_processor(self, config: Any, ept_ad: bool, **proc_kw: Any) -> Any:
        proc = Processor(self.memory, config, **proc_kw)
        proc.set_eptp(make_eptp(self.ept.root, ad=ept_ad))
        return proc

    def gpa_to_hpa(self, gpa: int) -> int:
        extra = self.extra.get(gpa >> 12)
        if extra is not None:
            return extra | (gpa & (PAGE_SIZE - 1))
        if not 0 <= gpa < self.ram_size:
            raise HostMemoryError(f"GPA {gpa:#x} is outside guest RAM")
        hpa = self.ram_hpa + gpa
        if not self.memory.is_backed(hpa):
            self.memory.back(hpa & ~(PAGE_SIZE - 1))
        return hpa

    def read_gpa_u64(self, gpa: int) -> int:
        return self.memory.read_u64(self.gpa_to_hpa(gpa))

    def write_gpa_u64(self, gpa: int, value: int) -> None:
        self.memory.write_u64(self.gpa_to_hpa(gpa), value)

    def _alloc_guest_table(self) -> int:
        self._next_table_gpa -= PAGE_SIZE
        gpa = self._next_table_gpa
        self.gpa_to_hpa(gpa)
        return gpa

    def map_ept_ram(self, gpa: int, size: int, page_size: int = PAGE_SIZE,
                    **perm: Any) -> None:
        """EPT-map guest RAM ``[gpa, gpa+size)`` onto its backing with leaves of
        ``page_size`` (``r``/``w``/``x``/``memtype`` as for :meth:`PageTableBuilder.map`)."""
        for off in range(0, size, page_size):
            self.ept.map(gpa + off, self.ram_hpa + gpa + off, page_size, **perm)

    def map_gpa(self, gpa: int, page_size: int = PAGE_SIZE, **perm: Any) -> int:
        """Give the page of ``gpa`` (outside guest RAM) fresh host memory, EPT-mapped with a
        leaf of ``page_size`` (the host block is aligned to it; only the first 4 KiB page is
        backed). Returns the host-physical address of ``gpa``."""
        base = gpa & ~(page_size - 1)
        hpa_base = self.alloc.reserve(page_size // PAGE_SIZE, align=page_size)
        self.ept.map(base, hpa_base, page_size, **perm)
        hpa = hpa_base + (gpa - base)
        self.memory.back(hpa & ~(PAGE_SIZE - 1))
        self.extra[gpa >> 12] = hpa & ~(PAGE_SIZE - 1)
        return hpa

    def spread_walk(self, la: int, guest_page: int = PAGE_SIZE, ept_page: int = PAGE_SIZE,
                    region: int = 1 << 39, **guest_kw: Any) -> dict[str, int]:
        """Map ``la`` through a fresh guest hierarchy whose every paging structure, and the
        data page, sits in its own EPT PML4E region (GPA ``k * region``), so that no two
        guest-physical translations of one walk share an EPT paging-structure-cache entry.
        CR3 is switched to the new PML4 table. Returns the GPAs used (pml4, pdpt, pd, pt,
        data)."""
        levels = {PAGE_SIZE: 4, 1 << 21: 3, 1 << 30: 2}[guest_page]
        names = ["pml4", "pdpt", "pd", "pt"][:levels]
        gpas = {n: (i + 1) * region for i, n in enumerate(names)}
        gpas["data"] = (len(names) + 1) * region + (la & (guest_page - 1) & ~(PAGE_SIZE - 1))
        for n in names:
            self.map_gpa(gpas[n], ept_page)
        self.map_gpa(gpas["data"], ept_page)
        queue = [gpas[n] for n in names[1:]]
        builder = PageTableBuilder("guest", gpas["pml4"], self.read_gpa_u64,
                                   self.write_gpa_u64, lambda: queue.pop(0))
        builder.map(la & ~(guest_page - 1), gpas["data"] & ~(guest_page - 1), guest_page,
                    **guest_kw)
        self.guest = builder
        self.proc.load_guest_state(cr3=gpas["pml4"])
        return gpas

    def map_all_ept(self, page_size: int = 1 << 21) -> None:
        """EPT-map all of guest RAM read/write/execute."""
        self.map_ept_ram(0, self.ram_size, page_size)

    def map_guest(self, la: int, gpa: int, page_size: int = PAGE_SIZE, **kw: Any) -> int:
        """Guest-map linear ``la`` to ``gpa`` (``w``, ``us``, ``g``, ``xd``)."""
        return self.guest.map(la, gpa, page_size, **kw)
