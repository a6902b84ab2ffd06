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
