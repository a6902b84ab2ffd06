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


def ept_violation_error_code(qual: int) -> int:
    """The page-fault error code __vmx_handle_ept_violation builds from the qualification
    (read -> PFERR_USER, write -> PFERR_WRITE, fetch -> PFERR_FETCH, any of bits 3-5 ->
    PFERR_PRESENT; GLA valid: bit 8 -> GUEST_FINAL else GUEST_PAGE)."""
    ec = (1 << 2 if qual & 1 else 0) | (1 << 1 if qual & 2 else 0) | (1 << 4 if qual & 4 else 0)
    if qual & 0x38:
        ec |= 1
    if qual & (1 << 7):
        ec |= (1 << 32) if qual & (1 << 8) else (1 << 33)
    return ec


class MmuEnv(Env):
    """Env plus the TDP MMU and H3's processor walking the MMU's SPTEs as its EPT."""

    def __init__(self, cpl: int = 0, mmio_caching: bool = True, ad_enabled: bool = True,
                 slot_zap_all: bool = True, cache_config: str = "sdm-max"):
        super().__init__(cpl=cpl)
        from fastmmio.sim.kvm.mmu import TdpMmu
        from fastmmio.sim.vmx.processor import Processor

        self.mmu = TdpMmu(self.mem, self.alloc, self.slots, self.ev, mmio_caching=mmio_caching,
                          ad_enabled=ad_enabled, slot_zap_all=slot_zap_all, mmio_info=self.mmio_info)
        self.proc = Processor(self.mem, cache_config)
        self.proc.set_eptp(self.mmu.eptp)
        self.proc.load_guest_state(cr0=self.regs["cr0"], cr3=self.regs["cr3"], cr4=self.regs["cr4"],
                                   efer=self.regs["efer"], cpl=cpl)

    def access(self, la: int, access: int, limit: int = 16):
        """Translate ``la``; on every EPT violation run kvm_mmu_page_fault and retry, until a
        host-physical address, an EPT misconfiguration, or a fault result other than
        FIXED/SPURIOUS/RETRY. Returns (final, [PageFaultResult...])."""
        from fastmmio.sim.kvm.mmu import RetPf

        results = []
        for _ in range(limit):
            self.mmu.service_requests(self.proc)
            r = self.proc.translate(la, access)
            if isinstance(r, int) or r.kind != "ept_violation":
                return r, results
            pf = self.mmu.page_fault(r.gpa, ept_violation_error_code(r.qualification))
            results.append(pf)
            if pf.ret not in (RetPf.FIXED, RetPf.SPURIOUS, RetPf.RETRY):
                return r, results
        raise AssertionError("no progress")


class MachineRun:
    """A Machine run on unicorn + H3's processor + the KVM model, one batch of ``n`` accesses;
    userspace answers reads with the spec's device value and stops at the done port."""

    def __init__(self, machine, variant: str = "upstream", n: int = 4, nested: bool = False,
                 fill_instruction_length: bool = True, cache_config: str = "sdm-max",
                 insn_budget: int = 200_000, **vm_kw):
        from fastmmio.sim.cpu import GuestCpu
        from fastmmio.sim.kvm.vm import KvmVm
        from fastmmio.sim.vmx.processor import Processor

        self.machine = machine
        spec = machine.spec
        self.memory = HostMemory(46)
        self.proc = Processor(self.memory, cache_config)
        self.ev = self.proc.events
        self.vm = KvmVm.from_spec(spec, machine.image, memory=self.memory, events=self.ev,
                                  variant=variant, **vm_kw)
        self.exits = []

        def userspace(rec):
            self.exits.append(rec)
            if rec.kind == "io" and rec.addr == spec.done_port:
                return None
            if rec.kind in ("io", "mmio"):
                return 0 if rec.is_write else spec.device_read_value
            return None

        self.vcpu = self.vm.create_vcpu(self.proc, userspace=userspace, nested=nested)
        b = machine.image.boot
        self.proc.set_eptp(self.vm.mmu.eptp)
        self.proc.load_guest_state(cr0=b.cr0, cr3=b.cr3, cr4=b.cr4, efer=b.efer, cpl=b.cpl)
        self.cpu = GuestCpu(self.memory, self.proc, b, self.vcpu,
                            fill_instruction_length=fill_instruction_length)
        for hpa, size in self.vm.backing_ranges():
            self.cpu.map_host_range(hpa, size)
        self.vm.write_backing(layout.MAILBOX_GPA + layout.MAILBOX_ITERATIONS, n.to_bytes(8, "little"))
        self.stop = self.cpu.run(insn_budget=insn_budget)

    @property
    def user_exits(self):
        """User exits other than the final 'done' OUT."""
        done = self.machine.spec.done_port
        return [r for r in self.exits if not (r.kind == "io" and r.addr == done)]

    def mailbox(self, offset: int) -> int:
        return int.from_bytes(self.vm.guest_memory.read_guest(layout.MAILBOX_GPA + offset, 8), "little")

    def exits_by_reason(self):
        return {k[5:]: v for k, v in self.ev.items() if k.startswith("exit.")}
