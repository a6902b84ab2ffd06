"""Hostile guests: programs written to break the host side, not to measure anything.

Each *kind* is a generator ``(rng, cpl) -> Program`` (see :mod:`fastmmio.fuzz.program`) that
reuses the guest builder's page tables, GDT, TSS and long-mode boot state
(:func:`fastmmio.guest.raw.build_raw_image`) and perturbs exactly one thing:

``random-bytes``
    random bytes as code (raw, or filtered to what iced-x86 decodes), random registers and
    RFLAGS bits, a random machine (ioeventfds, coalesced zones).
``invalid-opcode``
    UD2/UD1/UD0, opcodes invalid in 64-bit mode, reserved 0F xx encodings, LOCK on a
    register operand, an instruction longer than 15 bytes (SDM Vol. 2A 2.3.11), and at CPL3
    privileged instructions (#GP, SDM Vol. 3A 5.9).
``triple-fault``
    an exception of many vectors with no IDT, a junk IDT, gates to an unmapped handler, a
    not-present gate, a handler that faults again (SDM Vol. 3A 6.15 "Exception and
    Interrupt Reference", Interrupt 8: a fault while delivering #DF is a triple fault), a #PF
    handler that returns to the faulting instruction forever, and at CPL0 LIDT with junk.
``wild-tables``
    CR3 at junk, the MMIO hole, the read-only slot, beyond every memslot, or with reserved
    bits; one paging-structure entry on the path of the code, stack or data made junk,
    pointed outside memory or into the hole, given reserved bits (PS in a PML4E, XD with
    EFER.NXE=0: SDM Vol. 3A 4.5 Table 4-14 and 4.6.1), stripped of P, U/S or R/W, pointed
    back at a paging structure; at CPL0 also ``MOV CR3`` with junk in the guest code.
``io``
    IN/OUT of 1, 2 and 4 bytes (imm8 and DX forms), INS/OUTS with and without REP, DF set or
    clear, buffers in RAM, the read-only slot and the MMIO hole, ports with ioeventfds,
    coalesced PIO, the done port at the wrong width, ports that run past 0xFFFF.
``mmio-odd``
    MMIO with odd lengths: unaligned and page-crossing accesses (hole to hole, RAM to hole,
    read-only slot to hole), 16-byte SSE loads and stores (MOVUPS, MOVDQU, MOVAPS, MOVNTDQ),
    REP MOVS/STOS/LODS/CMPS with MMIO operands, read-modify-write with LOCK, the stack in
    MMIO, CMPXCHG16B, FXSAVE, MASKMOVDQU, and a jump into the hole.
``loop``
    never-ending loops: ``jmp $``, PAUSE loops, loops of in-kernel exits (CPUID, an ioeventfd
    port or MMIO doorbell, coalesced MMIO), of userspace exits, a REP INS with an enormous
    count, and VMCALL at CPL0 (which under PVM never returns from KVM_RUN, as measured on these hosts).

``Program.allowed`` is the set of outcomes the program may end in on any KVM host (wide
where hosts legitimately differ); the runner reports any other outcome, and anything that is
not a defined outcome at all, as a finding.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

from iced_x86 import Code, Decoder, Instruction, MemoryOperand, Register, RepPrefixKind

from fastmmio import layout
from fastmmio.errors import UsageError, did_you_mean
from fastmmio.fuzz.program import (
    ANY,
    DONE,
    KVM_ERROR,
    SHUTDOWN,
    WATCHDOG,
    Program,
    ProgramBuilder,
    plain_spec,
    random_spec,
)
from fastmmio.guest import gdt
from fastmmio.image import Region
from fastmmio.guest.paging import ADDR_MASK, PTE_P, PTE_PS, PTE_RW, PTE_US, PageTables, build_page_tables
from fastmmio.machine import CoalescedZone, IoEventFdSpec, MachineSpec

R = Register
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_REG = {name: getattr(Register, name.upper()) for name in GPRS}
PAGE = layout.PAGE_SIZE

# RAM areas the generators use (all inside slot 0 and identity-mapped with U/S and R/W)
SCRATCH_GPA = layout.DATA_GPA  # 0x40000: buffers for string I/O and MOVS
SCRATCH_SIZE = 0x20000
HANDLER_GPA = 0x0007_0000  # exception handlers of a generated IDT
JUNK_GPA = 0x0008_0000  # junk pages (fake paging structures)
REMAP_RAM_GPA = 0x0009_0000  # RAM page mapped at linear 0x3FF000, just below the hole
BELOW_HOLE = layout.MMIO_BASE - PAGE  # linear 0x3FF000 -> REMAP_RAM_GPA (RAM, then the hole)
AFTER_RO = layout.RO_BASE + layout.RO_SIZE  # linear 0x210000 -> a hole page (RO slot, then MMIO)
AFTER_RO_TARGET = layout.MMIO_BASE + 0x2000
OUTSIDE_GPA = 0x0000_0001_0000_0000  # beyond every memslot, below any MAXPHYADDR (>= 36)

RFLAGS_DF = 1 << 10
RFLAGS_TF = 1 << 8
RFLAGS_IOPL3 = 3 << 12
RFLAGS_BASE = 0x2


# ------------------------------------------------------------------------------------------
# addresses, ports, values
# ------------------------------------------------------------------------------------------


def mmio_address(rng: random.Random, width: int = 1) -> int:
    """An address in the MMIO hole: the doorbell, the coalesced page, anywhere, or so close
    to a page end that ``width`` bytes cross it."""
    r = rng.random()
    if r < 0.25:
        page = rng.randrange(layout.MMIO_SIZE // PAGE - 1)
        return layout.MMIO_BASE + page * PAGE + PAGE - rng.randint(1, max(1, width - 1) if width > 1 else 1)
    if r < 0.4:
        return layout.DOORBELL_GPA + rng.choice((0, 0, 1, 2, 3, 4, 7))
    if r < 0.55:
        return layout.COALESCED_GPA + rng.randrange(PAGE - width)
    return layout.MMIO_BASE + rng.randrange(layout.MMIO_SIZE - width - PAGE)


def interesting_value(rng: random.Random) -> int:
    """A register value that makes random code touch something: the hole, the read-only
    slot, RAM, the page tables, small counts, ports, 0, junk, non-canonical addresses."""
    r = rng.random()
    if r < 0.2:
        return mmio_address(rng, 8)
    if r < 0.3:
        return layout.RO_BASE + rng.randrange(layout.RO_SIZE)
    if r < 0.45:
        return SCRATCH_GPA + rng.randrange(SCRATCH_SIZE)
    if r < 0.5:
        return layout.PML4_GPA + rng.randrange(layout.PAGE_TABLES_END - layout.PML4_GPA)
    if r < 0.62:
        return rng.choice((0, 1, 2, 3, 8, 16, 64, 255, 4096))
    if r < 0.72:
        return rng.choice((layout.DOORBELL_PORT, layout.COALESCED_PORT, layout.DONE_PORT, rng.randrange(0x10000)))
    if r < 0.8:
        return rng.choice((0x8000_0000_0000_0000, 0x0000_8000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF))
    return rng.getrandbits(64)


def port(rng: random.Random) -> int:
    """A port: the doorbell (ioeventfds live there), the coalesced PIO port, well-known
    legacy ports (no in-kernel device here: no irqchip, no PIT), or any."""
    return rng.choice(
        (
            layout.DOORBELL_PORT, layout.DOORBELL_PORT, layout.COALESCED_PORT, 0x4D0, 0x80, 0xCF8,
            0xCFC, 0x3F8, 0x70, 0x71, 0x60, 0x20, 0x40, 0x1F0, rng.randrange(0x10000), rng.randrange(0x10000),
        )
    )  # fmt: skip


def _mem(reg: Register = R.RSI, displ: int = 0) -> MemoryOperand:
    if displ:
        return MemoryOperand(reg, displ=displ, displ_size=4 if not -128 <= displ < 128 else 1)
    return MemoryOperand(reg)


def _lock(ins: Instruction) -> Instruction:
    ins.has_lock_prefix = True
    return ins


def _rep(rng: random.Random) -> RepPrefixKind:
    return RepPrefixKind.REPE if rng.random() < 0.8 else RepPrefixKind.NONE


def _set_flags(b: ProgramBuilder, rng: random.Random) -> bool:
    """CLD or STD at random; True when DF is set (string operations then run downwards)."""
    down = rng.random() < 0.3
    b.emit(Instruction.create(Code.STD if down else Code.CLD))
    return down


def _string_span(rng: random.Random, count: int, width: int, down: bool, lo: int, size: int) -> int:
    """A start address for ``count`` elements of ``width`` bytes that stays in [lo, lo+size)
    whichever way DF says the operation moves."""
    span = count * width
    if span >= size - 2 * PAGE:
        raise UsageError("string span too large for its area")
    if down:
        return lo + span + rng.randrange(size - span - width)
    return lo + rng.randrange(size - span - width)


# ------------------------------------------------------------------------------------------
# page-table surgery (on the image's tables: the guest cannot write CR3 at CPL3)
# ------------------------------------------------------------------------------------------


def entry_offsets(tables: PageTables, linear: int) -> list[int]:
    """Byte offsets, in ``tables.data``, of the PML4E, PDPTE, PDE and PTE that translate
    ``linear`` (SDM Vol. 3A 4.5, Figure 4-8), as far as the walk stays in the tables."""
    offsets = []
    table = tables.base
    for shift in (39, 30, 21, 12):
        off = table - tables.base + ((linear >> shift) & 0x1FF) * 8
        if not 0 <= off < len(tables.data):
            break
        offsets.append(off)
        (entry,) = struct.unpack_from("<Q", tables.data, off)
        if not entry & PTE_P:
            break
        table = entry & ADDR_MASK
    return offsets


def with_entry(tables: PageTables, offset: int, value: int) -> PageTables:
    """The tables with the 8-byte entry at ``offset`` replaced."""
    data = bytearray(tables.data)
    struct.pack_into("<Q", data, offset, value & 0xFFFF_FFFF_FFFF_FFFF)
    return PageTables(tables.base, bytes(data), tables.user)


def map_page(tables: PageTables, linear: int, gpa: int, flags: int) -> PageTables:
    """Point the PTE of ``linear`` at ``gpa``; its page table must already exist."""
    offs = entry_offsets(tables, linear)
    if len(offs) != 4:
        raise UsageError(f"no page table covers linear {linear:#x}")
    return with_entry(tables, offs[3], (gpa & ADDR_MASK) | flags)


def _pte_flags(cpl: int) -> int:
    return PTE_P | PTE_RW | (PTE_US if cpl == 3 else 0) | (1 << 5) | (1 << 6)


# ------------------------------------------------------------------------------------------
# IDT
# ------------------------------------------------------------------------------------------


def idt_gate(handler: int, selector: int = gdt.SEL_KERNEL_CODE, dpl: int = 0, present: int = 1,
             gate_type: int = 0xE, ist: int = 0) -> bytes:
    """A 16-byte 64-bit IDT gate descriptor (SDM Vol. 3A 6.14.1, Figure 6-8): type 0xE
    interrupt gate, 0xF trap gate."""
    lo = (handler & 0xFFFF) | (selector << 16) | ((ist & 7) << 32) | ((gate_type & 0xF) << 40)
    lo |= (dpl & 3) << 45 | (present & 1) << 47 | ((handler >> 16) & 0xFFFF) << 48
    hi = (handler >> 32) & 0xFFFF_FFFF
    return struct.pack("<QQ", lo, hi)


def _handler_code(kind: str) -> bytes:
    """Exception handler bodies (placed at HANDLER_GPA)."""
    b = ProgramBuilder()
    if kind == "refault":  # fault again while handling: #DF, then a triple fault
        b.emit(Instruction.create(Code.UD2))
    elif kind == "return-with-code":  # drop the error code and return to the faulting insn
        b.emit(Instruction.create_reg_i32(Code.ADD_RM64_IMM8, R.RSP, 8), Instruction.create(Code.IRETQ))
    elif kind == "return":
        b.emit(Instruction.create(Code.IRETQ))
    else:  # "spin"
        b.raw(b"\xeb\xfe")
    return b.encode(HANDLER_GPA)


# ------------------------------------------------------------------------------------------
# kinds
# ------------------------------------------------------------------------------------------

Generated = tuple[str, ProgramBuilder, dict, frozenset[str]]  # variant, code, image options, allowed


def _random_code(rng: random.Random) -> bytes:
    """Random bytes; half the time only what iced-x86 decodes as valid instructions."""
    data = rng.randbytes(rng.randint(1, 96))
    if rng.random() < 0.5:
        return data
    out = bytearray()
    for ins in Decoder(64, data, ip=layout.CODE_GPA):
        if ins.code != Code.INVALID:
            out += data[ins.ip - layout.CODE_GPA : ins.ip - layout.CODE_GPA + ins.len]
    return bytes(out) or data


def gen_random_bytes(rng: random.Random, cpl: int) -> Generated:
    b = ProgramBuilder()
    code = _random_code(rng)
    b.raw(code)
    b.done()
    opts: dict = {"gprs": {name: interesting_value(rng) for name in GPRS}}
    flags = RFLAGS_BASE | (RFLAGS_IOPL3 if rng.random() < 0.8 else 0)
    if rng.random() < 0.2:
        flags |= RFLAGS_DF
    if rng.random() < 0.05:
        flags |= RFLAGS_TF
    opts["rflags"] = flags
    if rng.random() < 0.1:
        opts["rsp"] = interesting_value(rng)
    return f"random-{len(code)}", b, opts, ANY


# (name, bytes): invalid in 64-bit mode or reserved (SDM Vol. 2D Appendix A opcode maps)
INVALID_OPCODES: tuple[tuple[str, bytes], ...] = (
    ("ud2", b"\x0f\x0b"), ("ud1", b"\x0f\xb9\xc0"), ("ud0", b"\x0f\xff\xc0"),
    ("push-es", b"\x06"), ("pop-es", b"\x07"), ("push-cs", b"\x0e"), ("push-ss", b"\x16"),
    ("pop-ss", b"\x17"), ("push-ds", b"\x1e"), ("pop-ds", b"\x1f"), ("daa", b"\x27"),
    ("das", b"\x2f"), ("aaa", b"\x37"), ("aas", b"\x3f"), ("pusha", b"\x60"), ("popa", b"\x61"),
    ("aam", b"\xd4\x0a"), ("aad", b"\xd5\x0a"), ("salc", b"\xd6"), ("into", b"\xce"),
    ("call-far-ptr", b"\x9a\x00\x00\x00\x00\x08\x00"), ("jmp-far-ptr", b"\xea\x00\x00\x00\x00\x08\x00"),
    ("grp1-82", b"\x82\xc0\x01"),
    ("lock-nop", b"\xf0\x90"), ("lock-add-reg", b"\xf0\x01\xc0"), ("lock-mov", b"\xf0\x89\x06"),
    ("too-long", b"\x66" * 15 + b"\x90"), ("0f04", b"\x0f\x04"), ("0f0a", b"\x0f\x0a"),
    ("0f0c", b"\x0f\x0c"), ("0f24", b"\x0f\x24\xc0"), ("0f36", b"\x0f\x36"), ("0fa6", b"\x0f\xa6\xc0"),
    ("xstore-via-only", b"\x0f\xa7\xc0"), ("0f7a", b"\x0f\x7a\xc0"), ("vex-bad-map", b"\xc4\xe0\x78\x10\xc0"),
    ("evex-no-avx512", b"\x62\xf1\x7c\x48\x10\xc0"), ("mov-to-cs", b"\x8e\xc8"),
    ("xsetbv-no-osxsave", b"\x0f\x01\xd1"), ("ymm-no-osxsave", b"\xc5\xfc\x10\xc0"),
)  # fmt: skip
# Instructions the guest's own CR4/XCR0 make invalid, but which PVM runs natively at CPL3 on
# the host's CR4.OSXSAVE and XCR0 (PVM's guest CR4 is virtual; measured on this project's
# host): they may complete there.
MAY_RUN_UNDER_PVM = frozenset({"ymm-no-osxsave", "evex-no-avx512"})

# privileged at CPL3: #GP(0) (SDM Vol. 3A 5.9 "Privileged Instructions")
PRIVILEGED: tuple[tuple[str, bytes], ...] = (
    ("hlt", b"\xf4"), ("mov-from-cr3", b"\x0f\x20\xd8"), ("mov-to-cr3", b"\x0f\x22\xd8"),
    ("wrmsr", b"\x0f\x30"), ("rdmsr", b"\x0f\x32"), ("invd", b"\x0f\x08"), ("wbinvd", b"\x0f\x09"),
    ("lgdt", b"\x0f\x01\x17"), ("lidt", b"\x0f\x01\x1f"), ("ltr", b"\x0f\x00\xd8"), ("clts", b"\x0f\x06"),
    ("swapgs", b"\x0f\x01\xf8"), ("sysexit", b"\x0f\x35"), ("sysret", b"\x48\x0f\x07"),
    ("syscall-sce-off", b"\x0f\x05"), ("sysenter", b"\x0f\x34"), ("invlpg", b"\x0f\x01\x3f"),
    ("mov-dr7", b"\x0f\x23\xf8"), ("rdpmc", b"\x0f\x33"), ("xsetbv", b"\x0f\x01\xd1"),
)  # fmt: skip


def gen_invalid_opcode(rng: random.Random, cpl: int) -> Generated:
    b = ProgramBuilder()
    table = INVALID_OPCODES + (PRIVILEGED if cpl == 3 else ())
    name, code = rng.choice(table)
    for _ in range(rng.randint(0, 3)):  # a few ordinary instructions first
        b.mov(_REG[rng.choice(GPRS[:4])], interesting_value(rng))
    b.raw(code)
    b.done()
    opts = {"gprs": {"rsi": SCRATCH_GPA, "rdi": SCRATCH_GPA + 0x100}}
    # Natively #UD/#GP at CPL3 is a shutdown; KVM's emulator (CPL0 under PVM, or code it
    # emulates) may instead fail to emulate: KVM_EXIT_INTERNAL_ERROR.
    allowed = {SHUTDOWN, KVM_ERROR} | ({DONE} if name in MAY_RUN_UNDER_PVM else set())
    return name, b, opts, frozenset(allowed)


# INT n vectors that PVM does not turn into an exception with an empty IDT: measured on this
# project's host, INT 0x1A (CPL3 and CPL0) and INT 0x1B (CPL0, emulated) return to the next
# instruction (the reason is not in the PVM sources read).
PVM_INT_RETURNS = frozenset({0x1A, 0x1B})


def _fault(b: ProgramBuilder, rng: random.Random, cpl: int) -> tuple[str, bool]:
    """Emit one faulting instruction sequence; returns (name, whether it may complete
    without a fault on some host)."""
    name = rng.choice(("div0", "int3", "int-n", "pf-null", "pf-unmapped", "gp-noncanonical",
                       "ss-noncanonical", "xm", "mf", "ud2", "bound-in-64"))
    if name == "div0":
        b.emit(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.ECX, R.ECX),
               Instruction.create_reg(Code.DIV_RM32, R.ECX))
        return name, False
    if name == "int3":
        b.emit(Instruction.create(Code.INT3))
        return name, False
    if name == "int-n":
        vector = rng.randrange(256)
        b.emit(Instruction.create_u32(Code.INT_IMM8, vector))
        return f"int-{vector:#x}", vector in PVM_INT_RETURNS
    if name == "pf-null":
        b.mov(R.RSI, rng.randrange(PAGE))
        b.emit(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem()))
        return name, False
    if name == "pf-unmapped":
        b.mov(R.RSI, rng.choice((0x50_0000, 0x3000_0000, 0x7FFF_FFFF_F000, AFTER_RO + 0x1000)))
        b.emit(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(), R.RAX))
        return name, False
    if name == "gp-noncanonical":
        b.mov(R.RSI, 0x0000_8000_0000_0000 | rng.getrandbits(40))
        b.emit(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem()))
        return name, False
    if name == "ss-noncanonical":
        b.mov(R.RSP, 0x0000_8000_0000_0000 | rng.getrandbits(40))
        b.emit(Instruction.create_reg(Code.PUSH_R64, R.RAX))
        return name, False
    if name == "xm":  # 0/0 with every MXCSR exception unmasked, CR4.OSXMMEXCPT=1: #XM (SDM Vol. 3A 6.15 vector 19)
        b.mov(R.RSI, SCRATCH_GPA)
        b.emit(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _mem(), 0),
               Instruction.create_mem(Code.LDMXCSR_M32, _mem()),
               Instruction.create_reg_reg(Code.XORPS_XMM_XMMM128, R.XMM1, R.XMM1),
               Instruction.create_reg_reg(Code.DIVSS_XMM_XMMM32, R.XMM0, R.XMM1))
        return name, False
    if name == "mf":  # x87 zero divide unmasked, CR0.NE=1: #MF at the next FWAIT (vector 16)
        b.mov(R.RSI, SCRATCH_GPA)
        b.emit(Instruction.create(Code.FNINIT),
               Instruction.create_mem_u32(Code.MOV_RM16_IMM16, _mem(), 0x037F & ~(1 << 2)),
               Instruction.create_mem(Code.FLDCW_M2BYTE, _mem()),
               Instruction.create(Code.FLD1), Instruction.create(Code.FLDZ),
               Instruction.create_reg_reg(Code.FDIVP_STI_ST0, R.ST1, R.ST0),
               Instruction.create(Code.WAIT))
        return name, False
    if name == "ud2":
        b.emit(Instruction.create(Code.UD2))
        return name, False
    b.raw(b"\x62\x06")  # BOUND's opcode is EVEX in 64-bit mode; this EVEX is malformed: #UD
    return name, False


def gen_triple_fault(rng: random.Random, cpl: int) -> Generated:
    b = ProgramBuilder()
    idt_kind = rng.choice(("none", "none", "junk", "unmapped", "not-present", "refault",
                           "bad-selector", "returning") + (("lidt-junk",) if cpl == 0 else ()))
    opts: dict = {}
    allowed = {SHUTDOWN, KVM_ERROR}
    gates = 256
    if idt_kind == "junk":
        opts["idt"] = rng.randbytes(16 * rng.randint(1, gates))
    elif idt_kind in ("unmapped", "not-present", "refault", "bad-selector", "returning"):
        handler = {"unmapped": 0x50_0000, "refault": HANDLER_GPA, "returning": HANDLER_GPA}.get(idt_kind, HANDLER_GPA)
        sel = {"bad-selector": rng.choice((0, gdt.SEL_KERNEL_DATA, gdt.SEL_TSS, 0x80))}.get(idt_kind, gdt.SEL_KERNEL_CODE)
        present = 0 if idt_kind == "not-present" else 1
        idt = b"".join(idt_gate(handler, sel, dpl=3, present=present) for _ in range(gates))
        opts["idt"] = idt
        if idt_kind in ("refault", "returning"):
            body = "refault" if idt_kind == "refault" else "return-with-code"
            opts["extra_regions"] = (Region(HANDLER_GPA, _handler_code(body), "handler"),)
    if idt_kind == "lidt-junk":  # CPL0: load a junk IDTR from the guest itself
        b.mov(R.RSI, SCRATCH_GPA)
        b.mov(R.RAX, rng.getrandbits(64))
        b.emit(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(), R.RAX))
        b.mov(R.RAX, rng.getrandbits(16))
        b.emit(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RSI, 8), R.RAX))
        b.emit(Instruction.create_mem(Code.LIDT_M1664, _mem()))
    name, may_complete = _fault(b, rng, cpl)
    if may_complete:
        allowed |= {DONE}
    if idt_kind == "returning":
        # A handler that drops an error code and IRETQs: vectors without one misalign the
        # frame (a fault in IRET, then #DF...); #PF/#GP/#SS return to the faulting
        # instruction and fault again forever (the watchdog ends that), and a trap returns
        # and the program goes on to the done port.
        allowed |= {WATCHDOG, DONE}
    b.done()
    return f"{idt_kind}-idt/{name}", b, opts, frozenset(allowed)


def gen_wild_tables(rng: random.Random, cpl: int) -> Generated:
    b = ProgramBuilder()
    tables = build_page_tables(user=cpl == 3)
    opts: dict = {}
    allowed = ANY
    choice = rng.choice(("cr3-junk", "cr3-mmio", "cr3-ro", "cr3-outside", "cr3-reserved", "cr3-code",
                         "entry", "entry", "entry", "entry") + (("mov-cr3",) * 3 if cpl == 0 else ()))
    junk = Region(JUNK_GPA, rng.randbytes(PAGE), "junk-table")
    if choice == "cr3-junk":
        opts["cr3"] = JUNK_GPA
        opts["extra_regions"] = (junk,)
    elif choice == "cr3-mmio":
        opts["cr3"] = layout.MMIO_BASE + rng.randrange(layout.MMIO_SIZE // PAGE) * PAGE
    elif choice == "cr3-ro":
        opts["cr3"] = layout.RO_BASE + rng.randrange(layout.RO_SIZE // PAGE) * PAGE
    elif choice == "cr3-outside":
        opts["cr3"] = OUTSIDE_GPA + rng.randrange(1 << 20) * PAGE
    elif choice == "cr3-reserved":  # bits above MAXPHYADDR: KVM_SET_SREGS refuses, or #GP
        opts["cr3"] = tables.base | (1 << rng.randint(52, 62))
    elif choice == "cr3-code":  # the code bytes read as a PML4
        opts["cr3"] = layout.CODE_GPA
    variant = choice
    if choice == "entry":
        target_name, target = rng.choice((
            ("code", layout.CODE_GPA), ("stack", layout.STACK_TOP - 8), ("data", SCRATCH_GPA),
            ("mailbox", layout.MAILBOX_GPA), ("hole", layout.DOORBELL_GPA), ("ro", layout.RO_BASE),
        ))
        offs = entry_offsets(tables, target)
        level = rng.randrange(len(offs))
        (entry,) = struct.unpack_from("<Q", tables.data, offs[level])
        how = rng.choice(("junk", "outside", "hole", "ro", "reserved-ps", "reserved-xd", "clear-p",
                          "clear-us", "clear-rw", "self", "pml4", "large-junk"))
        flags = entry & 0xFFF
        new = {
            "junk": rng.getrandbits(64),
            "outside": (OUTSIDE_GPA + rng.randrange(1 << 20) * PAGE) | flags,
            "hole": layout.MMIO_BASE | flags,
            "ro": layout.RO_BASE | flags,
            "reserved-ps": entry | PTE_PS if level == 0 else entry | (1 << 63),
            "reserved-xd": entry | (1 << 63),  # EFER.NXE=0: XD is reserved (SDM 4.5)
            "clear-p": entry & ~PTE_P,
            "clear-us": entry & ~PTE_US,
            "clear-rw": entry & ~PTE_RW,
            "self": (tables.base + offs[level] // PAGE * PAGE) | flags,
            "pml4": tables.base | flags,
            "large-junk": (rng.getrandbits(40) << 12) | flags | PTE_PS,
        }[how]
        tables = with_entry(tables, offs[level], new)
        variant = f"entry-L{4 - level}-{target_name}-{how}"
    opts["page_tables"] = tables
    if choice == "mov-cr3":  # CPL0: the guest loads CR3 itself
        value = rng.choice((JUNK_GPA, layout.MMIO_BASE, layout.RO_BASE, OUTSIDE_GPA, layout.CODE_GPA,
                            tables.base | (1 << 52), rng.getrandbits(64)))
        opts["extra_regions"] = (junk,)
        b.mov(R.RAX, value)
        b.emit(Instruction.create_reg_reg(Code.MOV_CR_R64, R.CR3, R.RAX))
        variant = f"mov-cr3-{value:#x}"
    # touch code, stack, data, mailbox, the hole and the read-only slot, then finish
    b.mov(R.RSI, SCRATCH_GPA)
    b.emit(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(), R.RAX),
           Instruction.create_reg(Code.PUSH_R64, R.RAX), Instruction.create_reg(Code.POP_R64, R.RBX))
    b.mov(R.RSI, layout.MAILBOX_GPA + 0x38)
    b.emit(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(), R.RAX))
    b.mov(R.RSI, layout.RO_BASE)
    b.emit(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem()))
    b.mov(R.RSI, layout.DOORBELL_GPA)
    b.emit(Instruction.create_mem_reg(Code.MOV_RM8_R8, _mem(), R.AL))
    b.done()
    return variant, b, opts, allowed


def gen_io(rng: random.Random, cpl: int) -> Generated:
    b = ProgramBuilder()
    allowed = {DONE}
    names = []
    for _ in range(rng.randint(1, 6)):
        op = rng.choice(("out-imm", "in-imm", "out-dx", "in-dx", "outs", "ins", "ins", "done-wrong-width",
                         "wrap"))
        width = rng.choice((1, 2, 4))
        acc = {1: R.AL, 2: R.AX, 4: R.EAX}[width]
        if op in ("out-imm", "in-imm"):
            p = rng.choice((rng.randrange(256), 0x80, 0x70, 0x71, 0x60, 0x20, 0x40, 0xF0))
            if p == layout.DONE_PORT and op == "out-imm":
                p = 0x80
            b.mov(R.RAX, rng.getrandbits(32))
            code = {("out-imm", 1): Code.OUT_IMM8_AL, ("out-imm", 2): Code.OUT_IMM8_AX,
                    ("out-imm", 4): Code.OUT_IMM8_EAX, ("in-imm", 1): Code.IN_AL_IMM8,
                    ("in-imm", 2): Code.IN_AX_IMM8, ("in-imm", 4): Code.IN_EAX_IMM8}[(op, width)]
            if op == "out-imm":
                b.emit(Instruction.create_u32_reg(code, p, acc))
            else:
                b.emit(Instruction.create_reg_u32(code, acc, p))
        elif op in ("out-dx", "in-dx"):
            b.mov(R.RDX, port(rng))
            b.mov(R.RAX, rng.getrandbits(32))
            code = {("out-dx", 1): Code.OUT_DX_AL, ("out-dx", 2): Code.OUT_DX_AX, ("out-dx", 4): Code.OUT_DX_EAX,
                    ("in-dx", 1): Code.IN_AL_DX, ("in-dx", 2): Code.IN_AX_DX, ("in-dx", 4): Code.IN_EAX_DX}[(op, width)]
            b.emit(Instruction.create_reg_reg(code, R.DX, acc) if op == "out-dx" else Instruction.create_reg_reg(code, acc, R.DX))
        elif op in ("outs", "ins"):
            # OUTS makes one exit per element (KVM's emulator: em_out passes count 1); INS
            # can batch a page of elements into one KVM_EXIT_IO with count > 1.
            count = rng.choice((0, 1, 2, 3, 7, 16, 64, 255) + ((1000, 2048) if op == "ins" else (300,)))
            where = rng.choice(("ram", "ram", "ro", "hole"))
            if where != "ram":  # every element is then an MMIO exit to userspace too
                count = min(count, 64)
            down = _set_flags(b, rng)
            lo, size = {"ram": (SCRATCH_GPA, SCRATCH_SIZE), "ro": (layout.RO_BASE, layout.RO_SIZE),
                        "hole": (layout.MMIO_BASE, layout.MMIO_SIZE)}[where]
            start = _string_span(rng, count, width, down, lo, size)
            b.mov(R.RDX, rng.choice((port(rng), layout.DONE_PORT)) if op == "ins" else port(rng))
            b.mov(R.RCX, count)
            b.mov(R.RSI if op == "outs" else R.RDI, start)
            rep = _rep(rng)
            make = {("outs", 1): Instruction.create_outsb, ("outs", 2): Instruction.create_outsw,
                    ("outs", 4): Instruction.create_outsd}
            if op == "outs":
                b.emit(make[(op, width)](64, R.NONE, rep))
            else:
                b.emit({1: Instruction.create_insb, 2: Instruction.create_insw, 4: Instruction.create_insd}[width](64, rep))
            b.emit(Instruction.create(Code.CLD))
            op = f"{'rep-' if rep == RepPrefixKind.REPE else ''}{op}{width}x{count}-{where}{'-down' if down else ''}"
        elif op == "done-wrong-width":  # the done port read at any width, or written at 2/4
            b.mov(R.RDX, layout.DONE_PORT)
            if width == 1 or rng.random() < 0.7:
                b.emit(Instruction.create_reg_reg({1: Code.IN_AL_DX, 2: Code.IN_AX_DX, 4: Code.IN_EAX_DX}[width], acc, R.DX))
            else:
                b.emit(Instruction.create_reg_reg({2: Code.OUT_DX_AX, 4: Code.OUT_DX_EAX}[width], R.DX, acc))
        else:  # "wrap": an access whose last byte is past port 0xFFFF (TSS bitmap terminator)
            b.mov(R.RDX, 0x10000 - rng.randint(1, 3))
            b.emit(Instruction.create_reg_reg(Code.OUT_DX_EAX, R.DX, R.EAX))
            allowed |= {SHUTDOWN}
        names.append(op)
    b.done()
    opts = {"gprs": {"rbx": 0}}
    if rng.random() < 0.2:  # IOPL 0: the TSS I/O permission bitmap decides (all ports allowed)
        opts["rflags"] = RFLAGS_BASE
    return "+".join(names), b, opts, frozenset(allowed)


def _mmio_op(b: ProgramBuilder, rng: random.Random) -> tuple[str, set[str]]:
    """One MMIO operation; returns its name and the outcomes it may end the run in (besides
    going on to the next one)."""
    op = rng.choice(("store", "store", "load", "load", "sse-store", "sse-load", "sse-aligned", "movq",
                     "movs", "movs", "stos", "lods", "cmps", "rmw", "rmw", "stack", "call-ret",
                     "crossing-ram", "crossing-ro", "cmpxchg16b", "fxsave", "maskmovdqu", "jmp-hole",
                     "clflush"))
    if op in ("store", "load"):
        w = rng.choice((1, 2, 4, 8))
        addr = mmio_address(rng, w) if rng.random() < 0.8 else layout.RO_BASE + rng.randrange(layout.RO_SIZE - 8)
        b.mov(R.RSI, addr)
        b.mov(R.RAX, rng.getrandbits(64))
        reg = {1: R.AL, 2: R.AX, 4: R.EAX, 8: R.RAX}[w]
        if op == "store":
            code = {1: Code.MOV_RM8_R8, 2: Code.MOV_RM16_R16, 4: Code.MOV_RM32_R32, 8: Code.MOV_RM64_R64}[w]
            b.emit(Instruction.create_mem_reg(code, _mem(), reg))
        else:
            code = {1: Code.MOV_R8_RM8, 2: Code.MOV_R16_RM16, 4: Code.MOV_R32_RM32, 8: Code.MOV_R64_RM64}[w]
            b.emit(Instruction.create_reg_mem(code, reg, _mem()))
        return f"{op}{w}@{addr:#x}", set()
    if op in ("sse-store", "sse-load"):
        addr = mmio_address(rng, 16)
        b.mov(R.RSI, addr)
        if op == "sse-store":
            code = rng.choice((Code.MOVUPS_XMMM128_XMM, Code.MOVDQU_XMMM128_XMM))
            b.emit(Instruction.create_mem_reg(code, _mem(), R.XMM0))
        else:
            code = rng.choice((Code.MOVUPS_XMM_XMMM128, Code.MOVDQU_XMM_XMMM128))
            b.emit(Instruction.create_reg_mem(code, R.XMM1, _mem()))
        return f"{op}@{addr:#x}", set()
    if op == "sse-aligned":
        addr = layout.MMIO_BASE + rng.randrange(layout.MMIO_SIZE // 16) * 16
        b.mov(R.RSI, addr)
        code = rng.choice((Code.MOVAPS_XMMM128_XMM, Code.MOVDQA_XMMM128_XMM, Code.MOVNTDQ_M128_XMM))
        b.emit(Instruction.create_mem_reg(code, _mem(), R.XMM0))
        return f"{op}@{addr:#x}", set()
    if op == "movq":
        addr = mmio_address(rng, 8)
        b.mov(R.RSI, addr)
        b.emit(Instruction.create_mem_reg(rng.choice((Code.MOVQ_XMMM64_XMM, Code.MOVD_RM32_XMM)), _mem(), R.XMM0))
        # KVM's emulator has no MOVD/MOVQ from an XMM register (twobyte_table of
        # arch/x86/kvm/emulate.c: 0F 7E and 66 0F D6 are N): KVM_EXIT_INTERNAL_ERROR.
        return f"{op}@{addr:#x}", {KVM_ERROR}
    if op in ("movs", "stos", "lods", "cmps"):
        w = rng.choice((1, 2, 4, 8))
        count = rng.choice((0, 1, 2, 3, 5, 16, 40))
        down = _set_flags(b, rng)
        hole = _string_span(rng, count, w, down, layout.MMIO_BASE, layout.MMIO_SIZE)
        ram = _string_span(rng, count, w, down, SCRATCH_GPA, SCRATCH_SIZE)
        rep = _rep(rng)
        b.mov(R.RCX, count)
        if op == "movs":
            src, dst = rng.choice(((ram, hole), (hole, ram), (hole, _string_span(rng, count, w, down, layout.MMIO_BASE, layout.MMIO_SIZE))))
            b.mov(R.RSI, src)
            b.mov(R.RDI, dst)
            make = {1: Instruction.create_movsb, 2: Instruction.create_movsw, 4: Instruction.create_movsd, 8: Instruction.create_movsq}[w]
            b.emit(make(64, R.NONE, rep))
        elif op == "stos":
            b.mov(R.RDI, hole)
            make = {1: Instruction.create_stosb, 2: Instruction.create_stosw, 4: Instruction.create_stosd, 8: Instruction.create_stosq}[w]
            b.emit(make(64, rep))
        elif op == "lods":
            b.mov(R.RSI, hole)
            make = {1: Instruction.create_lodsb, 2: Instruction.create_lodsw, 4: Instruction.create_lodsd, 8: Instruction.create_lodsq}[w]
            b.emit(make(64, R.NONE, rep))
        else:
            b.mov(R.RSI, hole)
            b.mov(R.RDI, ram)
            make = {1: Instruction.create_cmpsb, 2: Instruction.create_cmpsw, 4: Instruction.create_cmpsd, 8: Instruction.create_cmpsq}[w]
            b.emit(make(64, R.NONE, rep))
        b.emit(Instruction.create(Code.CLD))
        return f"{'rep-' if rep != RepPrefixKind.NONE else ''}{op}{w}x{count}{'-down' if down else ''}", set()
    if op == "rmw":
        addr = mmio_address(rng, 4)
        b.mov(R.RSI, addr)
        b.mov(R.RAX, rng.getrandbits(32))
        name, ins = rng.choice((
            ("xchg", Instruction.create_mem_reg(Code.XCHG_RM32_R32, _mem(), R.EAX)),
            ("lock-add", _lock(Instruction.create_mem_i32(Code.ADD_RM32_IMM8, _mem(), 1))),
            ("lock-xadd", _lock(Instruction.create_mem_reg(Code.XADD_RM32_R32, _mem(), R.EAX))),
            ("lock-cmpxchg", _lock(Instruction.create_mem_reg(Code.CMPXCHG_RM32_R32, _mem(), R.EBX))),
            ("inc", Instruction.create_mem(Code.INC_RM32, _mem())),
            ("not", Instruction.create_mem(Code.NOT_RM32, _mem())),
            ("bts", Instruction.create_mem_u32(Code.BTS_RM32_IMM8, _mem(), rng.randrange(32))),
        ))
        b.emit(ins)
        return f"{name}@{addr:#x}", set()
    if op == "stack":  # push/pop with RSP in the hole: the stack engine's accesses are MMIO
        addr = mmio_address(rng, 8) & ~7
        b.emit(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RBP, R.RSP))
        b.mov(R.RSP, addr + 64)
        b.emit(Instruction.create_reg(Code.PUSH_R64, R.RAX), Instruction.create_reg(Code.PUSH_R64, R.RBX),
               Instruction.create_reg(Code.POP_R64, R.RCX), Instruction.create_reg(Code.POP_R64, R.RDX))
        b.emit(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RSP, R.RBP))
        return f"stack@{addr:#x}", set()
    if op == "call-ret":  # CALL pushes into the hole, RET pops the device's value: wild RIP
        addr = layout.MMIO_BASE + 0x800
        b.emit(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RBP, R.RSP))
        b.mov(R.RSP, addr)
        ret, after = b.asm.label(), b.asm.label()
        b.asm.branch(Code.CALL_REL32_64, ret)
        b.asm.branch(Code.JMP_REL32_64, after)
        b.asm.bind(ret)
        b.emit(Instruction.create(Code.RETNQ))
        b.asm.bind(after)
        b.emit(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RSP, R.RBP))
        return "call-ret-hole", {SHUTDOWN, KVM_ERROR}
    if op == "crossing-ram":  # the first bytes in RAM (linear 0x3FF000 remapped), the rest in the hole
        w = rng.choice((2, 4, 8, 16))
        addr = layout.MMIO_BASE - rng.randint(1, w - 1)
        b.mov(R.RSI, addr)
        if w == 16:
            b.emit(Instruction.create_mem_reg(Code.MOVUPS_XMMM128_XMM, _mem(), R.XMM0))
        else:
            b.mov(R.RAX, rng.getrandbits(64))
            code = {2: Code.MOV_RM16_R16, 4: Code.MOV_RM32_R32, 8: Code.MOV_RM64_R64}[w]
            b.emit(Instruction.create_mem_reg(code, _mem(), {2: R.AX, 4: R.EAX, 8: R.RAX}[w]))
        return f"crossing-ram{w}@{addr:#x}", set()
    if op == "crossing-ro":  # a write to the read-only slot's last bytes running into the hole
        w = rng.choice((2, 4, 8, 16))
        addr = AFTER_RO - rng.randint(1, w - 1)
        b.mov(R.RSI, addr)
        if w == 16:
            b.emit(Instruction.create_mem_reg(Code.MOVDQU_XMMM128_XMM, _mem(), R.XMM0))
        else:
            code = {2: Code.MOV_RM16_R16, 4: Code.MOV_RM32_R32, 8: Code.MOV_RM64_R64}[w]
            b.emit(Instruction.create_mem_reg(code, _mem(), {2: R.AX, 4: R.EAX, 8: R.RAX}[w]))
        return f"crossing-ro{w}@{addr:#x}", set()
    if op == "cmpxchg16b":
        addr = layout.MMIO_BASE + rng.randrange(layout.MMIO_SIZE // 16) * 16
        b.mov(R.RSI, addr)
        b.emit(_lock(Instruction.create_mem(rng.choice((Code.CMPXCHG16B_M128, Code.CMPXCHG8B_M64)), _mem())))
        return f"cmpxchg16b@{addr:#x}", {KVM_ERROR, SHUTDOWN}
    if op == "fxsave":
        addr = layout.MMIO_BASE + rng.randrange(layout.MMIO_SIZE // 16 - 64) * 16
        b.mov(R.RSI, addr)
        b.emit(Instruction.create_mem(rng.choice((Code.FXSAVE64_M512BYTE, Code.FXRSTOR64_M512BYTE)), _mem()))
        return f"fxsave@{addr:#x}", {KVM_ERROR, SHUTDOWN}
    if op == "maskmovdqu":
        addr = mmio_address(rng, 16)
        b.mov(R.RDI, addr)
        b.emit(Instruction.create_maskmovdqu(64, R.XMM0, R.XMM1, R.NONE))
        return f"maskmovdqu@{addr:#x}", {KVM_ERROR, SHUTDOWN}
    if op == "jmp-hole":  # instruction fetch from MMIO
        b.mov(R.RSI, layout.MMIO_BASE + rng.randrange(layout.MMIO_SIZE))
        b.emit(Instruction.create_reg(Code.JMP_RM64, R.RSI))
        return "jmp-hole", {KVM_ERROR, SHUTDOWN}
    addr = mmio_address(rng, 1)
    b.mov(R.RSI, addr)
    b.emit(Instruction.create_mem(Code.CLFLUSH_M8, _mem()))
    return f"clflush@{addr:#x}", set()


def gen_mmio_odd(rng: random.Random, cpl: int) -> Generated:
    b = ProgramBuilder()
    allowed = {DONE}
    names = []
    for _ in range(rng.randint(1, 5)):
        name, extra = _mmio_op(b, rng)
        names.append(name)
        allowed |= extra
    b.done()
    tables = build_page_tables(user=cpl == 3)
    tables = map_page(tables, BELOW_HOLE, REMAP_RAM_GPA, _pte_flags(cpl))
    tables = map_page(tables, AFTER_RO, AFTER_RO_TARGET, _pte_flags(cpl) | (1 << 3) | (1 << 4))
    return "+".join(names), b, {"page_tables": tables}, frozenset(allowed)


def gen_loop(rng: random.Random, cpl: int) -> Generated:
    b = ProgramBuilder()
    variant = rng.choice(("jmp-self", "pause", "cpuid", "pio-eventfd", "mmio-eventfd", "coalesced-mmio",
                          "user-exits", "ins-forever", "exception-free-busy") + (("vmcall",) if cpl == 0 else ()))
    top = b.asm.label()
    if variant == "jmp-self":
        b.raw(b"\xeb\xfe")
        return variant, b, {}, frozenset({WATCHDOG})
    if variant == "ins-forever":  # REP INSB of 256 bytes (one batched exit), again and again
        b.mov(R.RDX, port(rng))
        b.asm.bind(top)  # RDI rewound every round so the buffer stays in one page
        b.mov(R.RDI, SCRATCH_GPA)
        b.mov(R.RCX, 256)
        b.emit(Instruction.create_insb(64, RepPrefixKind.REPE))
        b.asm.branch(Code.JMP_REL32_64, top)
        b.done()
        return variant, b, {}, frozenset({WATCHDOG})
    b.mov(R.RSI, layout.DOORBELL_GPA if variant != "coalesced-mmio" else layout.COALESCED_GPA)
    b.mov(R.RDX, layout.DOORBELL_PORT if variant != "user-exits" else rng.choice((0x1234, 0x80)))
    b.asm.bind(top)
    if variant == "pause":
        b.emit(Instruction.create(Code.PAUSE))
    elif variant == "cpuid":
        b.emit(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EAX, R.EAX), Instruction.create(Code.CPUID))
        b.mov(R.RSI, layout.DOORBELL_GPA)
    elif variant in ("pio-eventfd", "user-exits"):
        b.emit(Instruction.create_reg_reg(Code.OUT_DX_AL, R.DX, R.AL))
    elif variant in ("mmio-eventfd", "coalesced-mmio"):
        b.emit(Instruction.create_mem_reg(Code.MOV_RM8_R8, _mem(), R.AL))
    elif variant == "vmcall":
        b.emit(Instruction.create(Code.VMCALL))
    else:  # arithmetic only, never an exit
        b.emit(Instruction.create_reg(Code.INC_RM64, R.R8), Instruction.create_reg_reg(Code.IMUL_R64_RM64, R.R9, R.R8))
    b.asm.branch(Code.JMP_REL32_64, top)
    b.done()
    return variant, b, {}, frozenset({WATCHDOG})


def _loop_spec(rng: random.Random, variant: str) -> MachineSpec:
    """The machine for a loop: the ioeventfd or coalesced zone the loop hammers."""
    base = plain_spec()
    evs: tuple = ()
    zones: tuple = ()
    if variant == "pio-eventfd":
        evs = (IoEventFdSpec("pio-doorbell", True, layout.DOORBELL_PORT, 1),)
    elif variant == "mmio-eventfd":
        evs = (IoEventFdSpec("mmio-doorbell", False, layout.DOORBELL_GPA, rng.choice((0, 1))),)
    elif variant == "coalesced-mmio":
        zones = (CoalescedZone(layout.COALESCED_GPA, PAGE),)
    return MachineSpec(memslots=base.memslots, ioeventfds=evs, coalesced=zones, done_port=base.done_port,
                       device_read_value=base.device_read_value, mmio_holes=base.mmio_holes)


GENERATORS: dict[str, Callable[[random.Random, int], Generated]] = {
    "random-bytes": gen_random_bytes,
    "invalid-opcode": gen_invalid_opcode,
    "triple-fault": gen_triple_fault,
    "wild-tables": gen_wild_tables,
    "io": gen_io,
    "mmio-odd": gen_mmio_odd,
    "loop": gen_loop,
}
KINDS = tuple(GENERATORS)
# How often each kind is drawn: loops cost a watchdog period each, the rest a few ms.
WEIGHTS = {"random-bytes": 6, "invalid-opcode": 2, "triple-fault": 3, "wild-tables": 4, "io": 4,
           "mmio-odd": 5, "loop": 1}


def generate(seed: int, index: int, kinds: tuple[str, ...] = KINDS, cpls: tuple[int, ...] = (3,)) -> Program:
    """Program number ``index`` of the stream ``seed``: the same pair always gives the same
    program (the random generator is seeded with both), whatever ran before it."""
    for k in kinds:
        if k not in GENERATORS:
            raise UsageError(f"unknown hostile kind {k!r}{did_you_mean(k, KINDS)}; one of {', '.join(KINDS)}")
    for c in cpls:
        if c not in (0, 3):
            raise UsageError(f"guest CPL must be 0 or 3, not {c}")
    rng = random.Random(f"fastmmio-hostile:{seed}:{index}")
    kind = rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds])[0]
    cpl = rng.choice(cpls)
    variant, builder, opts, allowed = GENERATORS[kind](rng, cpl)
    if kind == "loop":
        spec = _loop_spec(rng, variant)
    elif kind in ("random-bytes", "io", "mmio-odd"):
        spec = random_spec(rng)
    else:
        spec = plain_spec()
    return Program(
        name=f"{kind}/{variant}",
        kind=kind,
        cpl=cpl,
        code=builder.encode(),
        spec=spec,
        image_options=opts,
        allowed=allowed,
        origin=f"{seed}:{index}",
    )
