"""The x86 emulator model (arch/x86/kvm/x86.c x86_emulate_instruction, emulator_read_write,
vcpu_mmio_write/vcpu_mmio_read, complete_emulated_mmio, handle_emulation_failure; emulate.c
fetch/decode). Instructions are encoded with iced-x86 and decoded back by the model."""

import pytest
from iced_x86 import Code, Instruction, MemoryOperand, Register

from fastmmio import layout
from fastmmio.sim.kvm.emulator import (
    EMULTYPE_PF,
    EMULTYPE_SKIP,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_MMIO,
    PF_VECTOR,
    UD_VECTOR,
    EmulationOutcome,
)
from fastmmio.sim.kvm.eventfd import EventFd
from fastmmio.sim.kvm.guestmem import PFERR_FETCH_MASK, PFERR_USER_MASK, PFERR_WRITE_MASK
from kvm_sim_harness import Env

DB = layout.DOORBELL_GPA
mem = MemoryOperand


def test_store_register_to_ioeventfd_on_mmio_bus():
    """vcpu_mmio_write -> kvm_io_bus_write(KVM_MMIO_BUS): a length-4 ioeventfd takes
    `mov [rax], ecx`; RIP advances; no exit."""
    e = Env()
    fd = EventFd()
    e.ioeventfds.assign(fd, DB, 4)
    code = e.code(Instruction.create_mem_reg(Code.MOV_RM32_R32, mem(Register.RAX), Register.ECX))
    e.regs["rax"], e.regs["rcx"] = DB, 0xFFFF_FFFF_1234_5678
    r = e.emu.x86_emulate_instruction()
    assert r.outcome is EmulationOutcome.CONTINUE and r.handled_by == "KVM_MMIO_BUS"
    assert fd.count == 1
    assert e.regs["rip"] == layout.CODE_GPA + len(code)
    assert e.ev["kvm.emulate"] == 1 and e.ev["kvm.emulate.decode"] == 1 and e.ev["kvm.emulate.fetch"] == 1
    assert e.ev["kvm.bus.lookup.KVM_MMIO_BUS"] == 1 and e.ev["kvm.eventfd.signal"] == 1


@pytest.mark.parametrize("code, reg, value, size", [
    (Code.MOV_RM8_R8, Register.CL, 0xAB, 1),
    (Code.MOV_RM8_R8, Register.AH, 0x12, 1),
    (Code.MOV_RM16_R16, Register.R9W, 0xBEEF, 2),
    (Code.MOV_RM32_R32, Register.EDX, 0xDEADBEEF, 4),
    (Code.MOV_RM64_R64, Register.R15, 0x1122334455667788, 8),
    (Code.MOVNTI_M32_R32, Register.ESI, 0x0BADF00D, 4),
])
def test_store_register_widths_exit_to_userspace(code, reg, value, size):
    """emulator_read_write -> KVM_EXIT_MMIO for a write nobody in the kernel takes; the write's
    writeback (RIP advance) happens before the exit (x86_emulate_instruction: writeback for
    mmio_is_write)."""
    e = Env()
    insn = e.code(Instruction.create_mem_reg(code, mem(Register.RBX, displ=8, displ_size=1), reg))
    e.regs["rbx"] = DB - 8
    full = {Register.CL: "rcx", Register.AH: "rax", Register.R9W: "r9", Register.EDX: "rdx",
            Register.R15: "r15", Register.ESI: "rsi"}[reg]
    e.regs[full] = value << 8 if reg == Register.AH else value
    r = e.emu.x86_emulate_instruction()
    assert r.outcome is EmulationOutcome.USER_EXIT and r.exit_reason == KVM_EXIT_MMIO
    assert (r.mmio.phys_addr, r.mmio.len, r.mmio.is_write, r.mmio.data) == (DB, size, True, value)
    assert e.regs["rip"] == layout.CODE_GPA + len(insn)
    assert e.ev["kvm.user_exit.mmio"] == 1
    done = e.emu.complete_userspace_io()
    assert done.outcome is EmulationOutcome.CONTINUE
    assert e.regs["rip"] == layout.CODE_GPA + len(insn)


