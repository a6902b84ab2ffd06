"""Hostile guests on /dev/kvm: every exit a guest can cause is handled by the run loop, every
run ends in a defined outcome, nothing leaks.

The first half pins down, one program each, the exits the brief names: string I/O with a
count above 1, MMIO of odd sizes (page-crossing fragments, 16-byte SSE accesses split into
8-byte ones, REP MOVSB into the hole, RAM-to-hole crossings), the done port at the wrong
width, never-ending loops, wild page tables, junk IDTs. The second half runs a bounded sample
of generated hostile guests (fixed seed) and checks outcomes and resources.
"""

from __future__ import annotations

import struct
import time

import pytest
from iced_x86 import Code, Instruction, MemoryOperand, Register as R, RepPrefixKind

from fastmmio import layout
from fastmmio.errors import GuestError
from fastmmio.fuzz import hostile as H
from fastmmio.fuzz.program import DEFINED_OUTCOMES, DONE, REFUSED, SHUTDOWN, WATCHDOG, Program, ProgramBuilder, plain_spec
from fastmmio.fuzz.runner import ResourceSnapshot, campaign, compare, run_program
from fastmmio.image import Region
from fastmmio.guest.paging import build_page_tables
from fastmmio.machine import IoEventFdSpec, MachineSpec
from fastmmio.real.backend import RealBackend

SCRATCH = H.SCRATCH_GPA
DEVICE = layout.DEVICE_READ_VALUE  # 0x1122334455667788: what a userspace read returns


def program(b: ProgramBuilder, cpl: int, spec: MachineSpec | None = None, **opts) -> Program:
    return Program("test", "test", cpl, b.encode(), spec or plain_spec(), opts)


def mem(reg=R.RSI, displ: int = 0) -> MemoryOperand:
    return MemoryOperand(reg, displ=displ, displ_size=1 if displ else 0)


def user_exits(session, kind: str):
    """Every userspace exit of the last batch, from the run loop's histogram:
    {(addr, size, is_write, data): count} for one kind ("io" or "mmio")."""
    return {k[1:]: n for k, n in session.loop.exit_histogram.items() if k[0] == kind}


# ---- string I/O -------------------------------------------------------------------------------


def test_rep_insw_with_count_above_one_fills_the_buffer(kvm_device, guest_cpl):
    """REP INSW of 100: KVM's emulator reads ahead (pio_in_emulated, arch/x86/kvm/x86.c) and
    exits once with kvm_run.io.count > 1; the run loop must answer count x size bytes at
    io.data_offset (Documentation/virt/kvm/api.rst, KVM_EXIT_IO), which the guest stores."""
    b = ProgramBuilder().mov(R.RDX, 0x1234).mov(R.RDI, SCRATCH).mov(R.RCX, 100)
    b.emit(Instruction.create_insw(64, RepPrefixKind.REPE)).done()
    with RealBackend(kvm_device).open(program(b, guest_cpl).machine()) as s:
        res = s.run_batch(1)
        assert user_exits(s, "io") == {(0x1234, 2, False, DEVICE & 0xFFFF): 100}
        assert sum(e.count for e in res.exits) == 100 and len(res.exits) < 100  # batched
        assert s.read_guest(SCRATCH, 202) == struct.pack("<H", DEVICE & 0xFFFF) * 100 + b"\0\0"
        regs = s.regs()
        assert regs["rcx"] == 0 and regs["rdi"] == SCRATCH + 200


def test_rep_insb_downwards_with_df_set(kvm_device, guest_cpl):
    """STD; REP INSB: the string moves down (SDM Vol. 2A, INS: RDI decremented when DF=1); the
    batched read-ahead must fill the buffer in the same order."""
    b = ProgramBuilder().mov(R.RDX, 0x1234).mov(R.RDI, SCRATCH + 99).mov(R.RCX, 100)
    b.emit(Instruction.create(Code.STD), Instruction.create_insb(64, RepPrefixKind.REPE),
           Instruction.create(Code.CLD)).done()
    with RealBackend(kvm_device).open(program(b, guest_cpl).machine()) as s:
        s.run_batch(1)
        assert s.read_guest(SCRATCH - 1, 102) == b"\0" + bytes([DEVICE & 0xFF]) * 100 + b"\0"
        assert s.regs()["rdi"] == SCRATCH - 1


