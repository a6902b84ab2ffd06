"""Random guest programs for differential fuzzing (simulator against this host's KVM).

A :class:`DiffProgram` is one batch of straight-line guest code plus the machine around it:

1. the general registers start at random values (the boot state's GPRs; RSP stays at the
   stack top);
2. a random sequence of :class:`Op` steps: register loads of immediates, and memory and port
   accesses of every width: ``MOV`` stores from a register or an immediate, ``MOVNTI``
   stores, ``MOV``/``MOVZX``/``MOVSX``/``MOVSXD`` loads (and the ``MOV`` accumulator/moffs
   forms), ``IN``/``OUT`` through ``DX`` or an 8-bit immediate port, to the RAM data area,
   the read-only memslot, the MMIO hole (on and around ioeventfds) and ports with and without
   PIO ioeventfds;
3. ``out DONE_PORT, al`` then ``jmp $``: both backends stop on the same RIP (the simulator's
   unicorn takes a stop requested from the OUT hook at the end of the translated block, and
   ``jmp $`` ends it; sim/cpu.py).

Every memory access is naturally aligned (so it never crosses a page) and lies inside its
region; its address is put in the base (and index) register just before it, so the
addressing form (``[base]``, ``[base+disp]``, ``[base+index*scale+disp]``, 32-bit addressing
with the 0x67 prefix, ``[rip+disp32]``, ``[disp32]``, 64-bit ``moffs``, an ``FS``/``GS``
override with base 0) is free. The instruction forms are those the simulator's KVM emulator
executes (:mod:`fastmmio.sim.kvm.emulator`: MOV/MOVNTI stores, MOV/MOVZX/MOVSX/MOVSXD loads);
anything else is the hostile fuzzer's business (:mod:`fastmmio.fuzz.hostile`).

The machine gets a few ioeventfds (:func:`ioeventfd_sets`): on the MMIO hole and the
read-only slot wildcard lengths 1/2/4/8, length 0 (``KVM_FAST_MMIO_BUS`` too) and DATAMATCH;
on ports lengths 0/1/2/4/8 and DATAMATCH. Every set obeys ``kvm_assign_ioeventfd()``'s
collision rule (``ioeventfd_check_collision``, virt/kvm/eventfd.c), so KVM accepts it. It
may also get coalesced zones (:data:`COALESCED_ZONES`: a page of the MMIO hole, a few ports),
whose writes go to the coalesced ring instead of exiting (virt/kvm/coalesced_mmio.c), and
which share the buses with the ioeventfds.

Everything is encoded with iced-x86 (no raw bytes); a program is plain data and round-trips
through JSON (:meth:`DiffProgram.to_json` / :meth:`DiffProgram.from_json`), which is how
shrunk disagreements are kept as regression tests (``tests/kvm/regressions/``).

:func:`programs` is the hypothesis strategy; it shrinks towards fewer steps, plain ``[base]``
addressing, RAM targets and zero values.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from hypothesis import strategies as st
from iced_x86 import Code, Instruction, MemoryOperand, Register

from fastmmio import kvmabi, layout
from fastmmio.errors import UsageError
from fastmmio.guest.asm import Asm, disassemble
from fastmmio.image import Region
from fastmmio.guest.raw import build_raw_image
from fastmmio.machine import CoalescedZone, IoEventFdSpec, Machine, MachineSpec, MemSlot

M64 = (1 << 64) - 1

# ------------------------------------------------------------------------------------------
# Regions the programs touch
# ------------------------------------------------------------------------------------------

DATA_SIZE = 2 * layout.PAGE_SIZE  # the RAM data area: [DATA_GPA, DATA_GPA + DATA_SIZE)
REGIONS: dict[str, tuple[int, int]] = {
    "ram": (layout.DATA_GPA, DATA_SIZE),
    "ro": (layout.RO_BASE, layout.RO_SIZE),
    "mmio": (layout.MMIO_BASE, layout.MMIO_SIZE),
}
PORT_RANGE = (layout.DOORBELL_PORT, 0x100)  # ports [0xE000, 0xE100) besides a few low ones
LOW_PORTS = tuple(p for p in range(0x60, 0x100, 0x0B) if p != layout.DONE_PORT)

GPR64 = ("RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI",
         "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15")
_BY_WIDTH = {
    1: ("AL", "CL", "DL", "BL", "SPL", "BPL", "SIL", "DIL",
        "R8L", "R9L", "R10L", "R11L", "R12L", "R13L", "R14L", "R15L"),
    2: ("AX", "CX", "DX", "BX", "SP", "BP", "SI", "DI",
        "R8W", "R9W", "R10W", "R11W", "R12W", "R13W", "R14W", "R15W"),
    4: ("EAX", "ECX", "EDX", "EBX", "ESP", "EBP", "ESI", "EDI",
        "R8D", "R9D", "R10D", "R11D", "R12D", "R13D", "R14D", "R15D"),
    8: GPR64,
}
HIGH8 = ("AH", "CH", "DH", "BH")  # encodable only without a REX prefix
_HIGH8_FULL = {"AH": "RAX", "CH": "RCX", "DH": "RDX", "BH": "RBX"}
ACC = {1: "AL", 2: "AX", 4: "EAX", 8: "RAX"}
INIT_GPRS = tuple(r.lower() for r in GPR64 if r != "RSP")  # boot-state registers set at random

COALESCED_ZONES = (
    CoalescedZone(layout.COALESCED_GPA, layout.PAGE_SIZE),  # the route catalogue's zone
    CoalescedZone(layout.MMIO_BASE + 0x20, 0x20),  # shares the first page with ioeventfds
    CoalescedZone(layout.COALESCED_PORT, 8, pio=True),
    CoalescedZone(PORT_RANGE[0], 4, pio=True),
)
"""Zones a program may register (never overlapping one another: KVM does not check that)."""

INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000,
               0xFFFF_FFFF, 0x1_0000_0000, 0x7FFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000, M64,
               0x1122_3344_5566_7788, 0x8877_6655_4433_2211)


def full_register(name: str) -> str:
    """The 64-bit register holding ``name`` (``"AH"`` -> ``"RAX"``, ``"R9D"`` -> ``"R9"``)."""
    if name in _HIGH8_FULL:
        return _HIGH8_FULL[name]
    for regs in _BY_WIDTH.values():
        if name in regs:
            return GPR64[regs.index(name)]
    raise UsageError(f"unknown general register {name!r}")


def register_width(name: str) -> int:
    if name in HIGH8:
        return 1
    for w, regs in _BY_WIDTH.items():
        if name in regs:
            return w
    raise UsageError(f"unknown general register {name!r}")


def needs_rex(name: str) -> bool:
    """Registers only reachable with a REX prefix (R8-R15 in every width, SPL/BPL/SIL/DIL)."""
    full = full_register(name)
    return GPR64.index(full) >= 8 or name in ("SPL", "BPL", "SIL", "DIL")


def _reg(name: str) -> Register:
    return getattr(Register, name)


# ------------------------------------------------------------------------------------------
# Program data
# ------------------------------------------------------------------------------------------

MEM_MODES = ("base", "base_disp", "sib", "rip", "abs", "moffs")


@dataclass(frozen=True)
class MemRef:
    """How a memory operand reaches its address.

    ``base``: ``[base]``; ``base_disp``: ``[base+disp]``; ``sib``: ``[base+index*scale+disp]``
    (``index`` holds ``index_value``); ``rip``: ``[rip+disp32]``; ``abs``: ``[disp32]`` (SIB
    with no base); ``moffs``: ``MOV`` accumulator with a 64-bit absolute offset. ``addr32``
    uses the 32-bit names of base and index (0x67 prefix, address computed modulo 2^32).
    ``segment``: ``""``, ``"FS"`` or ``"GS"`` (their bases are 0 here)."""

    mode: str = "base"
    base: str = ""  # 64-bit register name
    index: str = ""  # 64-bit register name, never RSP
    scale: int = 1
    disp: int = 0
    index_value: int = 0
    addr32: bool = False
    segment: str = ""


OP_KINDS = ("set", "store", "load", "out", "in")


@dataclass(frozen=True)
class Op:
    """One step of a program.

    ``kind``: ``set`` (``reg`` <- ``value``: ``mov r64, imm64`` or, with form ``imm32``,
    ``mov r32, imm32``), ``store``, ``load``, ``out``, ``in``. ``width``: bytes accessed.
    ``reg``: the register operand (iced register name): a store's or OUT's source, a load's or
    IN's destination. ``form``: store ``mov``/``mov_imm``/``movnti``; load
    ``mov``/``movzx``/``movsx``/``movsxd``; port ``dx``/``imm8``. ``value``: a store's
    immediate, or the value put in a store's/OUT's source register first (None: whatever it
    holds). ``region``/``addr``: memory region name and guest-physical (= linear) address, or
    the port. ``mem``: the addressing form."""

    kind: str
    width: int = 0
    reg: str = ""
    form: str = ""
    value: int | None = None
    region: str = ""
    addr: int = 0
    mem: MemRef | None = None

    def describe(self) -> str:
        if self.kind == "set":
            return f"set {self.reg}={self.value:#x}"
        v = "" if self.value is None else f"={self.value:#x}"
        if self.kind in ("out", "in"):
            return f"{self.kind}:{self.width}@port {self.addr:#x}{v} ({self.form})"
        mode = self.mem.mode if self.mem else "?"
        return f"{self.kind}:{self.form}:{self.width}@{self.region} {self.addr:#x}{v} ({mode})"


@dataclass(frozen=True)
class DiffProgram:
    """A random guest program and the machine it runs in (see the module docstring)."""

    ops: tuple[Op, ...]
    gprs: Mapping[str, int] = field(default_factory=dict)  # boot-state registers, lower-case
    ioeventfds: tuple[IoEventFdSpec, ...] = ()
    coalesced: tuple[CoalescedZone, ...] = ()  # KVM_REGISTER_COALESCED_MMIO zones
    device_read_value: int = layout.DEVICE_READ_VALUE
    data_seed: int = 0  # the RAM data area starts as data_bytes(data_seed); 0 = zeros
    cpl: int = 3

    # -- the machine -----------------------------------------------------------------------

    def spec(self) -> MachineSpec:
        """RAM slot, read-only slot (RO_PATTERN), MMIO hole, and this program's ioeventfds."""
        return MachineSpec(
            memslots=(
                MemSlot(layout.RAM_SLOT, layout.RAM_BASE, layout.RAM_SIZE),
                MemSlot(layout.RO_SLOT, layout.RO_BASE, layout.RO_SIZE, readonly=True,
                        fill=layout.RO_PATTERN),
            ),
            ioeventfds=tuple(self.ioeventfds),
            coalesced=tuple(self.coalesced),
            done_port=layout.DONE_PORT,
            device_read_value=self.device_read_value,
            mmio_holes=((layout.MMIO_BASE, layout.MMIO_SIZE),),
        )

    def code(self) -> bytes:
        return encode_ops(self.ops).encode(layout.CODE_GPA)

    def machine(self) -> Machine:
        code = self.code()
        regions = (Region(layout.DATA_GPA, data_bytes(self.data_seed), "data"),)
        image = build_raw_image(code, self.cpl, program=f"diff:{self.digest()}",
                                gprs=dict(self.gprs), extra_regions=regions)
        return Machine(image=image, spec=self.spec())

    # -- describing -------------------------------------------------------------------------

    def listing(self) -> list[str]:
        """The code, disassembled (Intel syntax), one ``address: instruction`` per line."""
        return disassemble(self.code(), layout.CODE_GPA)

    def describe_machine(self) -> list[str]:
        lines = [f"CPL{self.cpl}; device read value {self.device_read_value:#x}; "
                 f"data area seed {self.data_seed:#x}"]
        for ev in self.ioeventfds:
            dm = "wildcard" if ev.datamatch is None else f"DATAMATCH {ev.datamatch:#x}"
            lines.append(f"ioeventfd {ev.name}: {'PIO' if ev.pio else 'MMIO'} {ev.addr:#x} "
                         f"len {ev.length} {dm}")
        for z in self.coalesced:
            lines.append(f"coalesced {'PIO' if z.pio else 'MMIO'} zone {z.addr:#x}+{z.size:#x}")
        regs = " ".join(f"{k}={v:#x}" for k, v in sorted(self.gprs.items()))
        lines.append(f"initial registers: {regs or '(all 0)'}")
        return lines

    # -- JSON -------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "cpl": self.cpl,
            "device_read_value": self.device_read_value,
            "data_seed": self.data_seed,
            "gprs": {k: self.gprs[k] for k in sorted(self.gprs)},
            "ioeventfds": [asdict(e) for e in self.ioeventfds],
            "coalesced": [asdict(z) for z in self.coalesced],
            "ops": [_op_json(o) for o in self.ops],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "DiffProgram":
        try:
            ops = tuple(_op_from_json(o) for o in d["ops"])
            evs = tuple(IoEventFdSpec(**e) for e in d.get("ioeventfds", ()))
            zones = tuple(CoalescedZone(**z) for z in d.get("coalesced", ()))
            prog = cls(ops=ops, gprs=dict(d.get("gprs", {})), ioeventfds=evs, coalesced=zones,
                       device_read_value=int(d.get("device_read_value", layout.DEVICE_READ_VALUE)),
                       data_seed=int(d.get("data_seed", 0)), cpl=int(d.get("cpl", 3)))
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"not a differential-fuzzing program: {exc!r}") from None
        prog.validate()
        return prog

    def digest(self) -> str:
        """A short stable name of the program (of its JSON form)."""
        text = json.dumps(self.to_json(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def validate(self) -> None:
        """Raise :class:`UsageError` unless every op stays inside its region, is naturally
        aligned, avoids the done port, and the program encodes."""
        if self.cpl not in (0, 3):
            raise UsageError(f"CPL must be 0 or 3, not {self.cpl}")
        for op in self.ops:
            validate_op(op)
        for name in self.gprs:
            if name not in INIT_GPRS:
                raise UsageError(f"initial register {name!r} is not one of {', '.join(INIT_GPRS)}")
        try:
            self.code()
        except (ValueError, RuntimeError, AttributeError, KeyError) as exc:
            raise UsageError(f"the program does not encode: {exc}") from None


def data_bytes(seed: int) -> bytes:
    """The data area's initial contents: zeros for seed 0, else a seeded random pattern."""
    if not seed:
        return bytes(DATA_SIZE)
    return random.Random(seed).randbytes(DATA_SIZE)


def _op_json(op: Op) -> dict[str, Any]:
    d = asdict(op)
    if op.mem is None:
        del d["mem"]
    return {k: v for k, v in d.items() if v not in ("", None) or k == "kind"}


def _op_from_json(d: Mapping[str, Any]) -> Op:
    d = dict(d)
    mem = d.pop("mem", None)
    return Op(**d, mem=MemRef(**mem) if mem is not None else None)


def movsxd_crosses_page(form: str, width: int, addr: int) -> bool:
    """``movsxd r16, m16`` on the last two bytes of a page: left out of the programs.

    The processor reads 2 bytes (SDM Vol. 2B, MOVSX/MOVSXD), but the simulator's CPU,
    unicorn 2.1 (QEMU's TCG), loads 4 bytes for opcode 0x63 whatever the operand size, and
    so does KVM's emulator (``mode_dual_63``: ``SrcMem32``). At page offset 0xFFE that load
    crosses into the next page: unicorn takes a #PF where the next page is not mapped (found
    by this fuzzer: the end of the read-only slot, a shutdown on the simulator and a clean
    load on real KVM), and on MMIO KVM would emulate a page-crossing read, which the
    simulator's emulator does not model (page-crossing accesses are the hostile fuzzer's
    business). Neither says anything about doorbells."""
    return form == "movsxd" and width == 2 and addr & 0xFFF == 0xFFE


def validate_op(op: Op) -> None:
    if op.kind not in OP_KINDS:
        raise UsageError(f"unknown op kind {op.kind!r}")
    if op.kind == "set":
        if op.value is None or not 0 <= op.value <= M64:
            raise UsageError(f"{op.kind}: value must be a u64")
        return
    if op.kind in ("out", "in"):
        if op.width not in (1, 2, 4):
            raise UsageError(f"port access width {op.width}")
        if op.addr == layout.DONE_PORT or not 0 <= op.addr <= 0xFFFF:
            raise UsageError(f"port {op.addr:#x} is the done port or not a port")
        if op.form == "imm8" and op.addr > 0xFF:
            raise UsageError(f"port {op.addr:#x} does not fit an 8-bit immediate")
        return
    if op.region not in REGIONS:
        raise UsageError(f"unknown region {op.region!r}")
    lo, size = REGIONS[op.region]
    if op.width not in (1, 2, 4, 8) or op.addr % op.width:
        raise UsageError(f"{op.describe()}: access not naturally aligned")
    if not lo <= op.addr < lo + size - op.width + 1:
        raise UsageError(f"{op.describe()}: outside its region")
    if op.kind == "load" and movsxd_crosses_page(op.form, op.width, op.addr):
        raise UsageError(f"{op.describe()}: movsxd r16 reads 4 bytes under unicorn and KVM, "
                         "crossing a page here (see movsxd_crosses_page)")
    m = op.mem
    if m is None or m.mode not in MEM_MODES:
        raise UsageError(f"{op.describe()}: no valid addressing form")
    if m.mode in ("base", "base_disp", "sib"):
        if m.base not in GPR64 or (m.mode == "sib" and m.index not in GPR64[:4] + GPR64[5:]):
            raise UsageError(f"{op.describe()}: bad base or index register")
        if m.mode == "sib" and m.index == m.base:
            raise UsageError(f"{op.describe()}: base and index are one register")
        if (op.kind == "store" and op.value is not None and op.form != "mov_imm"
                and full_register(op.reg) in (m.base, m.index)):
            raise UsageError(f"{op.describe()}: the value would overwrite an address register")
    if m.mode == "moffs" and op.reg != ACC[op.width]:
        raise UsageError(f"{op.describe()}: moffs needs the accumulator")


# ------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------

_STORE = {1: Code.MOV_RM8_R8, 2: Code.MOV_RM16_R16, 4: Code.MOV_RM32_R32, 8: Code.MOV_RM64_R64}
_STORE_IMM = {1: Code.MOV_RM8_IMM8, 2: Code.MOV_RM16_IMM16, 4: Code.MOV_RM32_IMM32,
              8: Code.MOV_RM64_IMM32}
_MOVNTI = {4: Code.MOVNTI_M32_R32, 8: Code.MOVNTI_M64_R64}
_LOAD = {1: Code.MOV_R8_RM8, 2: Code.MOV_R16_RM16, 4: Code.MOV_R32_RM32, 8: Code.MOV_R64_RM64}
# (memory width, destination width) -> code
_MOVZX = {(1, 2): Code.MOVZX_R16_RM8, (1, 4): Code.MOVZX_R32_RM8, (1, 8): Code.MOVZX_R64_RM8,
          (2, 2): Code.MOVZX_R16_RM16, (2, 4): Code.MOVZX_R32_RM16, (2, 8): Code.MOVZX_R64_RM16}
_MOVSX = {(1, 2): Code.MOVSX_R16_RM8, (1, 4): Code.MOVSX_R32_RM8, (1, 8): Code.MOVSX_R64_RM8,
          (2, 2): Code.MOVSX_R16_RM16, (2, 4): Code.MOVSX_R32_RM16, (2, 8): Code.MOVSX_R64_RM16}
_MOVSXD = {(4, 8): Code.MOVSXD_R64_RM32, (4, 4): Code.MOVSXD_R32_RM32, (2, 2): Code.MOVSXD_R16_RM16}
LOAD_FORMS = {"mov": {(w, w): c for w, c in _LOAD.items()}, "movzx": _MOVZX, "movsx": _MOVSX,
              "movsxd": _MOVSXD}
_MOFFS_LOAD = {1: Code.MOV_AL_MOFFS8, 2: Code.MOV_AX_MOFFS16, 4: Code.MOV_EAX_MOFFS32,
               8: Code.MOV_RAX_MOFFS64}
_MOFFS_STORE = {1: Code.MOV_MOFFS8_AL, 2: Code.MOV_MOFFS16_AX, 4: Code.MOV_MOFFS32_EAX,
                8: Code.MOV_MOFFS64_RAX}
_OUT_DX = {1: Code.OUT_DX_AL, 2: Code.OUT_DX_AX, 4: Code.OUT_DX_EAX}
_IN_DX = {1: Code.IN_AL_DX, 2: Code.IN_AX_DX, 4: Code.IN_EAX_DX}
_OUT_IMM = {1: Code.OUT_IMM8_AL, 2: Code.OUT_IMM8_AX, 4: Code.OUT_IMM8_EAX}
_IN_IMM = {1: Code.IN_AL_IMM8, 2: Code.IN_AX_IMM8, 4: Code.IN_EAX_IMM8}


def _set64(asm: Asm, full: str, value: int) -> None:
    asm.emit(Instruction.create_reg_u64(Code.MOV_R64_IMM64, _reg(full), value & M64))


def _to32(name: str) -> str:
    return _BY_WIDTH[4][GPR64.index(name)]


def memory_operand(asm: Asm, op: Op) -> MemoryOperand:
    """Put the address registers in place (``mov base, imm64``; ``mov index, imm64``) and
    return the operand that addresses ``op.addr``."""
    m = op.mem
    assert m is not None
    seg = _reg(m.segment) if m.segment else Register.NONE
    if m.mode in ("rip", "abs", "moffs"):
        if m.mode == "rip":
            return MemoryOperand(Register.RIP, displ=op.addr, displ_size=8, seg=seg)
        return MemoryOperand(displ=op.addr, displ_size=8 if m.mode == "moffs" else 4, seg=seg)
    disp = m.disp if m.mode != "base" else 0
    index_part = m.index_value * m.scale if m.mode == "sib" else 0
    _set64(asm, m.base, op.addr - disp - index_part)
    base = _reg(_to32(m.base) if m.addr32 else m.base)
    if m.mode == "sib":
        _set64(asm, m.index, m.index_value)
        index = _reg(_to32(m.index) if m.addr32 else m.index)
        return MemoryOperand(base, index, m.scale, displ=disp, displ_size=1, seg=seg)
    return MemoryOperand(base, displ=disp, displ_size=1 if disp else 0, seg=seg)


def _source_value(asm: Asm, op: Op) -> None:
    """Put ``op.value`` in the store's/OUT's source register (shifted into AH..BH)."""
    if op.value is None or op.form == "mov_imm":
        return
    shift = 8 if op.reg in HIGH8 else 0
    _set64(asm, full_register(op.reg), op.value << shift)


def encode_op(asm: Asm, op: Op) -> None:
    """The instructions of one step."""
    k = op.kind
    if k == "set":
        assert op.value is not None
        if op.form == "imm32":
            asm.emit(Instruction.create_reg_u32(Code.MOV_R32_IMM32, _reg(_to32(op.reg)),
                                                op.value & 0xFFFF_FFFF))
        else:
            _set64(asm, op.reg, op.value)
        return
    if k in ("out", "in"):
        if k == "out":
            _source_value(asm, op)
        acc = _reg(ACC[op.width])
        if op.form == "imm8":
            if k == "out":
                asm.emit(Instruction.create_u32_reg(_OUT_IMM[op.width], op.addr, acc))
            else:
                asm.emit(Instruction.create_reg_u32(_IN_IMM[op.width], acc, op.addr))
            return
        asm.emit(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EDX, op.addr))
        if k == "out":
            asm.emit(Instruction.create_reg_reg(_OUT_DX[op.width], Register.DX, acc))
        else:
            asm.emit(Instruction.create_reg_reg(_IN_DX[op.width], acc, Register.DX))
        return
    assert op.mem is not None
    if k == "store":
        mem = memory_operand(asm, op)
        _source_value(asm, op)
        if op.mem.mode == "moffs":
            asm.emit(Instruction.create_mem_reg(_MOFFS_STORE[op.width], mem, _reg(op.reg)))
        elif op.form == "mov_imm":
            value = op.value or 0
            if op.width == 8:  # imm32 sign-extended to 64 bits
                if sext32(value) != value:
                    raise UsageError(f"{value:#x} is not a sign-extended imm32")
                v32 = value & 0xFFFF_FFFF
                asm.emit(Instruction.create_mem_i32(_STORE_IMM[8], mem, v32 - (1 << 32) if v32 >> 31 else v32))
            else:
                asm.emit(Instruction.create_mem_u32(_STORE_IMM[op.width], mem, value))
        elif op.form == "movnti":
            asm.emit(Instruction.create_mem_reg(_MOVNTI[op.width], mem, _reg(op.reg)))
        else:
            asm.emit(Instruction.create_mem_reg(_STORE[op.width], mem, _reg(op.reg)))
        return
    if k == "load":
        mem = memory_operand(asm, op)
        if op.mem.mode == "moffs":
            asm.emit(Instruction.create_reg_mem(_MOFFS_LOAD[op.width], _reg(op.reg), mem))
            return
        code = LOAD_FORMS[op.form][(op.width, register_width(op.reg))]
        asm.emit(Instruction.create_reg_mem(code, _reg(op.reg), mem))
        return
    raise UsageError(f"unknown op kind {k!r}")


def encode_ops(ops: tuple[Op, ...] | list[Op]) -> Asm:
    """The whole program: every op, then ``out DONE_PORT, al`` and ``jmp $``."""
    asm = Asm()
    for op in ops:
        encode_op(asm, op)
    asm.emit(Instruction.create_u32_reg(Code.OUT_IMM8_AL, layout.DONE_PORT, Register.AL))
    here = asm.label()
    asm.bind(here)
    asm.branch(Code.JMP_REL8_64, here)
    return asm


# ------------------------------------------------------------------------------------------
# ioeventfd sets
# ------------------------------------------------------------------------------------------


def collides(a: IoEventFdSpec, b: IoEventFdSpec) -> bool:
    """``ioeventfd_check_collision`` (virt/kvm/eventfd.c), as :func:`fastmmio.kvmabi.collides`."""
    return kvmabi.collides(a.key, b.key)


def valid_set(specs: list[IoEventFdSpec]) -> list[IoEventFdSpec]:
    """``specs`` in order, dropping each one KVM would refuse after the ones kept before it
    (:func:`fastmmio.kvmabi.assign_check`'s EINVAL, or EEXIST)."""
    kept: list[IoEventFdSpec] = []
    for s in specs:
        if kvmabi.assign_check(s.addr, s.length, s.flags) is not None:
            continue
        if any(collides(s, k) for k in kept):
            continue
        kept.append(s)
    return kept


# kvm_assign_ioeventfd's lengths, 1 first (hypothesis shrinks towards the first)
_LENGTHS = (1,) + tuple(n for n in kvmabi.IOEVENTFD_LENGTHS if n != 1)

values = st.one_of(st.sampled_from(INTERESTING), st.integers(0, M64))


@st.composite
def _ioeventfd(draw, where: str) -> IoEventFdSpec:
    pio = where == "pio"
    length = draw(st.sampled_from(_LENGTHS))
    datamatch = None
    if length and draw(st.booleans()):
        v = draw(values)
        datamatch = v & ((1 << (8 * length)) - 1)
    if pio:
        if draw(st.integers(0, 3)) == 0:
            addr = draw(st.sampled_from(LOW_PORTS))
        else:
            addr = PORT_RANGE[0] + 4 * draw(st.integers(0, 7)) + draw(st.sampled_from((0, 0, 0, 1, 2)))
    else:
        lo = REGIONS[where][0]
        # a few pages and slots, so that ioeventfds share pages, addresses and ranges
        addr = lo + 0x1000 * draw(st.integers(0, 2)) + 8 * draw(st.integers(0, 7))
        addr += draw(st.sampled_from((0, 0, 0, 0, 1, 2, 4)))
    return IoEventFdSpec("", pio, addr, length, datamatch)


@st.composite
def ioeventfd_sets(draw) -> tuple[IoEventFdSpec, ...]:
    """A few ioeventfds KVM accepts: on the MMIO hole, the read-only slot and ports."""
    raw = (draw(st.lists(_ioeventfd("mmio"), max_size=5))
           + draw(st.lists(_ioeventfd("ro"), max_size=1))
           + draw(st.lists(_ioeventfd("pio"), max_size=4)))
    kept = valid_set(raw)
    return tuple(replace(s, name=f"{'pio' if s.pio else 'ro' if s.addr < layout.MMIO_BASE else 'mmio'}-{i}")
                 for i, s in enumerate(kept))


# ------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------


@st.composite
def _address(draw, region: str, width: int, evs: tuple[IoEventFdSpec, ...],
             zones: tuple[CoalescedZone, ...] = ()) -> int:
    """A naturally aligned address in ``region``, often on or next to an ioeventfd there."""
    lo, size = REGIONS[region]
    near = [e.addr for e in evs if not e.pio and lo <= e.addr < lo + size]
    near += [z.addr + z.size // 2 for z in zones if not z.pio and lo <= z.addr < lo + size]
    near += [z.addr + z.size for z in zones if not z.pio and lo <= z.addr < lo + size]
    if near and draw(st.integers(0, 2)):
        addr = draw(st.sampled_from(near)) + draw(st.sampled_from((0, 0, 0, 1, 2, 4, -1, -4, 8)))
    elif region == "ram" or draw(st.booleans()):
        addr = lo + draw(st.integers(0, size - 1))
    else:  # the first two pages, where ioeventfds live, more often
        addr = lo + draw(st.integers(0, 0x1FFF))
    addr &= ~(width - 1)
    return min(max(addr, lo), lo + size - width)


def _value_for(draw, addr: int, width: int, pio: bool, evs: tuple[IoEventFdSpec, ...]) -> int | None:
    """A value to write: often a DATAMATCH value registered at ``addr``, else random or
    whatever the register holds (None)."""
    dms = [e.datamatch for e in evs if e.pio == pio and e.addr == addr and e.datamatch is not None]
    choice = draw(st.integers(0, 3))
    if dms and choice:
        return draw(st.sampled_from(dms))
    if choice >= 2:
        return None
    return draw(values)


@st.composite
def _memref(draw, legacy_only: bool, width: int, moffs_ok: bool) -> MemRef:
    mode = draw(st.sampled_from(MEM_MODES if moffs_ok else MEM_MODES[:-1]))
    if mode in ("rip", "abs", "moffs"):
        segment = draw(st.sampled_from(("", "", "", "FS", "GS")))
        return MemRef(mode=mode, segment=segment)
    pool = GPR64[:8] if legacy_only else GPR64
    base = draw(st.sampled_from(pool))
    index, scale, index_value, disp = "", 1, 0, 0
    if mode == "sib":
        index = draw(st.sampled_from([r for r in pool if r not in ("RSP", base)]))
        scale = draw(st.sampled_from((1, 2, 4, 8)))
        index_value = draw(st.one_of(st.integers(-0x100, 0x100), st.sampled_from((0, 1, -1))))
    if mode in ("base_disp", "sib"):
        disp = draw(st.one_of(st.integers(-0x80, 0x7F), st.integers(-(1 << 31), (1 << 31) - 1)))
    addr32 = draw(st.integers(0, 4)) == 0
    segment = draw(st.sampled_from(("", "", "", "", "FS", "GS")))
    return MemRef(mode=mode, base=base, index=index, scale=scale, disp=disp,
                  index_value=index_value, addr32=addr32, segment=segment)


def _mem_needs_rex(mem: MemRef) -> bool:
    return any(r and needs_rex(r) for r in (mem.base, mem.index))


def _pick_reg(draw, width: int, mem: MemRef, avoid: tuple[str, ...] = (),
              high8: bool = False) -> str:
    """A register operand of ``width`` bytes, not held in ``avoid``; AH..BH only when the
    instruction needs no REX prefix for its memory operand (and one of them if ``high8``)."""
    if high8 and width == 1 and not _mem_needs_rex(mem):
        names = [n for n in HIGH8 if full_register(n) not in avoid]
        if names:
            return draw(st.sampled_from(names))
    names = list(_BY_WIDTH[width])
    if width == 1 and not _mem_needs_rex(mem):
        names += HIGH8
    names = [n for n in names if full_register(n) not in avoid]
    return draw(st.sampled_from(names))


def sext32(value: int) -> int:
    """The 64-bit sign extension of the low 32 bits of ``value`` (what ``mov r/m64, imm32``
    stores)."""
    v = value & 0xFFFF_FFFF
    return (v | 0xFFFF_FFFF_0000_0000) if v >> 31 else v


@st.composite
def _store(draw, evs: tuple[IoEventFdSpec, ...], zones: tuple[CoalescedZone, ...] = ()) -> Op:
    region = draw(st.sampled_from(tuple(REGIONS)))
    form = draw(st.sampled_from(("mov", "mov_imm", "movnti", "moffs")))
    width = draw(st.sampled_from((4, 8) if form == "movnti" else (1, 2, 4, 8)))
    addr = draw(_address(region, width, evs, zones))
    value = _value_for(draw, addr, width, False, evs)
    if form == "moffs":
        mem = MemRef(mode="moffs", segment=draw(st.sampled_from(("", "", "FS", "GS"))))
        return Op("store", width, ACC[width], "mov", value, region, addr, mem)
    if form == "mov_imm":
        v = (draw(values) if value is None else value) & ((1 << (8 * width)) - 1)
        if width == 8:
            v = sext32(v)
        mem = draw(_memref(False, width, False))
        return Op("store", width, "", "mov_imm", v, region, addr, mem)
    high8 = width == 1 and draw(st.integers(0, 4)) == 0
    mem = draw(_memref(high8, width, False))
    # a value put in the source register first must not overwrite the address registers
    avoid = (mem.base, mem.index) if value is not None else ()
    reg = _pick_reg(draw, width, mem, avoid, high8)
    return Op("store", width, reg, form, value, region, addr, mem)


@st.composite
def _load(draw, evs: tuple[IoEventFdSpec, ...], zones: tuple[CoalescedZone, ...] = ()) -> Op:
    region = draw(st.sampled_from(tuple(REGIONS)))
    form = draw(st.sampled_from(("mov", "movzx", "movsx", "movsxd", "moffs")))
    if form == "moffs":
        width = draw(st.sampled_from((1, 2, 4, 8)))
        addr = draw(_address(region, width, evs, zones))
        mem = MemRef(mode="moffs", segment=draw(st.sampled_from(("", "", "FS", "GS"))))
        return Op("load", width, ACC[width], "mov", None, region, addr, mem)
    width, dest_width = draw(st.sampled_from(sorted(LOAD_FORMS[form])))
    addr = draw(_address(region, width, evs, zones))
    if movsxd_crosses_page(form, width, addr):
        addr -= 2
    high8 = form == "mov" and width == 1 and draw(st.integers(0, 4)) == 0
    mem = draw(_memref(high8, width, False))
    reg = _pick_reg(draw, dest_width, mem, high8=high8)
    return Op("load", width, reg, form, None, region, addr, mem)


@st.composite
def _port_op(draw, kind: str, evs: tuple[IoEventFdSpec, ...],
             zones: tuple[CoalescedZone, ...] = ()) -> Op:
    width = draw(st.sampled_from((1, 2, 4)))
    ports = [e.addr for e in evs if e.pio] + [z.addr + k for z in zones if z.pio for k in (0, z.size - 1)]
    c = draw(st.integers(0, 3))
    if ports and c:
        port = draw(st.sampled_from(ports)) + draw(st.sampled_from((0, 0, 0, 1, 2, -1)))
    elif c == 0 and draw(st.booleans()):
        port = draw(st.sampled_from(LOW_PORTS))
    else:
        port = PORT_RANGE[0] + draw(st.integers(0, PORT_RANGE[1] - 1))
    if port == layout.DONE_PORT or not 0 <= port <= 0xFFFF:
        port = PORT_RANGE[0]
    form = "imm8" if port <= 0xFF and draw(st.booleans()) else "dx"
    value = _value_for(draw, port, width, True, evs) if kind == "out" else None
    return Op(kind, width, ACC[width], form, value, "", port)


@st.composite
def _set(draw) -> Op:
    reg = draw(st.sampled_from(GPR64))
    form = draw(st.sampled_from(("imm64", "imm32")))
    value = draw(values)
    if form == "imm32":
        value &= 0xFFFF_FFFF
    return Op("set", 8 if form == "imm64" else 4, reg, form, value)


def ops(evs: tuple[IoEventFdSpec, ...], zones: tuple[CoalescedZone, ...] = ()) -> st.SearchStrategy[Op]:
    """One step: a store, a load, an OUT, an IN, or a register load (in shrinking order)."""
    return st.one_of(_store(evs, zones), _load(evs, zones), _port_op("out", evs, zones),
                     _port_op("in", evs, zones), _set())


@st.composite
def programs(draw, max_ops: int = 24, cpl: int = 3) -> DiffProgram:
    """The hypothesis strategy for :class:`DiffProgram` (see the module docstring)."""
    evs = draw(ioeventfd_sets())
    zones = tuple(draw(st.lists(st.sampled_from(COALESCED_ZONES), unique=True, max_size=2)))
    gprs = draw(st.fixed_dictionaries({r: values for r in INIT_GPRS}))
    # several short lists rather than one long one: hypothesis keeps a list's average length
    # near 5 whatever its maximum, and each list still shrinks element by element
    steps: list[Op] = []
    for _ in range(max(1, max_ops // 8)):
        steps += draw(st.lists(ops(evs, zones), max_size=min(8, max_ops)))
    device_read_value = draw(values)
    data_seed = draw(st.one_of(st.just(0), st.integers(1, (1 << 32) - 1)))
    return DiffProgram(ops=tuple(steps), gprs=gprs, ioeventfds=evs, coalesced=zones,
                       device_read_value=device_read_value, data_seed=data_seed, cpl=cpl)