@pytest.mark.parametrize("code, imm, size, expect", [
    (Code.MOV_RM8_IMM8, 0x7F, 1, 0x7F),
    (Code.MOV_RM16_IMM16, 0x1234, 2, 0x1234),
    (Code.MOV_RM32_IMM32, -0x76543211, 4, 0x89ABCDEF),
    (Code.MOV_RM64_IMM32, -2, 8, 0xFFFF_FFFF_FFFF_FFFE),  # imm32 sign-extended to 64
])
def test_store_immediate(code, imm, size, expect):
    """MOV r/m, imm (C6/C7): the stored value and width reach run->mmio."""
    e = Env()
    e.code(Instruction.create_mem_i32(code, mem(Register.RDI), imm))
    e.regs["rdi"] = DB + 0x10
    r = e.emu.x86_emulate_instruction()
    assert r.mmio == type(r.mmio)(DB + 0x10, size, True, expect)


@pytest.mark.parametrize("code, reg, data, size, before, after", [
    (Code.MOV_R64_RM64, Register.RAX, 0x1122334455667788, 8, 0, 0x1122334455667788),
    (Code.MOV_R32_RM32, Register.EAX, 0x80000001, 4, 0xFFFF_FFFF_FFFF_FFFF, 0x80000001),  # zero-extends
    (Code.MOV_R16_RM16, Register.AX, 0xABCD, 2, 0x1111_2222_3333_4444, 0x1111_2222_3333_ABCD),
    (Code.MOV_R8_RM8, Register.AL, 0xEE, 1, 0x1111_2222_3333_4444, 0x1111_2222_3333_44EE),
    (Code.MOV_R8_RM8, Register.AH, 0xEE, 1, 0x1111_2222_3333_4444, 0x1111_2222_3333_EE44),
    (Code.MOVZX_R32_RM8, Register.EAX, 0xF0, 1, 0xFFFF_FFFF_FFFF_FFFF, 0xF0),
    (Code.MOVZX_R64_RM16, Register.RAX, 0x8001, 2, 0xFFFF_FFFF_FFFF_FFFF, 0x8001),
    (Code.MOVSX_R64_RM8, Register.RAX, 0x80, 1, 0, 0xFFFF_FFFF_FFFF_FF80),
    (Code.MOVSX_R32_RM16, Register.EAX, 0x8000, 2, 0xFFFF_FFFF_0000_0000, 0xFFFF_8000),
    (Code.MOVSX_R16_RM8, Register.AX, 0xFF, 1, 0x1234_5678_9ABC_DEF0, 0x1234_5678_9ABC_FFFF),
    (Code.MOVSXD_R64_RM32, Register.RAX, 0x8000_0000, 4, 0, 0xFFFF_FFFF_8000_0000),
])
def test_load_from_userspace_completes_on_next_run(code, reg, data, size, before, after):
    """A read exits with RIP unchanged (writeback = false for !mmio_is_write); userspace's data
    completes it (complete_emulated_mmio -> complete_emulated_io, EMULTYPE_NO_DECODE, no new
    decode) and the destination is written with the load's extension rules."""
    e = Env()
    insn = e.code(Instruction.create_reg_mem(code, reg, mem(Register.RSI)))
    e.regs["rsi"] = DB
    e.regs["rax"] = before
    r = e.emu.x86_emulate_instruction()
    assert r.outcome is EmulationOutcome.USER_EXIT
    assert (r.mmio.phys_addr, r.mmio.len, r.mmio.is_write) == (DB, size, False)
    assert e.regs["rip"] == layout.CODE_GPA and e.emu.userspace_io_pending is not None
    done = e.emu.complete_userspace_io(data | (0xAA << 64))
    assert done.outcome is EmulationOutcome.CONTINUE and done.handled_by == "userspace"
    assert e.regs["rax"] == after
    assert e.regs["rip"] == layout.CODE_GPA + len(insn)
    assert e.ev["kvm.emulate"] == 2 and e.ev["kvm.emulate.decode"] == 1


