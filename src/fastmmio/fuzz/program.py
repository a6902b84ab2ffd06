"""A fuzz program: guest instructions plus the machine around them, runnable on any backend.

A :class:`Program` is what every generator of :mod:`fastmmio.fuzz` produces and what a runner
(the real-KVM runner of :mod:`fastmmio.fuzz.runner` today, a simulator-vs-KVM differential
runner later) consumes: the encoded instructions, the CPL, the
:class:`~fastmmio.machine.MachineSpec` (memslots, ioeventfds, coalesced zones), the image
options of :func:`fastmmio.guest.raw.build_raw_image` (page tables, CR3, IDT, registers), the
outcomes it may end in, and where it came from (``seed:index``) so that it can be rebuilt.

:class:`ProgramBuilder` collects instructions (iced-x86 ``Instruction`` objects, raw bytes as
``db`` pseudo-instructions) through the project's :class:`~fastmmio.guest.asm.Asm`, so
generators never hand-encode what iced can encode.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from iced_x86 import Code, Instruction, Register

from fastmmio import layout
from fastmmio.guest.asm import Asm, disassemble
from fastmmio.guest.raw import build_raw_image
from fastmmio.machine import CoalescedZone, IoEventFdSpec, Machine, MachineSpec, MemSlot

# Outcomes of one run (see fastmmio.fuzz.runner.Outcome): every run must end in one of these.
DONE = "done"  # the guest reached the done port
SHUTDOWN = "shutdown"  # KVM_EXIT_SHUTDOWN (triple fault; under PVM any exception at CPL3)
WATCHDOG = "watchdog"  # the run loop's watchdog stopped a guest that did not finish
KVM_ERROR = "kvm-error"  # another exit KVM reports as an error (internal error, HLT, ...)
REFUSED = "refused"  # KVM refused the machine before it ran (e.g. an illegal CR3)
DEFINED_OUTCOMES = frozenset({DONE, SHUTDOWN, WATCHDOG, KVM_ERROR, REFUSED})
ANY = DEFINED_OUTCOMES


@dataclass(frozen=True)
class Program:
    """Guest code at :data:`~fastmmio.layout.CODE_GPA` plus everything around it."""

    name: str  # "<kind>/<variant>", e.g. "mmio-odd/movups-crossing"
    kind: str
    cpl: int
    code: bytes
    spec: MachineSpec
    image_options: Mapping[str, Any] = field(default_factory=dict)  # build_raw_image kwargs
    allowed: frozenset[str] = ANY  # outcomes this program may end in on any KVM host
    origin: str = ""  # "seed:index" of the generator call that made it

    def machine(self) -> Machine:
        """The :class:`~fastmmio.machine.Machine` a backend runs (builds the image)."""
        image = build_raw_image(self.code, self.cpl, program=self.name, **self.image_options)
        return Machine(image=image, spec=self.spec)

    def listing(self, limit: int = 64) -> list[str]:
        """Disassembly of the code (raw random bytes decode as whatever they decode as)."""
        return disassemble(self.code, layout.CODE_GPA)[:limit]

    def describe(self) -> str:
        return f"{self.name} at CPL{self.cpl} ({self.origin or 'no origin'})"


class ProgramBuilder:
    """Instructions for one program, encoded at :data:`~fastmmio.layout.CODE_GPA`."""

    def __init__(self) -> None:
        self.asm = Asm()

    def emit(self, *instructions: Instruction) -> "ProgramBuilder":
        for ins in instructions:
            self.asm.emit(ins)
        return self

    def raw(self, data: bytes) -> "ProgramBuilder":
        """Bytes placed as they are (``db``), 16 at a time: random code, invalid encodings."""
        for i in range(0, len(data), 16):
            self.asm.emit(Instruction.create_declare_byte(data[i : i + 16]))
        return self

    def mov(self, reg: Register, value: int) -> "ProgramBuilder":
        """``mov reg64, imm64``."""
        return self.emit(Instruction.create_reg_u64(Code.MOV_R64_IMM64, reg, value & 0xFFFF_FFFF_FFFF_FFFF))

    def done(self) -> "ProgramBuilder":
        """``out DONE_PORT, al`` (the run ends "done" there) then ``jmp $`` should anyone
        resume the guest."""
        self.emit(Instruction.create_u32_reg(Code.OUT_IMM8_AL, layout.DONE_PORT, Register.AL))
        return self.raw(b"\xeb\xfe")

    def __len__(self) -> int:
        return len(self.asm)

    def encode(self, base: int = layout.CODE_GPA) -> bytes:
        return self.asm.encode(base)


# ------------------------------------------------------------------------------------------
# The machine around a program
# ------------------------------------------------------------------------------------------

BASE_MEMSLOTS = (
    MemSlot(layout.RAM_SLOT, layout.RAM_BASE, layout.RAM_SIZE),
    MemSlot(layout.RO_SLOT, layout.RO_BASE, layout.RO_SIZE, readonly=True, fill=layout.RO_PATTERN),
)
RO_EVENTFD_GPA = layout.RO_BASE + 0x100  # an ioeventfd on the read-only slot (ro-write-eventfd)


def plain_spec() -> MachineSpec:
    """RAM, the read-only slot and the MMIO hole; no ioeventfd, no coalesced zone."""
    return MachineSpec(
        memslots=BASE_MEMSLOTS,
        done_port=layout.DONE_PORT,
        device_read_value=layout.DEVICE_READ_VALUE,
        mmio_holes=((layout.MMIO_BASE, layout.MMIO_SIZE),),
    )


def random_spec(rng: random.Random) -> MachineSpec:
    """:func:`plain_spec` plus a random, valid set of what the route catalogue uses: a PIO
    ioeventfd on DOORBELL_PORT (length 1/2/4, wildcard or DATAMATCH), an MMIO one on
    DOORBELL_GPA (length 0 = KVM_FAST_MMIO_BUS, or 1/2/4/8), a length-0 one on the read-only
    slot, coalesced MMIO/PIO zones. Registrations follow kvm_assign_ioeventfd()'s rules, so
    KVM accepts every one."""
    evs: list[IoEventFdSpec] = []
    if rng.random() < 0.6:
        length = rng.choice((1, 2, 4))
        dm = rng.randrange(1 << (8 * length)) if rng.random() < 0.3 else None
        evs.append(IoEventFdSpec("pio-doorbell", True, layout.DOORBELL_PORT, length, dm))
    if rng.random() < 0.6:
        length = rng.choice((0, 0, 1, 2, 4, 8))
        dm = rng.randrange(1 << (8 * length)) if length and rng.random() < 0.3 else None
        evs.append(IoEventFdSpec("mmio-doorbell", False, layout.DOORBELL_GPA, length, dm))
    if rng.random() < 0.2:
        evs.append(IoEventFdSpec("ro-doorbell", False, RO_EVENTFD_GPA, 0))
    zones: list[CoalescedZone] = []
    if rng.random() < 0.4:
        zones.append(CoalescedZone(layout.COALESCED_GPA, layout.PAGE_SIZE))
    if rng.random() < 0.3:
        zones.append(CoalescedZone(layout.COALESCED_PORT, 4, pio=True))
    base = plain_spec()
    return MachineSpec(
        memslots=base.memslots,
        ioeventfds=tuple(evs),
        coalesced=tuple(zones),
        done_port=base.done_port,
        device_read_value=base.device_read_value,
        mmio_holes=base.mmio_holes,
    )
