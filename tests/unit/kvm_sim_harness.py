"""A small guest environment for the KVM-model unit tests: host memory, the layout's memslots
(RAM, a read-only slot, an MMIO hole), identity-mapped guest page tables, buses, ioeventfds,
the software walker and the emulator. Not a test module (no test_ prefix)."""

from __future__ import annotations

from collections import Counter

from iced_x86 import BlockEncoder, Instruction

from fastmmio import layout
from fastmmio.sim.kvm.emulator import RegisterFile, VcpuMmioInfo, X86Emulator
from fastmmio.sim.kvm.eventfd import IoEventFds
from fastmmio.sim.kvm.guestmem import GuestPageWalker, MemslotGuestMemory
from fastmmio.sim.kvm.iobus import KvmIoBuses
from fastmmio.sim.kvm.memslots import KVM_MEM_READONLY, KvmMemslots
from fastmmio.sim.vmx.memory import HostMemory, PageAllocator
from fastmmio.sim.vmx.tables import PageTableBuilder

CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11


class Env:
    def __init__(self, cpl: int = 0, user_pages: bool = True):
        self.ev = Counter()
        self.mem = HostMemory(46)
        self.alloc = PageAllocator(self.mem)
        self.slots = KvmMemslots(self.ev)
        self.ram_hpa = self.alloc.alloc_pages(layout.RAM_SIZE // 4096)
        self.slots.set_user_memory_region(layout.RAM_SLOT, 0, layout.RAM_BASE, layout.RAM_SIZE, self.ram_hpa)
        self.ro_hpa = self.alloc.alloc_pages(layout.RO_SIZE // 4096)
        self.mem.fill(self.ro_hpa, layout.RO_SIZE, layout.RO_PATTERN)
        self.slots.set_user_memory_region(layout.RO_SLOT, KVM_MEM_READONLY, layout.RO_BASE, layout.RO_SIZE,
                                          self.ro_hpa)
        self.gmem = MemslotGuestMemory(self.slots, self.mem)
        self._next_table = layout.PML4_GPA

        def alloc_table() -> int:
            gpa = self._next_table
            self._next_table += 0x1000
            assert gpa < layout.PAGE_TABLES_END
            return gpa

        def rd(gpa: int) -> int:
            return int.from_bytes(self.gmem.read_guest(gpa, 8), "little")

        def wr(gpa: int, v: int) -> None:
            assert self.gmem.write_guest(gpa, v.to_bytes(8, "little"))

        self.pt = PageTableBuilder("guest", alloc_table(), rd, wr, alloc_table)
        for base, size in ((0x1000, layout.RAM_SIZE - 0x1000), (layout.RO_BASE, layout.RO_SIZE),
                           (layout.MMIO_BASE, layout.MMIO_SIZE)):
            for a in range(base, base + size, 0x1000):
                self.pt.map(a, a, us=user_pages)
        self.lookups_setup = self.ev["kvm.mmu.memslot_lookup"]
        self.ev.clear()
        self.regs = RegisterFile(cr0=CR0_PE | CR0_PG | CR0_WP, cr3=layout.PML4_GPA, cr4=CR4_PAE,
                                 efer=EFER_LME | EFER_LMA | EFER_NXE, cpl=cpl, rip=layout.CODE_GPA,
                                 rsp=layout.STACK_TOP)
        self.buses = KvmIoBuses(self.ev)
        self.ioeventfds = IoEventFds(self.buses)
        self.walker = GuestPageWalker(self.regs, self.gmem, self.ev)
        self.mmio_info = VcpuMmioInfo(lambda: self.slots.generation)
        self.emu = X86Emulator(self.regs, self.gmem, self.walker, self.buses, self.mmio_info, self.ev)

    def code(self, *instrs: Instruction, at: int = layout.CODE_GPA) -> bytes:
        enc = BlockEncoder(64)
        enc.add_many(list(instrs))
        data = enc.encode(at)
        assert self.gmem.write_guest(at, data)
        self.regs["rip"] = at
        return data

    def raw(self, data: bytes, at: int = layout.CODE_GPA) -> None:
        assert self.gmem.write_guest(at, data)
        self.regs["rip"] = at