def test_load_from_bus_device_completes_in_kernel():
    """vcpu_mmio_read -> kvm_io_bus_read(KVM_MMIO_BUS): a device with a read op answers."""
    from fastmmio.sim.kvm.iobus import KvmBus, KvmIoDevice

    class Reg(KvmIoDevice):
        def read(self, addr, length):
            return 0x55

    e = Env()
    e.buses[KvmBus.KVM_MMIO_BUS].register_dev(DB, 4, Reg())
    e.code(Instruction.create_reg_mem(Code.MOV_R32_RM32, Register.ECX, mem(Register.RSI)))
    e.regs["rsi"] = DB
    r = e.emu.x86_emulate_instruction()
    assert r.outcome is EmulationOutcome.CONTINUE and r.handled_by == "KVM_MMIO_BUS"
    assert e.regs["rcx"] == 0x55


def test_ioeventfd_is_not_readable():
    """ioeventfd_ops has no read: an MMIO read of an ioeventfd address exits to userspace."""
    e = Env()
    fd = EventFd()
    e.ioeventfds.assign(fd, DB, 0)
    e.code(Instruction.create_reg_mem(Code.MOV_R32_RM32, Register.ECX, mem(Register.RSI)))
    e.regs["rsi"] = DB
    assert e.emu.x86_emulate_instruction().outcome is EmulationOutcome.USER_EXIT
    assert fd.count == 0


def test_rip_relative_gs_and_addr32_operands():
    """Operand linear address: RIP-relative, GS base (64-bit mode: only FS/GS have bases),
    and a 0x67 address-size prefix (32-bit wrap)."""
    e = Env()
    insn = Instruction.create_mem_reg(Code.MOV_RM32_R32, mem(Register.RIP, displ=DB), Register.ECX)
    e.code(insn)
    assert e.emu.x86_emulate_instruction().mmio.phys_addr == DB
    e = Env()
    e.code(Instruction.create_mem_reg(Code.MOV_RM8_R8, mem(Register.RAX, seg=Register.GS), Register.CL))
    e.regs["gs_base"], e.regs["rax"] = DB, 0x20
    assert e.emu.x86_emulate_instruction().mmio.phys_addr == DB + 0x20
    e = Env()
    e.raw(bytes([0x67, 0x89, 0x08]))  # mov [eax], ecx
    e.regs["rax"] = 0xFFFF_FFFF_0000_0000 | DB
    assert e.emu.x86_emulate_instruction().mmio.phys_addr == DB


def test_emultype_pf_uses_exit_gpa_without_walk():
    """x86_emulate_instruction with EMULTYPE_PF on a TDP MMU sets gpa_available; the operand
    then needs no software walk when the page offsets agree (emulator_read_write_onepage)."""
    e = Env()
    e.code(Instruction.create_mem_reg(Code.MOV_RM32_R32, mem(Register.RAX), Register.ECX))
    e.regs["rax"] = DB + 4
    r = e.emu.x86_emulate_instruction(EMULTYPE_PF, DB + 4)
    assert r.mmio.phys_addr == DB + 4
    assert e.ev["kvm.emulate.walk"] == 1  # the fetch only
    e2 = Env()
    e2.code(Instruction.create_mem_reg(Code.MOV_RM32_R32, mem(Register.RAX), Register.ECX))
    e2.regs["rax"] = DB + 4
    e2.emu.x86_emulate_instruction()
    assert e2.ev["kvm.emulate.walk"] == 2  # fetch + operand


