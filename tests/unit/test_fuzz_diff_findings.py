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
