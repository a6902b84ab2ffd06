"""The guest image both backends load: memory contents plus a boot state.

A backend copies each :class:`Region` into the memslot that covers its guest-physical
address, then loads :class:`BootState` directly (KVM_SET_SREGS / KVM_SET_REGS on real KVM;
the simulator's register file), so the guest starts in 64-bit long mode at the chosen CPL
with no boot code of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Segment:
    """A segment register's hidden state, as KVM's ``struct kvm_segment`` holds it."""

    selector: int
    base: int = 0
    limit: int = 0xFFFF_FFFF
    type: int = 0  # 4-bit type field (e.g. 0xB execute/read accessed code, 0x3 r/w accessed data)
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1  # 1 = code/data, 0 = system (TSS, LDT)
    l: int = 0  # 64-bit code segment
    g: int = 1
    avl: int = 0
    unusable: int = 0


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