def test_write_to_readonly_memslot_is_mmio():
    """emulator_write_phys fails on a KVM_MEM_READONLY slot (KVM_HVA_ERR_RO_BAD), so the write
    goes to vcpu_mmio_write: an ioeventfd there fires (vcpu_mmio_write -> KVM_MMIO_BUS), memory is unchanged."""
    e = Env()
    fd = EventFd()
    e.ioeventfds.assign(fd, layout.RO_BASE, 0)
    e.code(Instruction.create_mem_reg(Code.MOV_RM16_R16, mem(Register.RAX), Register.CX))
    e.regs["rax"] = layout.RO_BASE
    r = e.emu.x86_emulate_instruction(EMULTYPE_PF, layout.RO_BASE)
    assert r.handled_by == "KVM_MMIO_BUS" and fd.count == 1
    assert e.gmem.read_guest(layout.RO_BASE, 2) == bytes([layout.RO_PATTERN] * 2)


def test_read_of_readonly_memslot_and_write_to_ram_are_memory():
    """kvm_vcpu_read_guest reads a read-only slot; kvm_vcpu_write_guest writes RAM: no MMIO."""
    e = Env()
    e.code(Instruction.create_reg_mem(Code.MOV_R32_RM32, Register.EDX, mem(Register.RAX)))
    e.regs["rax"] = layout.RO_BASE + 0x100
    r = e.emu.x86_emulate_instruction()
    assert r.handled_by == "memory" and e.regs["rdx"] == 0x5A5A5A5A
    e.code(Instruction.create_mem_reg(Code.MOV_RM32_R32, mem(Register.RAX), Register.EDX))
    e.regs["rax"] = layout.DATA_GPA
    assert e.emu.x86_emulate_instruction().handled_by == "memory"
    assert e.gmem.read_guest(layout.DATA_GPA, 4) == bytes([0x5A] * 4)


def test_mmio_info_makes_gpa_mmio_without_memslot_access():
    """vcpu_is_mmio_gpa: a gpa matching the per-vCPU MMIO info (same memslot generation) goes
    straight to MMIO; a memslot change invalidates it (vcpu_match_mmio_gen)."""
    e = Env()
    e.code(Instruction.create_mem_reg(Code.MOV_RM32_R32, mem(Register.RAX), Register.ECX))
    e.regs["rax"] = layout.DATA_GPA
    e.mmio_info.cache(0, layout.DATA_GPA >> 12, 0)
    assert e.emu.x86_emulate_instruction(EMULTYPE_PF, layout.DATA_GPA).outcome is EmulationOutcome.USER_EXIT
    e.emu.complete_userspace_io()
    e.slots.set_user_memory_region(9, 0, 0x1000_0000, 0x1000, e.alloc.alloc_page())
    e.regs["rip"] = layout.CODE_GPA
    assert e.emu.x86_emulate_instruction(EMULTYPE_PF, layout.DATA_GPA).handled_by == "memory"


def test_unmodelled_instruction_is_emulation_failure_at_cpl0():
    """handle_emulation_failure: at CPL 0, KVM_EXIT_INTERNAL_ERROR (emulation); never a Python
    exception."""
    e = Env()
    e.code(Instruction.create_mem_reg(Code.ADD_RM32_R32, mem(Register.RAX), Register.ECX))
    e.regs["rax"] = DB
    r = e.emu.x86_emulate_instruction()
    assert r.outcome is EmulationOutcome.FAILURE and r.exit_reason == KVM_EXIT_INTERNAL_ERROR
    assert e.regs["rip"] == layout.CODE_GPA
    assert e.ev["kvm.emulate.failure"] == 1


def test_emulation_failure_at_cpl3_queues_ud():
    """handle_emulation_failure: outside CPL 0 KVM queues #UD and resumes the guest."""
    e = Env(cpl=3)
    e.raw(bytes([0x06]))  # PUSH ES: invalid in 64-bit mode
    r = e.emu.x86_emulate_instruction()
    assert r.outcome is EmulationOutcome.EXCEPTION and r.exception.vector == UD_VECTOR
    assert r.exit_reason is None


def test_emulation_failure_outside_long_mode():
    """Only 64-bit mode is modelled: anything else is a defined failure result."""
    e = Env()
    e.regs["efer"] = 0
    e.code(Instruction.create_mem_reg(Code.MOV_RM32_R32, mem(Register.RAX), Register.ECX))
    assert e.emu.x86_emulate_instruction().outcome is EmulationOutcome.FAILURE