def test_rep_outsb_every_element_reaches_userspace_in_order(kvm_device, guest_cpl):
    """REP OUTSB of 10 distinct bytes: each element is one KVM_EXIT_IO write (em_out passes a
    count of 1), recorded with its own value, in order."""
    b = ProgramBuilder().mov(R.RDX, 0x1234).mov(R.RSI, SCRATCH).mov(R.RCX, 10)
    b.emit(Instruction.create_outsb(64, R.NONE, RepPrefixKind.REPE)).done()
    src = Region(SCRATCH, bytes(range(10, 20)), "src")
    with RealBackend(kvm_device).open(program(b, guest_cpl, extra_regions=(src,)).machine()) as s:
        res = s.run_batch(1)
        assert sum(e.count for e in res.exits) == 10
        assert [e.data for e in res.exits] == list(range(10, 20))
        assert all((e.kind, e.addr, e.size, e.is_write) == ("io", 0x1234, 1, True) for e in res.exits)


def test_ins_into_the_mmio_hole(kvm_device, guest_cpl):
    """REP INSB with RDI in the hole: the port read exits to userspace, then the emulator's
    write of those bytes to the hole exits as MMIO writes (at most 8 bytes each,
    KVM_EXIT_MMIO data[8]), carrying exactly the bytes userspace answered."""
    b = ProgramBuilder().mov(R.RDX, 0x1234).mov(R.RDI, layout.MMIO_BASE).mov(R.RCX, 10)
    b.emit(Instruction.create_insb(64, RepPrefixKind.REPE)).done()
    with RealBackend(kvm_device).open(program(b, guest_cpl).machine()) as s:
        res = s.run_batch(1)
        assert sum(n for n in user_exits(s, "io").values()) == 10
        writes = [e for e in res.exits if e.kind == "mmio"]
        assert all(e.is_write and e.size <= 8 for e in writes)
        assert sum(e.size for e in writes) == 10
        data = b"".join(e.data.to_bytes(e.size, "little") for e in writes)
        assert data == bytes([DEVICE & 0xFF]) * 10
        assert writes[0].addr == layout.MMIO_BASE


def test_done_port_at_the_wrong_width(kvm_device, guest_cpl):
    """IN from the done port is an ordinary userspace read; an OUT of any width to it ends the
    batch (the run loop looks at the port, not the width)."""
    b = ProgramBuilder().mov(R.RDX, layout.DONE_PORT)
    b.emit(Instruction.create_reg_reg(Code.IN_EAX_DX, R.EAX, R.DX),
           Instruction.create_reg_reg(Code.OUT_DX_AX, R.DX, R.AX)).raw(b"\x0f\x0b")
    with RealBackend(kvm_device).open(program(b, guest_cpl).machine()) as s:
        res = s.run_batch(1)
        assert [(e.kind, e.addr, e.size, e.is_write) for e in res.exits] == [("io", layout.DONE_PORT, 4, False)]


# ---- MMIO of odd sizes -------------------------------------------------------------------------


def test_page_crossing_mmio_store_is_split_at_the_page(kvm_device, guest_cpl):
    """An 8-byte store 3 bytes before a page end in the hole: the emulator splits it at the
    page boundary (emulator_read_write(), arch/x86/kvm/x86.c) into a 3-byte and a 5-byte
    KVM_EXIT_MMIO, the low bytes first."""
    addr = layout.MMIO_BASE + 0xFFD
    b = ProgramBuilder().mov(R.RSI, addr).mov(R.RAX, 0x1122334455667788)
    b.emit(Instruction.create_mem_reg(Code.MOV_RM64_R64, mem(), R.RAX)).done()
    with RealBackend(kvm_device).open(program(b, guest_cpl).machine()) as s:
        res = s.run_batch(1)
    assert [(e.addr, e.size, e.is_write, e.data) for e in res.exits] == [
        (addr, 3, True, 0x667788), (addr + 3, 5, True, 0x1122334455)
    ]


