"""The guest image both backends load: memory contents plus a boot state.

A backend copies each :class:`Region` into the memslot that covers its guest-physical
address, then loads :class:`BootState` directly (KVM_SET_SREGS / KVM_SET_REGS on real KVM;
the simulator's register file), so the guest starts in 64-bit long mode at the chosen CPL
with no boot code of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastmmio.x86.segments import Segment  # noqa: F401 - BootState holds them


@dataclass(frozen=True)
class BootState:
    """Architectural state at the first instruction."""

    rip: int
    rsp: int
    rflags: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cs: Segment
    ss: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    tr: Segment
    ldt: Segment
    gdt_base: int
    gdt_limit: int
    idt_base: int
    idt_limit: int
    gprs: dict[str, int] = field(default_factory=dict)  # e.g. {"rbx": ..., "r14": ...}

    @property
    def cpl(self) -> int:
        return self.cs.dpl


@dataclass(frozen=True)
class Region:
    """Bytes to place at a guest-physical address before the first instruction."""

    gpa: int
    data: bytes
    name: str


@dataclass(frozen=True)
class GuestImage:
    """Everything a backend needs to start the guest."""

    regions: tuple[Region, ...]
    boot: BootState
    program: str  # what the code does, e.g. "doorbell-loop:mmio-write:1"
    code_gpa: int
    code_size: int

    @property
    def cpl(self) -> int:
        return self.boot.cpl
