"""Simulator fixes found by differential fuzzing (``python -m fastmmio.fuzz diff``), each held
to the kernel source it follows. The shrunk programs that found them are replayed against
real KVM by ``tests/kvm/test_fuzz_differential.py`` (``tests/kvm/regressions/``)."""

import pytest
from iced_x86 import Code, Instruction, MemoryOperand, Register

from fastmmio import layout
from fastmmio.sim.kvm.emulator import EmulationOutcome
from kvm_sim_harness import Env

DB = layout.DOORBELL_GPA


@pytest.mark.parametrize("code, reg, data, before, after", [
    # 66 REX.W-less 63 /r: the processor reads 2 bytes; KVM reads 4 and keeps the low 2
    (Code.MOVSXD_R16_RM16, Register.R9W, 0x89AB_CDEF, 0x1111_2222_3333_4444, 0x1111_2222_3333_CDEF),
    (Code.MOVSXD_R32_RM32, Register.R9D, 0x89AB_CDEF, 0xFFFF_FFFF_FFFF_FFFF, 0x89AB_CDEF),
    (Code.MOVSXD_R64_RM32, Register.R9, 0x89AB_CDEF, 0, 0xFFFF_FFFF_89AB_CDEF),
])
def test_movsxd_reads_four_bytes_whatever_the_operand_size(code, reg, data, before, after):
    """arch/x86/kvm/emulate.c ``mode_dual_63``: opcode 0x63 in 64-bit mode is
    ``I(DstReg | SrcMem32 | ModRM | Mov, em_movsxd)``: the source operand is 4 bytes for every
    operand size, so ``movsxd r16, m16`` on MMIO is a KVM_EXIT_MMIO of length 4 (the processor
    itself reads 2 bytes); ``em_movsxd`` stores ``(s32)src`` cut to the destination size.
    Found by the differential fuzzer: real KVM (PVM) exited with len 4, the model with 2."""
    e = Env()
    e.code(Instruction.create_reg_mem(code, reg, MemoryOperand(Register.RSI)))
    e.regs["rsi"] = DB
    e.regs["r9"] = before
    r = e.emu.x86_emulate_instruction()
    assert r.outcome is EmulationOutcome.USER_EXIT
    assert (r.mmio.phys_addr, r.mmio.len, r.mmio.is_write) == (DB, 4, False)
    e.emu.complete_userspace_io(data)
    assert e.regs["r9"] == after


def _sim_exits(program, **options):
    """Run a fuzz program on the simulator; every EPT exit's (reason, GPA, GLA) and the batch."""
    from fastmmio.sim.backend import SimBackend, SimOptions

    s = SimBackend(SimOptions(**options)).open(program.machine())
    seen = []
    for name in ("handle_ept_misconfig", "handle_ept_violation"):
        orig = getattr(s.vcpu, name)

        def hook(info, orig=orig):
            if (info.guest_physical_address or 0) >= layout.MMIO_BASE:
                seen.append((info.name, info.guest_physical_address, info.guest_linear_address))
            return orig(info)

        setattr(s.vcpu, name, hook)
    return seen, s.run_batch(1), s