def test_page_crossing_mmio_load_assembles_odd_fragments(kvm_device, guest_cpl):
    """An 8-byte load across a page end in the hole: a 3-byte and a 5-byte read exit; the run
    loop answers each with the first 3 and 5 bytes of the device value, and the guest sees
    them side by side."""
    addr = layout.MMIO_BASE + 0x2FFD
    b = ProgramBuilder().mov(R.RSI, addr)
    b.emit(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RBX, mem())).done()
    with RealBackend(kvm_device).open(program(b, guest_cpl).machine()) as s:
        res = s.run_batch(1)
        assert [(e.addr, e.size, e.is_write) for e in res.exits] == [(addr, 3, False), (addr + 3, 5, False)]
        assert s.regs()["rbx"] == (DEVICE & 0xFFFFFF) | ((DEVICE & 0xFF_FFFF_FFFF) << 24)


@pytest.mark.parametrize("code", [Code.MOVUPS_XMMM128_XMM, Code.MOVDQU_XMMM128_XMM])
def test_sse_16_byte_store_is_two_8_byte_exits(kvm_device, guest_cpl, code):
    """MOVUPS/MOVDQU of 16 bytes to an unaligned hole address: KVM_EXIT_MMIO carries at most
    8 bytes (struct kvm_run mmio.data[8]), so the emulator's 16-byte write is two exits,
    the low half first."""
    addr = layout.MMIO_BASE + 0x11
    b = ProgramBuilder().mov(R.RSI, SCRATCH)
    b.emit(Instruction.create_reg_mem(Code.MOVUPS_XMM_XMMM128, R.XMM0, mem()))
    b.mov(R.RSI, addr).emit(Instruction.create_mem_reg(code, mem(), R.XMM0)).done()
    src = Region(SCRATCH, bytes(range(16)), "src")
    with RealBackend(kvm_device).open(program(b, guest_cpl, extra_regions=(src,)).machine()) as s:
        res = s.run_batch(1)
    assert [(e.addr, e.size, e.is_write, e.data) for e in res.exits] == [
        (addr, 8, True, 0x0706050403020100), (addr + 8, 8, True, 0x0F0E0D0C0B0A0908)
    ]


def test_sse_16_byte_load_from_the_hole(kvm_device, guest_cpl):
    """MOVDQU xmm, [hole]: two 8-byte read exits, both answered; the guest stores the 16
    bytes to RAM."""
    b = ProgramBuilder().mov(R.RSI, layout.MMIO_BASE + 0x20)
    b.emit(Instruction.create_reg_mem(Code.MOVDQU_XMM_XMMM128, R.XMM1, mem()))
    b.mov(R.RSI, SCRATCH).emit(Instruction.create_mem_reg(Code.MOVDQU_XMMM128_XMM, mem(), R.XMM1)).done()
    with RealBackend(kvm_device).open(program(b, guest_cpl).machine()) as s:
        res = s.run_batch(1)
        assert [(e.size, e.is_write) for e in res.exits] == [(8, False), (8, False)]
        assert s.read_guest(SCRATCH, 16) == DEVICE.to_bytes(8, "little") * 2


def test_store_crossing_from_ram_into_the_hole(kvm_device, guest_cpl):
    """An 8-byte store whose first 4 bytes are RAM (linear 0x3FF000 mapped to a RAM page) and
    last 4 the hole: the RAM half lands in memory, only the hole half exits."""
    tables = H.map_page(build_page_tables(user=guest_cpl == 3), H.BELOW_HOLE, H.REMAP_RAM_GPA,
                        H._pte_flags(guest_cpl))
    b = ProgramBuilder().mov(R.RSI, layout.MMIO_BASE - 4).mov(R.RAX, 0x1122334455667788)
    b.emit(Instruction.create_mem_reg(Code.MOV_RM64_R64, mem(), R.RAX)).done()
    with RealBackend(kvm_device).open(program(b, guest_cpl, page_tables=tables).machine()) as s:
        res = s.run_batch(1)
        assert [(e.addr, e.size, e.is_write, e.data) for e in res.exits] == [
            (layout.MMIO_BASE, 4, True, 0x11223344)
        ]
        assert s.read_guest(H.REMAP_RAM_GPA + 0xFFC, 4) == bytes.fromhex("88776655")