def test_skip_by_decode():
    """EMULTYPE_SKIP: decode only, RIP += length (kvm.skip.decode); no access is made."""
    e = Env()
    fd = EventFd()
    e.ioeventfds.assign(fd, DB, 0)
    insn = e.code(Instruction.create_mem_i32(Code.MOV_RM32_IMM32, mem(Register.RAX, displ=0x10, displ_size=1), 1))
    e.regs["rax"] = DB - 0x10
    r = e.emu.skip_instruction()
    assert r.outcome is EmulationOutcome.CONTINUE and r.insn_len == len(insn)
    assert e.regs["rip"] == layout.CODE_GPA + len(insn)
    assert fd.count == 0 and e.ev["kvm.skip.decode"] == 1 and e.ev["kvm.emulate.decode"] == 1
    assert e.ev["kvm.emulate"] == 0


def test_skip_failure_exits_even_at_cpl3():
    """handle_emulation_failure with EMULTYPE_SKIP always prepares an internal-error exit."""
    e = Env(cpl=3)
    e.raw(bytes([0x06]))
    r = e.emu.x86_emulate_instruction(EMULTYPE_SKIP)
    assert r.outcome is EmulationOutcome.FAILURE and e.regs["rip"] == layout.CODE_GPA


def test_fetch_across_page_boundary_fetches_twice():
    """__do_insn_fetch_bytes: first up to the end of the page, more only when decode needs it."""
    e = Env()
    at = layout.CODE_GPA + 0x1000 - 3
    insn = e.code(Instruction.create_mem_i32(Code.MOV_RM32_IMM32, mem(Register.RAX), 7), at=at)
    e.regs["rax"] = DB
    r = e.emu.x86_emulate_instruction()
    assert len(insn) == 6 and r.mmio.data == 7
    assert e.ev["kvm.emulate.fetch"] == 2


def test_fetch_fault_injects_page_fault():
    """A fetch whose software walk faults injects #PF (fetch, with NX on: I/D bit)."""
    e = Env()
    e.regs["rip"] = 0x0  # page 0 is not mapped
    r = e.emu.x86_emulate_instruction()
    assert r.outcome is EmulationOutcome.EXCEPTION and r.exception.vector == PF_VECTOR
    assert r.exception.error_code & PFERR_FETCH_MASK and r.exception.cr2 == 0


def test_user_access_to_supervisor_page_faults_with_user_bit():
    """SDM 4.6: a CPL3 access to a page without U/S at every level faults; the error code has
    U and W (FNAME(walk_addr_generic) permission check)."""
    e = Env(cpl=3, user_pages=False)
    r = e.emu.x86_emulate_instruction()
    assert r.exception.vector == PF_VECTOR  # the fetch itself
    assert r.exception.error_code & PFERR_USER_MASK
    e = Env(cpl=0)
    e.pt.map(layout.MMIO_BASE, layout.MMIO_BASE, us=False, w=False)
    e.code(Instruction.create_mem_reg(Code.MOV_RM32_R32, mem(Register.RAX), Register.ECX))
    e.regs["rax"] = DB
    r = e.emu.x86_emulate_instruction()  # CR0.WP=1: supervisor write to a read-only page
    assert r.exception.vector == PF_VECTOR and r.exception.error_code & PFERR_WRITE_MASK


def test_walk_sets_accessed_and_dirty():
    """FNAME(update_accessed_dirty_bits): A on every level, D on the leaf for a write."""
    e = Env()
    e.code(Instruction.create_mem_reg(Code.MOV_RM32_R32, mem(Register.RAX), Register.ECX))
    e.regs["rax"] = layout.DATA_GPA
    e.emu.x86_emulate_instruction()
    pte = e.pt.get_entry(layout.DATA_GPA, 1)
    assert pte & (1 << 5) and pte & (1 << 6)
    code_pte = e.pt.get_entry(layout.CODE_GPA, 1)
    assert code_pte & (1 << 5) and not code_pte & (1 << 6)
