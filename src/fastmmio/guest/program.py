"""Guest programs. The one every route uses is the kvm-unit-tests timed doorbell loop.

kvm-unit-tests ``x86/vmexit.c`` times a batch of N calls of a test function between two
RDTSCs and reports ticks per call, loop overhead included. :func:`doorbell_loop` does the same
with the access inlined, and talks to the host through the mailbox page
(:data:`fastmmio.layout.MAILBOX_GPA`):

.. code-block:: text

    top:  r12 <- [mailbox+ITERATIONS]            ; N, written by the host before each batch
          rsi <- target address, r13 <- value, ebx <- 0
          [touch] <- 0                           ; (only when given: RAM the OS uses)
          rdtsc ; r14 <- edx:eax                 ; T0
          dx <- port, eax <- value               ; (port I/O only: RDTSC clobbers both)
          r15 <- N ; if 0 skip
    loop: <access>                               ; N times
          dec r15 ; jnz loop
          rdtsc ; rax <- edx:eax                 ; T1
          [mailbox+T0] <- r14, [mailbox+T1] <- rax, [mailbox+BATCHES] += 1
          [mailbox+LAST_READ] <- rbx             ; the last value a read access returned
          out DONE_PORT, al                      ; "batch done": the host reads the mailbox
          jmp top                                ; the host writes N and resumes

The loop counter (r15), the target address (rsi) and the store value (r13) live in registers
no access clobbers: CPUID writes rax/rbx/rcx/rdx (SDM Vol. 2A, CPUID), IN writes al/ax/eax.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from iced_x86 import Code, Instruction, MemoryOperand, Register

from fastmmio import layout
from fastmmio.errors import UsageError
from fastmmio.guest.asm import Asm


class AccessKind(str, Enum):
    """What one iteration of the doorbell loop does."""

    OUT = "out"  # OUT DX, AL/AX/EAX: port I/O write
    IN = "in"  # IN AL/AX/EAX, DX: port I/O read
    WRITE = "write"  # MOV [rsi], r13b/w/d/q: memory store (MMIO hole, RO memslot or RAM)
    READ = "read"  # MOV bl/bx/ebx/rbx, [rsi]: memory load
    TOUCH = "touch"  # MOV [rsi], r13b/w/d/q, then RSI += 4 KiB: first-touches a new RAM page
    CPUID = "cpuid"  # CPUID leaf 0: always exits (SDM 25.1.2, unconditional VM exit)
    VMCALL = "vmcall"  # VMCALL with RAX = 0: always exits (SDM 25.1.2); KVM's hypercall handler
    MOV_FROM_CR8 = "mov_from_cr8"  # MOV r64, CR8: CPL0 only (#GP at CPL>0, SDM Vol. 2B MOV CR)
    MOV_TO_CR8 = "mov_to_cr8"  # MOV CR8, r64 with 0: CPL0 only, as above
    NONE = "none"  # empty loop: the loop overhead baseline


# Accesses a guest can only make at CPL0: MOV to or from a control register raises #GP(0) at
# any other privilege level (SDM Vol. 2B, "MOV - Move to/from Control Registers", protected-
# and 64-bit-mode exceptions: "If the current privilege level is not 0").
CPL0_ONLY = frozenset({AccessKind.MOV_FROM_CR8, AccessKind.MOV_TO_CR8})


PORT_WIDTHS = (1, 2, 4)
TOUCH_WINDOW = 0x0018_0000  # page-touch workload: 384 pages of RAM from its target
MEM_WIDTHS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Access:
    """One access: kind, width in bytes, target (port number or guest-physical address) and
    the value written (ignored by reads, CPUID and the empty loop)."""

    kind: AccessKind
    width: int = 0
    target: int = 0
    value: int = 0

    def __post_init__(self) -> None:
        kind = AccessKind(self.kind)  # raises ValueError on an unknown kind
        object.__setattr__(self, "kind", kind)
        if kind in (AccessKind.OUT, AccessKind.IN):
            if self.width not in PORT_WIDTHS:
                raise UsageError(f"port access width must be one of {PORT_WIDTHS}, not {self.width}")
            if not 0 <= self.target <= 0xFFFF:
                raise UsageError(f"port {self.target:#x} is not a 16-bit port number")
        elif kind in (AccessKind.WRITE, AccessKind.READ, AccessKind.TOUCH):
            if self.width not in MEM_WIDTHS:
                raise UsageError(f"memory access width must be one of {MEM_WIDTHS}, not {self.width}")
            if self.target % self.width:
                raise UsageError(f"address {self.target:#x} is not aligned to its width {self.width}")
            if not 0 < self.target < 1 << 47:
                raise UsageError(f"address {self.target:#x} is not a usable identity-mapped address")
        elif self.width:
            raise UsageError(f"{kind.value} takes no width")
        if self.width and not 0 <= self.value < 1 << (8 * self.width):
            raise UsageError(f"value {self.value:#x} does not fit in {self.width} byte(s)")

    @property
    def is_read(self) -> bool:
        return self.kind in (AccessKind.IN, AccessKind.READ)

    @property
    def is_pio(self) -> bool:
        return self.kind in (AccessKind.OUT, AccessKind.IN)

    @property
    def is_memory(self) -> bool:
        return self.kind in (AccessKind.WRITE, AccessKind.READ, AccessKind.TOUCH)

    @property
    def cpl0_only(self) -> bool:
        """The access raises #GP at CPL > 0 (:data:`CPL0_ONLY`)."""
        return self.kind in CPL0_ONLY

    def describe(self) -> str:
        """Short stable text, e.g. ``write:1@0x400000=0x0`` or ``cpuid``."""
        if not (self.is_pio or self.is_memory):
            return self.kind.value
        s = f"{self.kind.value}:{self.width}@{self.target:#x}"
        return s if self.is_read else f"{s}={self.value:#x}"