def test_rep_movsb_into_the_hole(kvm_device, guest_cpl):
    """REP MOVSB of 20 bytes from RAM into the hole: exits at consecutive addresses whose data,
    concatenated, is the source."""
    b = ProgramBuilder().mov(R.RSI, SCRATCH).mov(R.RDI, layout.MMIO_BASE + 3).mov(R.RCX, 20)
    b.emit(Instruction.create_movsb(64, R.NONE, RepPrefixKind.REPE)).done()
    src = Region(SCRATCH, bytes(range(100, 120)), "src")
    with RealBackend(kvm_device).open(program(b, guest_cpl, extra_regions=(src,)).machine()) as s:
        res = s.run_batch(1)
    addr = layout.MMIO_BASE + 3
    data = b""
    for e in res.exits:
        assert e.kind == "mmio" and e.is_write and e.addr == addr
        addr += e.size
        data += e.data.to_bytes(e.size, "little")
    assert data == bytes(range(100, 120))


def test_unemulatable_mmio_access_is_a_kvm_error(kvm_device, guest_cpl):
    """MOVQ [hole], xmm0 (66 0F D6): KVM's emulator has no such opcode (twobyte_table of
    arch/x86/kvm/emulate.c), so KVM_EXIT_INTERNAL_ERROR (emulation), reported with the
    instruction bytes as GuestError kind 'internal-error'."""
    b = ProgramBuilder().mov(R.RSI, layout.MMIO_BASE)
    b.emit(Instruction.create_mem_reg(Code.MOVQ_XMMM64_XMM, mem(), R.XMM0)).done()
    with RealBackend(kvm_device).open(program(b, guest_cpl).machine()) as s:
        with pytest.raises(GuestError) as info:
            s.run_batch(1)
    assert info.value.kind == "internal-error"
    assert "66 0f d6 06" in str(info.value)


# ---- loops, faults, wild tables -----------------------------------------------------------------


def _loop(body: list[Instruction], pre: ProgramBuilder | None = None) -> ProgramBuilder:
    b = pre or ProgramBuilder()
    top = b.asm.label()
    b.asm.bind(top)
    b.emit(*body)
    b.asm.branch(Code.JMP_REL32_64, top)
    return b


LOOPS = {
    "jmp-self": (lambda: ProgramBuilder().raw(b"\xeb\xfe"), ()),
    "cpuid": (lambda: _loop([Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EAX, R.EAX), Instruction.create(Code.CPUID)]), ()),
    "pio-eventfd": (
        lambda: _loop([Instruction.create_reg_reg(Code.OUT_DX_AL, R.DX, R.AL)], ProgramBuilder().mov(R.RDX, layout.DOORBELL_PORT)),
        (IoEventFdSpec("pio-doorbell", True, layout.DOORBELL_PORT, 1),),
    ),
    "mmio-eventfd": (
        lambda: _loop([Instruction.create_mem_reg(Code.MOV_RM8_R8, mem(), R.AL)], ProgramBuilder().mov(R.RSI, layout.DOORBELL_GPA)),
        (IoEventFdSpec("mmio-doorbell", False, layout.DOORBELL_GPA, 0),),
    ),
    "user-exits": (
        lambda: _loop([Instruction.create_reg_reg(Code.OUT_DX_AL, R.DX, R.AL)], ProgramBuilder().mov(R.RDX, 0x1234)),
        (),
    ),
}


@pytest.mark.parametrize("name", list(LOOPS))
def test_never_ending_loops_stop_at_the_watchdog(kvm_device, guest_cpl, name, open_fds):
    """A guest that never reaches the done port, spinning natively, in exits KVM handles in
    the kernel, or in userspace exits, is stopped by the watchdog within its bound, as a
    GuestError of kind 'watchdog'; the session then closes without leaving an fd."""
    make, evs = LOOPS[name]
    spec = MachineSpec(memslots=plain_spec().memslots, ioeventfds=evs, mmio_holes=plain_spec().mmio_holes)
    before = open_fds()
    bound = 0.3
    t0 = time.monotonic()
    with RealBackend(kvm_device, watchdog_s=bound).open(program(make(), guest_cpl, spec).machine()) as s:
        with pytest.raises(GuestError) as info:
            s.run_batch(1)
    assert info.value.kind == "watchdog"
    assert bound <= time.monotonic() - t0 < bound + 3.0
    assert open_fds() == before