def test_ept_exits_report_the_exact_address_not_its_page():
    """SDM 27.2.1: an EPT violation's and an EPT misconfiguration's exit information holds the
    guest-physical address accessed (and the violation the linear address), not its page.
    unicorn's TLB-fill hook only gives the page (sim/cpu.py GuestCpu._exact_fault). Found by
    the differential fuzzer: with kvm.mmio_caching on, a read of 0x401014 hit a length-0
    ioeventfd at 0x401000 on KVM_FAST_MMIO_BUS (handle_ept_misconfig matches the exact GPA,
    kvm_io_bus_cmp: a length-0 range matches its address only), signalled it and skipped the
    load."""
    from fastmmio.fuzz.programs import DiffProgram, MemRef, Op
    from fastmmio.machine import IoEventFdSpec

    prog = DiffProgram(
        ops=(Op("load", 2, "R12D", "movsx", None, "mmio", 0x401000, MemRef("base", base="RSI")),
             Op("load", 1, "R15L", "mov", None, "mmio", 0x401014, MemRef("base_disp", base="RSI", disp=0x10)),
             Op("store", 4, "ECX", "mov", 7, "mmio", 0x402ffc, MemRef("sib", base="RAX", index="RBX",
                                                                      scale=4, disp=-4, index_value=3,
                                                                      addr32=True))),
        ioeventfds=(IoEventFdSpec("len0", False, 0x401000, 0),),
        device_read_value=0x1259E)
    seen, batch, s = _sim_exits(prog, mmio_caching=True)
    assert seen == [("EPT_VIOLATION", 0x401000, 0x401000),
                    ("EPT_MISCONFIG", 0x401014, None),
                    ("EPT_VIOLATION", 0x402FFC, 0x402FFC)]
    assert batch.eventfd_signals == {"len0": 0}
    assert [(e.addr, e.size, e.is_write) for e in batch.exits] == [
        (0x401000, 2, False), (0x401014, 1, False), (0x402FFC, 4, True)]
    assert s.regs()["r15"] == 0x9E


def test_length0_ioeventfd_in_a_coalesced_zone_wins_once_the_page_has_an_mmio_spte():
    """VMX with kvm.mmio_caching (found by the differential fuzzer against PVM, where it does
    not happen). The machine: ioeventfds at 0x400038 (length 1), 0x400030 (length 0) and
    0x401020 (length 8, another page), then a coalesced zone 0x400020+0x20.
    kvm_io_bus_register_dev inserts each range before the first one kvm_io_bus_cmp ranks above
    it; that comparison is no total order, and the KVM_MMIO_BUS array ends up
    [0x400030/0, 0x400038/1, zone, 0x401020/8]. A 2-byte write to 0x400030: bsearch lands on
    the zone, the walk back (kvm_io_bus_get_first_dev) stops at 0x400038, which does not cover
    0x400030, so the zone takes the write. The first write to the page is an EPT violation and
    emulated that way (vcpu_mmio_write); the page then has an MMIO SPTE, the next write is an
    EPT misconfiguration and handle_ept_misconfig tries KVM_FAST_MMIO_BUS first (68c3b4d1),
    which holds only the length-0 ioeventfd: it signals and the store is skipped. Without
    caching both writes are emulated: both to the zone. Without the unrelated ioeventfd at
    0x401020 the array has three entries, bsearch lands on 0x400030 and the ioeventfd takes
    the emulated writes too (real KVM here does the same for both machines)."""
    from fastmmio.fuzz.programs import DiffProgram, MemRef, Op
    from fastmmio.machine import CoalescedZone, IoEventFdSpec

    store = Op("store", 2, "BP", "mov", 0x1234, "mmio", 0x400030, MemRef("base", base="RSI"))
    evs = (IoEventFdSpec("len1", False, 0x400038, 1), IoEventFdSpec("len0", False, 0x400030, 0),
           IoEventFdSpec("far", False, 0x401020, 8))
    prog = DiffProgram(ops=(store, store), ioeventfds=evs, coalesced=(CoalescedZone(0x400020, 0x20),))
    seen, batch, _ = _sim_exits(prog, mmio_caching=True)
    assert [s[0] for s in seen] == ["EPT_VIOLATION", "EPT_MISCONFIG"]
    assert batch.coalesced_entries == 1 and batch.eventfd_signals["len0"] == 1
    assert batch.user_exits == 0
    _, batch, _ = _sim_exits(prog, mmio_caching=False)
    assert batch.coalesced_entries == 2 and batch.eventfd_signals["len0"] == 0
    three = DiffProgram(ops=(store, store), ioeventfds=evs[:2], coalesced=prog.coalesced)
    _, batch, _ = _sim_exits(three, mmio_caching=False)
    assert batch.coalesced_entries == 0 and batch.eventfd_signals["len0"] == 2