_REG_BY_WIDTH = {
    "r13": {1: Register.R13L, 2: Register.R13W, 4: Register.R13D, 8: Register.R13},
    "rbx": {1: Register.BL, 2: Register.BX, 4: Register.EBX, 8: Register.RBX},
}
_STORE = {1: Code.MOV_RM8_R8, 2: Code.MOV_RM16_R16, 4: Code.MOV_RM32_R32, 8: Code.MOV_RM64_R64}
_LOAD = {1: Code.MOV_R8_RM8, 2: Code.MOV_R16_RM16, 4: Code.MOV_R32_RM32, 8: Code.MOV_R64_RM64}
_OUT = {1: Code.OUT_DX_AL, 2: Code.OUT_DX_AX, 4: Code.OUT_DX_EAX}
_IN = {1: Code.IN_AL_DX, 2: Code.IN_AX_DX, 4: Code.IN_EAX_DX}
_ACC = {1: Register.AL, 2: Register.AX, 4: Register.EAX}


def _mailbox(offset: int) -> MemoryOperand:
    return MemoryOperand(Register.RDI, displ=offset, displ_size=1)


def emit_access(asm: Asm, access: Access) -> None:
    """The body of one iteration (the instructions that make the notification)."""
    k, w = access.kind, access.width
    if k is AccessKind.OUT:
        asm.emit(Instruction.create_reg_reg(_OUT[w], Register.DX, _ACC[w]))
    elif k is AccessKind.IN:
        asm.emit(Instruction.create_reg_reg(_IN[w], _ACC[w], Register.DX))
    elif k is AccessKind.WRITE:
        asm.emit(Instruction.create_mem_reg(_STORE[w], MemoryOperand(Register.RSI), _REG_BY_WIDTH["r13"][w]))
    elif k is AccessKind.READ:
        asm.emit(Instruction.create_reg_mem(_LOAD[w], _REG_BY_WIDTH["rbx"][w], MemoryOperand(Register.RSI)))
    elif k is AccessKind.TOUCH:
        # store, then move to the next page; wrap inside [target, target + TOUCH_WINDOW) so a
        # calibrated N never leaves the RAM memslot
        asm.emit(Instruction.create_mem_reg(_STORE[w], MemoryOperand(Register.RSI), _REG_BY_WIDTH["r13"][w]))
        asm.emit(Instruction.create_reg_i32(Code.ADD_RM64_IMM32, Register.RSI, layout.PAGE_SIZE))
        asm.emit(Instruction.create_reg_u64(Code.MOV_R64_IMM64, Register.R8, access.target + TOUCH_WINDOW))
        asm.emit(Instruction.create_reg_reg(Code.CMP_R64_RM64, Register.RSI, Register.R8))
        asm.emit(Instruction.create_reg_u64(Code.MOV_R64_IMM64, Register.R8, access.target))
        asm.emit(Instruction.create_reg_reg(Code.CMOVAE_R64_RM64, Register.RSI, Register.R8))
    elif k is AccessKind.CPUID:
        asm.emit(Instruction.create_reg_reg(Code.XOR_R32_RM32, Register.EAX, Register.EAX))
        asm.emit(Instruction.create_reg_reg(Code.XOR_R32_RM32, Register.ECX, Register.ECX))
        asm.emit(Instruction.create(Code.CPUID))
    elif k is AccessKind.VMCALL:
        # kvm-unit-tests' vmcall test: RAX = 0 (no such hypercall: KVM answers -KVM_ENOSYS,
        # or -KVM_EPERM when the guest is not at CPL0) and RBX, RCX, RDX as outputs
        asm.emit(Instruction.create_reg_reg(Code.XOR_R32_RM32, Register.EAX, Register.EAX))
        asm.emit(Instruction.create(Code.VMCALL))
    elif k is AccessKind.MOV_FROM_CR8:
        asm.emit(Instruction.create_reg_reg(Code.MOV_R64_CR, Register.RAX, Register.CR8))
    elif k is AccessKind.MOV_TO_CR8:
        asm.emit(Instruction.create_reg_reg(Code.XOR_R32_RM32, Register.EAX, Register.EAX))
        asm.emit(Instruction.create_reg_reg(Code.MOV_CR_R64, Register.CR8, Register.RAX))
    elif k is AccessKind.NONE:
        pass