@pytest.mark.parametrize("cr3", [H.JUNK_GPA, layout.MMIO_BASE, layout.RO_BASE, H.OUTSIDE_GPA, layout.CODE_GPA])
def test_cr3_at_junk_or_outside_memory(kvm_device, guest_cpl, cr3):
    """CR3 at a page of junk, the MMIO hole, the read-only slot, beyond every memslot or the
    code itself: the first fetch cannot be translated (or translates to junk); the run ends
    in a defined outcome, never a host error."""
    b = ProgramBuilder().done()
    junk = Region(H.JUNK_GPA, bytes((i * 37 + 11) & 0xFF for i in range(layout.PAGE_SIZE)), "junk")
    out = run_program(program(b, guest_cpl, cr3=cr3, extra_regions=(junk,)), kvm_device, 0.5)
    assert out.outcome in DEFINED_OUTCOMES - {DONE, WATCHDOG}, out


def test_cr3_with_reserved_bits_is_refused_or_shut_down(kvm_device, guest_cpl):
    """CR3 with a bit above MAXPHYADDR: KVM_SET_SREGS refuses it (kvm_is_valid_sregs(): CR3
    must be a legal GPA in long mode), which fastmmio reports before the guest runs."""
    b = ProgramBuilder().done()
    out = run_program(program(b, guest_cpl, cr3=layout.PML4_GPA | (1 << 60)), kvm_device, 0.5)
    assert out.outcome in (REFUSED, SHUTDOWN), out
    if out.outcome == REFUSED:
        assert "KVM_SET_SREGS refused" in out.message


def test_junk_idt_escalates_to_a_shutdown(kvm_device, guest_cpl):
    """UD2 with an IDT of junk: delivering #UD fails, then #DF, then a triple fault
    (SDM Vol. 3A 6.15, interrupt 8): KVM_EXIT_SHUTDOWN."""
    b = ProgramBuilder().emit(Instruction.create(Code.UD2)).done()
    idt = bytes((i * 101 + 7) & 0xFF for i in range(4096))
    out = run_program(program(b, guest_cpl, idt=idt), kvm_device, 0.5)
    assert out.outcome == SHUTDOWN, out


# ---- generated hostile guests --------------------------------------------------------------------

SEED = 20240917
RUNS = 300


@pytest.mark.slow
def test_bounded_hostile_sample(kvm_device):
    """300 generated hostile guests (fixed seed, CPL3 and CPL0, every kind): each run ends in
    a defined outcome that its program allows; no exception escapes the backend; no fd, KVM
    object, mapping, thread or address space is left behind (checked every 50 runs)."""
    programs = (H.generate(SEED, i, cpls=(3, 0)) for i in range(RUNS))
    summary = campaign(programs, runs=RUNS, device=kvm_device)
    report = "\n".join(summary.lines())
    assert summary.runs == RUNS, report
    assert summary.crashes == 0, report
    assert summary.unexpected == 0, report
    assert summary.leaks == 0 and summary.leak_checks >= RUNS // 50, report
    assert set(summary.by_kind) == set(H.KINDS), report
    assert {label.split(":")[0] for label in summary.outcomes} <= DEFINED_OUTCOMES, report
    assert summary.first is not None and summary.last is not None
    assert summary.last.vms() == 0 and summary.last.kvm_maps == summary.first.kvm_maps


def test_leak_check_sees_a_leaked_vm(kvm_device):
    """The leak check can fail: a session left open shows as kvm-vm, kvm-vcpu and eventfd fds
    and a KVM mapping more than before."""
    base = ResourceSnapshot.take()
    spec = MachineSpec(memslots=plain_spec().memslots,
                       ioeventfds=(IoEventFdSpec("e", True, layout.DOORBELL_PORT, 1),))
    s = RealBackend(kvm_device).open(program(ProgramBuilder().done(), 3, spec).machine())
    try:
        leaks = compare(base, ResourceSnapshot.take())
        text = "; ".join(leaks)
        assert "kvm-vm fds 0 -> 1" in text and "kvm-vcpu fds 0 -> 1" in text, text
        assert "eventfd fds" in text and "KVM mappings" in text, text
    finally:
        s.close()
    assert compare(base, ResourceSnapshot.take()) == []