def _rdtsc_into_rax(asm: Asm) -> None:
    """RDTSC puts the TSC in EDX:EAX (SDM Vol. 2B, RDTSC); combine into RAX."""
    asm.emit(Instruction.create(Code.RDTSC))
    asm.emit(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, Register.RDX, 32))
    asm.emit(Instruction.create_reg_reg(Code.OR_R64_RM64, Register.RAX, Register.RDX))


def doorbell_loop(access: Access, done_port: int = layout.DONE_PORT,
                  touch: tuple[int, ...] = ()) -> Asm:
    """The timed loop described in the module docstring, as an :class:`Asm` block. ``touch``:
    addresses the guest stores a zero byte to at the top of every batch, before the first
    RDTSC (so outside the timed region), as a running OS keeps using its RAM."""
    if not 0 <= done_port <= 0xFF:
        raise UsageError(f"done port {done_port:#x} must fit OUT imm8")
    a = Asm()
    top, loop, after = a.label(), a.label(), a.label()

    a.bind(top)
    a.emit(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EDI, layout.MAILBOX_GPA))
    a.emit(Instruction.create_reg_mem(Code.MOV_R64_RM64, Register.R12, _mailbox(layout.MAILBOX_ITERATIONS)))
    if access.is_memory:
        a.emit(Instruction.create_reg_u64(Code.MOV_R64_IMM64, Register.RSI, access.target))
        a.emit(Instruction.create_reg_u64(Code.MOV_R64_IMM64, Register.R13, access.value))
    a.emit(Instruction.create_reg_reg(Code.XOR_R32_RM32, Register.EBX, Register.EBX))
    for addr in touch:
        a.emit(Instruction.create_reg_u64(Code.MOV_R64_IMM64, Register.R8, addr))
        a.emit(Instruction.create_mem_u32(Code.MOV_RM8_IMM8, MemoryOperand(Register.R8), 0))

    _rdtsc_into_rax(a)
    a.emit(Instruction.create_reg_reg(Code.MOV_R64_RM64, Register.R14, Register.RAX))
    if access.is_pio:
        a.emit(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EDX, access.target))
        a.emit(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, 0 if access.is_read else access.value))
    a.emit(Instruction.create_reg_reg(Code.MOV_R64_RM64, Register.R15, Register.R12))
    a.emit(Instruction.create_reg_reg(Code.TEST_RM64_R64, Register.R15, Register.R15))
    a.branch(Code.JE_REL8_64, after)

    a.bind(loop)
    emit_access(a, access)
    a.emit(Instruction.create_reg(Code.DEC_RM64, Register.R15))
    a.branch(Code.JNE_REL8_64, loop)

    a.bind(after)
    if access.kind is AccessKind.IN:
        a.emit(Instruction.create_reg_reg(Code.MOV_R64_RM64, Register.RBX, Register.RAX))
    _rdtsc_into_rax(a)
    a.emit(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mailbox(layout.MAILBOX_T0), Register.R14))
    a.emit(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mailbox(layout.MAILBOX_T1), Register.RAX))
    a.emit(Instruction.create_mem(Code.INC_RM64, _mailbox(layout.MAILBOX_BATCHES)))
    a.emit(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mailbox(layout.MAILBOX_LAST_READ), Register.RBX))
    a.emit(Instruction.create_u32_reg(Code.OUT_IMM8_AL, done_port, Register.AL))
    a.branch(Code.JMP_REL8_64, top)
    return a
