"""KVM's x86 instruction emulator, as far as MMIO doorbells need (and a little more).

Models arch/x86/kvm/x86.c ``x86_emulate_instruction`` and the emulator callbacks it uses,
with arch/x86/kvm/emulate.c's fetch/decode/execute reduced to the instructions an MMIO access
is made of:

* **fetch** (``__do_insn_fetch_bytes``): the instruction bytes are read through the guest's
  page tables with KVM's software walk, first up to 15 bytes or to the end of the page, then
  the rest from the next page only if the decoder needs it; each fetch counts
  ``kvm.emulate.fetch``. A fetch that faults injects the #PF into the guest.
* **instruction bytes given** (``x86_decode_insn`` with ``insn_len > 0``): on SVM with
  DecodeAssists ``npf_interception`` hands ``kvm_mmu_page_fault`` the bytes the processor
  recorded in the VMCB (APM 15.8.4), which go to the decoder as they are: nothing is fetched
  or walked (``kvm.emulate.insn_bytes`` instead of ``kvm.emulate.fetch``); none recorded
  (count 0) means KVM fetches as above.
* **decode** with iced-x86 (``kvm.emulate.decode``); 64-bit mode only.
* **execute**: ``MOV`` stores from a register or an immediate and loads into a register,
  ``MOVZX``/``MOVSX``/``MOVSXD`` loads and ``MOVNTI`` stores, widths 1/2/4/8. The operand's
  linear address is translated like ``emulator_read_write_onepage``: with ``EMULTYPE_PF`` on a
  TDP MMU, and a kernel that has the "GPA available" shortcut (``gpa_available``), the
  faulting GPA is used when its page offset equals the address's; otherwise
  ``vcpu_mmio_gva_to_gpa``: the per-vCPU MMIO gva cache never matches under TDP (its gva is
  cached as 0 there: ``handle_mmio_page_fault`` passes ``addr = 0`` when ``direct``), so the
  operand's guest page tables are walked in software (``kvm.emulate.walk``). The shortcut
  came with Tom Lendacky's "kvm: svm: Use the hardware provided GPA instead of page walk"
  (first posted 22 Aug 2016 as patch 03/28 of the AMD SEV RFC, for SVM NPF; later extended to
  VMX and moved into ``x86_emulate_ctxt``): KVM of 2013 and of 2015 always walked. A gpa the MMIO
  info names, or one that ``kvm_vcpu_read/write_guest`` cannot reach (no memslot; a write to
  a read-only one), is MMIO: ``vcpu_mmio_write`` / ``vcpu_mmio_read`` try ``KVM_MMIO_BUS``
  (no in-kernel local APIC in this model), where an ioeventfd may take the write; otherwise
  the access becomes a ``KVM_EXIT_MMIO``.
* **writeback**: a completed instruction advances RIP. A write that exits to userspace has
  already advanced RIP; a read that exits does not, and completes when userspace answers
  (``complete_emulated_mmio`` -> ``complete_emulated_io`` -> re-execution with
  ``EMULTYPE_NO_DECODE``, the value coming from ``read_prepare``).
* **skip** (``EMULTYPE_SKIP``): decode only to learn the length, then RIP = next RIP
  (``kvm.skip.decode``).
* **failure** (``handle_emulation_failure``): an instruction this model does not execute, or
  one iced-x86 cannot decode, is an emulation failure: ``KVM_EXIT_INTERNAL_ERROR``
  (``KVM_INTERNAL_ERROR_EMULATION``) at CPL 0, with ``EMULTYPE_SKIP`` or when userspace asked
  for exits on emulation errors; at CPL 3 KVM queues #UD for the guest instead. Never a Python
  exception.

The vCPU's registers are a :class:`RegisterFile` (or any mutable mapping with the same keys):
the 16 GPRs by their 64-bit names, ``rip``, ``rflags``, ``cr0``, ``cr3``, ``cr4``, ``efer``,
``cpl``, ``fs_base``, ``gs_base``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Callable, MutableMapping

from iced_x86 import (
    Decoder,
    DecoderError,
    Instruction,
    MemorySizeExt,
    Mnemonic,
    OpKind,
    Register,
    RegisterExt,
)

from fastmmio.sim.kvm.guestmem import (
    ACCESS_FETCH,
    ACCESS_READ,
    ACCESS_WRITE,
    CR0_PG,
    CR4_LA57,
    CR4_PAE,
    EFER_LMA,
    GuestMemory,
    GuestPageFault,
)
from fastmmio.sim.kvm.iobus import KVM_MMIO_BUS, KvmIoBuses

# EMULTYPE_* (arch/x86/include/asm/kvm_host.h)
EMULTYPE_NO_DECODE = 1 << 0
EMULTYPE_TRAP_UD = 1 << 1
EMULTYPE_SKIP = 1 << 2
EMULTYPE_ALLOW_RETRY_PF = 1 << 3
EMULTYPE_PF = 1 << 6

KVM_EXIT_MMIO = 6
KVM_EXIT_INTERNAL_ERROR = 17
KVM_INTERNAL_ERROR_EMULATION = 1

UD_VECTOR = 6
GP_VECTOR = 13
PF_VECTOR = 14

MAX_INSN_LEN = 15
PAGE_SIZE = 4096

GPR64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_HIGH8 = {Register.AH, Register.CH, Register.DH, Register.BH}
_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3})
_IMM_KINDS = {OpKind.IMMEDIATE8, OpKind.IMMEDIATE16, OpKind.IMMEDIATE32, OpKind.IMMEDIATE64,
              OpKind.IMMEDIATE8TO16, OpKind.IMMEDIATE8TO32, OpKind.IMMEDIATE8TO64,
              OpKind.IMMEDIATE32TO64}
_M64 = (1 << 64) - 1

Translate = Callable[[int, str], "int | GuestPageFault"]


class RegisterFile(dict):
    """A vCPU's registers as the emulator and the software walker read them (a dict with
    every key present, 0 by default)."""

    KEYS = GPR64 + ("rip", "rflags", "cr0", "cr3", "cr4", "efer", "cpl", "fs_base", "gs_base")

    def __init__(self, **values: int):
        super().__init__({k: 0 for k in self.KEYS})
        self["rflags"] = 0x2
        self.update(values)


class EmulationOutcome(str, Enum):
    CONTINUE = "continue"  # back into the guest (the exit handler returns 1)
    USER_EXIT = "user_exit"  # KVM_RUN returns with KVM_EXIT_MMIO
    FAILURE = "failure"  # KVM_RUN returns with KVM_EXIT_INTERNAL_ERROR (emulation)
    EXCEPTION = "exception"  # an exception was queued for the guest; back into the guest


@dataclass(frozen=True)
class MmioExit:
    """``run->mmio`` of a ``KVM_EXIT_MMIO``."""

    phys_addr: int
    len: int
    is_write: bool
    data: int = 0  # the value written (0 for a read until userspace answers)


@dataclass(frozen=True)
class InjectedException:
    vector: int
    error_code: int | None = None
    cr2: int | None = None


@dataclass(frozen=True)
class EmulationResult:
    outcome: EmulationOutcome
    insn_len: int = 0
    mmio: MmioExit | None = None
    exception: InjectedException | None = None
    handled_by: str = ""  # "memory", "KVM_MMIO_BUS", "userspace" or "" (nothing accessed)
    reason: str = ""

    @property
    def exit_reason(self) -> int | None:
        """The ``KVM_EXIT_*`` KVM_RUN returns with, or None when the guest simply resumes."""
        if self.outcome is EmulationOutcome.USER_EXIT:
            return KVM_EXIT_MMIO
        if self.outcome is EmulationOutcome.FAILURE:
            return KVM_EXIT_INTERNAL_ERROR
        return None


class VcpuMmioInfo:
    """The per-vCPU MMIO cache (``vcpu->arch.mmio_gva/mmio_gfn/mmio_access/mmio_gen``),
    filled by ``vcpu_cache_mmio_info`` and matched by ``vcpu_match_mmio_gpa``; valid only for
    the memslot generation it was filled in."""

    def __init__(self, generation: Callable[[], int]):
        self._generation = generation
        self.gva = 0
        self.gfn: int | None = None
        self.access = 0
        self.gen = -1

    def cache(self, gva: int, gfn: int, access: int) -> None:
        """``vcpu_cache_mmio_info``: nothing is cached while a memslot update is in progress."""
        gen = self._generation()
        if gen & (1 << 63):
            return
        self.gva = gva & ~(PAGE_SIZE - 1)
        self.gfn = gfn
        self.access = access
        self.gen = gen

    def clear(self) -> None:
        """``vcpu_clear_mmio_info``."""
        self.gfn = None
        self.gva = 0

    def match_gpa(self, gpa: int) -> bool:
        """``vcpu_match_mmio_gpa``."""
        return self.gfn is not None and self.gen == self._generation() and self.gfn == gpa >> 12


@dataclass
class _Decoded:
    insn: Instruction
    length: int
    addr32: bool


@dataclass
class _PendingRead:
    decoded: _Decoded
    gpa: int
    size: int


def _gpr(reg: Register) -> tuple[str, int, int]:
    """(64-bit register name, size in bytes, bit shift) of a GPR operand."""
    full = RegisterExt.full_register(reg)
    name = GPR64[RegisterExt.number(full)]
    return name, RegisterExt.size(reg), 8 if reg in _HIGH8 else 0


class X86Emulator:
    """One vCPU's emulator context (``struct x86_emulate_ctxt`` plus the vCPU's MMIO state).

    ``translate(gla, access)`` maps a guest linear address for "fetch", "read" or "write" to a
    gpa, or returns the :class:`GuestPageFault` the access takes (KVM's software walk:
    :class:`fastmmio.sim.kvm.guestmem.GuestPageWalker`). ``mem`` reads and writes guest
    memory through memslots; ``buses`` holds ``KVM_MMIO_BUS``.
    """

    def __init__(self, regs: MutableMapping[str, int], mem: GuestMemory, translate: Translate,
                 buses: KvmIoBuses, mmio_info: VcpuMmioInfo | None = None,
                 events: Counter | None = None, tdp: bool = True,
                 exit_on_emulation_error: bool = False, gpa_available: bool = True):
        self.regs = regs
        self.mem = mem
        self.translate = translate
        self.buses = buses
        self.mmio_info = mmio_info
        self.events: Counter = events if events is not None else Counter()
        self.tdp = tdp
        self.exit_on_emulation_error = exit_on_emulation_error
        self.gpa_available = gpa_available  # the kernel has the faulting-GPA shortcut
        self._pending: _PendingRead | None = None  # a read waiting for userspace
        self._pending_write = False

    # -- entry points -----------------------------------------------------------------------

    @property
    def userspace_io_pending(self) -> MmioExit | None:
        """The access userspace must complete before the vCPU can run on (None if none)."""
        if self._pending is not None:
            return MmioExit(self._pending.gpa, self._pending.size, False)
        return None

    def x86_emulate_instruction(self, emulation_type: int = 0,
                                cr2_or_gpa: int | None = None,
                                insn: bytes | None = None) -> EmulationResult:
        """Emulate the instruction at RIP. With ``EMULTYPE_PF``, ``cr2_or_gpa`` is the faulting
        GPA (TDP); with ``EMULTYPE_SKIP`` only decode and advance RIP. ``insn``: instruction
        bytes the processor supplied (SVM decode assists), decoded without a fetch."""
        if self._pending is not None:
            return self._failure(0, emulation_type,
                                 "emulation requested while a userspace MMIO read is pending "
                                 "(complete_userspace_io first)")
        dec = self._fetch_and_decode(emulation_type, insn)
        if isinstance(dec, EmulationResult):
            return dec
        if emulation_type & EMULTYPE_SKIP:
            self.regs["rip"] = (self.regs["rip"] + dec.length) & _M64
            self.events["kvm.skip.decode"] += 1
            return EmulationResult(EmulationOutcome.CONTINUE, dec.length, reason="skipped by decode")
        use_gpa = emulation_type & EMULTYPE_PF and self.tdp and self.gpa_available
        gpa_val = cr2_or_gpa if use_gpa else None
        return self._execute(dec, emulation_type, gpa_val)

    def skip_instruction(self) -> EmulationResult:
        """``kvm_emulate_instruction(vcpu, EMULTYPE_SKIP)``."""
        return self.x86_emulate_instruction(EMULTYPE_SKIP)

    def complete_userspace_io(self, data: int = 0) -> EmulationResult:
        """Next ``KVM_RUN`` after a ``KVM_EXIT_MMIO``: ``complete_emulated_mmio``.

        For a write nothing remains (RIP was advanced before the exit). For a read, ``data``
        is what userspace put in ``run->mmio.data``; the instruction is executed again without
        decoding (``EMULTYPE_NO_DECODE``) and takes the value from ``read_prepare``."""
        if self._pending is None:
            was_write, self._pending_write = self._pending_write, False
            return EmulationResult(EmulationOutcome.CONTINUE,
                                   reason="MMIO write completed" if was_write else "nothing pending")
        p, self._pending = self._pending, None
        self.events["kvm.emulate"] += 1
        self._writeback_load(p.decoded, data & ((1 << (8 * p.size)) - 1))
        return EmulationResult(EmulationOutcome.CONTINUE, p.decoded.length, handled_by="userspace",
                               reason="MMIO read completed by userspace")

    # -- fetch and decode -------------------------------------------------------------------

    def _mode_ok(self) -> bool:
        r = self.regs
        return bool(r.get("cr0", 0) & CR0_PG and r.get("cr4", 0) & CR4_PAE
                    and r.get("efer", 0) & EFER_LMA and not r.get("cr4", 0) & CR4_LA57)

    def _fetch(self, la: int, n: int, emulation_type: int) -> bytes | EmulationResult:
        """One ``__do_insn_fetch_bytes``: translate ``la`` for a fetch and read ``n`` bytes."""
        self.events["kvm.emulate.fetch"] += 1
        if not _canonical(la):
            return self._exception(GP_VECTOR, 0, None, "instruction fetch from a non-canonical address")
        gpa = self.translate(la, ACCESS_FETCH)
        if isinstance(gpa, GuestPageFault):
            return self._exception(PF_VECTOR, gpa.error_code, gpa.address, "instruction fetch faulted")
        data = self.mem.read_guest(gpa, n)
        if data is None:
            return self._failure(0, emulation_type, f"instruction bytes at gpa {gpa:#x} are not in guest memory")
        return data

    def _fetch_and_decode(self, emulation_type: int,
                          insn: bytes | None = None) -> _Decoded | EmulationResult:
        if not emulation_type & EMULTYPE_SKIP:
            self.events["kvm.emulate"] += 1
        if not self._mode_ok():
            return self._failure(0, emulation_type,
                                 "only 64-bit mode with 4-level paging is modelled")
        rip = self.regs["rip"]
        if insn:
            self.events["kvm.emulate.insn_bytes"] += 1
            code = bytes(insn[:MAX_INSN_LEN])
        else:
            first = min(MAX_INSN_LEN, PAGE_SIZE - (rip & (PAGE_SIZE - 1)))
            code = self._fetch(rip, first, emulation_type)
            if isinstance(code, EmulationResult):
                return code
        self.events["kvm.emulate.decode"] += 1
        while True:
            decoder = Decoder(64, code, ip=rip)
            insn = decoder.decode()
            err = decoder.last_error
            if err == DecoderError.NO_MORE_BYTES and len(code) < MAX_INSN_LEN:
                more = self._fetch((rip + len(code)) & _M64, MAX_INSN_LEN - len(code),
                                   emulation_type)
                if isinstance(more, EmulationResult):
                    return more
                code += more
                continue
            break
        if err != DecoderError.NONE or insn.is_invalid:
            return self._failure(0, emulation_type,
                                 f"cannot decode {code[:MAX_INSN_LEN].hex()} at {rip:#x}")
        addr32 = False
        for b in code[:insn.len]:
            if b == 0x67:
                addr32 = True
            if b not in _PREFIXES:
                break
        return _Decoded(insn, insn.len, addr32)

    # -- execute ----------------------------------------------------------------------------

    def _execute(self, dec: _Decoded, emulation_type: int, gpa_val: int | None) -> EmulationResult:
        insn = dec.insn
        m = insn.mnemonic
        if insn.has_lock_prefix:
            return self._exception(UD_VECTOR, None, None, "LOCK prefix on a non-lockable instruction")
        if m in (Mnemonic.MOV, Mnemonic.MOVNTI) and insn.op_count == 2 and insn.op0_kind == OpKind.MEMORY:
            if insn.op1_kind == OpKind.REGISTER and RegisterExt.is_gpr(insn.op1_register):
                name, size, shift = _gpr(insn.op1_register)
                value = (self.regs[name] >> shift) & ((1 << (8 * size)) - 1)
            elif insn.op1_kind in _IMM_KINDS and m == Mnemonic.MOV:
                size = _mem_size(insn)
                value = insn.immediate(1) & ((1 << (8 * size)) - 1)
            else:
                return self._failure(dec.length, emulation_type, f"{insn} is not modelled")
            return self._store(dec, emulation_type, gpa_val, size, value)
        if (m in (Mnemonic.MOV, Mnemonic.MOVZX, Mnemonic.MOVSX, Mnemonic.MOVSXD)
                and insn.op_count == 2 and insn.op1_kind == OpKind.MEMORY
                and insn.op0_kind == OpKind.REGISTER and RegisterExt.is_gpr(insn.op0_register)):
            size = _mem_size(insn)
            if m == Mnemonic.MOVSXD:
                # emulate.c mode_dual_63: I(DstReg | SrcMem32 | ModRM | Mov, em_movsxd): the
                # source is read as 4 bytes whatever the operand size, so `movsxd r16, m16`
                # reads 4 bytes (the processor reads 2); em_movsxd keeps the low dst bytes
                size = 4
            return self._load(dec, emulation_type, gpa_val, size)
        return self._failure(dec.length, emulation_type, f"{insn} is not modelled by fastmmio's emulator")

    def _linear(self, dec: _Decoded) -> int:
        insn = dec.insn
        if insn.is_ip_rel_memory_operand:
            la = insn.ip_rel_memory_address
        else:
            la = insn.memory_displacement
            if insn.memory_base != Register.NONE:
                name, _, _ = _gpr(insn.memory_base)
                la += self.regs[name]
            if insn.memory_index != Register.NONE:
                name, _, _ = _gpr(insn.memory_index)
                la += self.regs[name] * insn.memory_index_scale
            la &= 0xFFFF_FFFF if dec.addr32 else _M64
        seg = insn.memory_segment
        if seg == Register.FS:
            la += self.regs.get("fs_base", 0)
        elif seg == Register.GS:
            la += self.regs.get("gs_base", 0)
        return la & _M64

    def _operand_gpa(self, dec: _Decoded, la: int, size: int, write: bool,
                     gpa_val: int | None, emulation_type: int) -> tuple[int, bool] | EmulationResult:
        """``emulator_read_write_onepage`` up to the choice memory-or-MMIO: (gpa, is_mmio)."""
        if not _canonical(la) or not _canonical(la + size - 1):
            return self._exception(GP_VECTOR, 0, None, "operand at a non-canonical address")
        if (la & (PAGE_SIZE - 1)) + size > PAGE_SIZE:
            return self._failure(dec.length, emulation_type, "an operand crossing a page boundary is not modelled")
        if gpa_val is not None and (la & (PAGE_SIZE - 1)) == (gpa_val & (PAGE_SIZE - 1)):
            gpa = gpa_val
        else:
            gpa_or_fault = self.translate(la, ACCESS_WRITE if write else ACCESS_READ)
            if isinstance(gpa_or_fault, GuestPageFault):
                return self._exception(PF_VECTOR, gpa_or_fault.error_code, gpa_or_fault.address,
                                       "operand access faulted")
            gpa = gpa_or_fault
        is_mmio = self.mmio_info is not None and self.mmio_info.match_gpa(gpa)
        return gpa, is_mmio

    def _store(self, dec: _Decoded, emulation_type: int, gpa_val: int | None, size: int,
               value: int) -> EmulationResult:
        la = self._linear(dec)
        r = self._operand_gpa(dec, la, size, True, gpa_val, emulation_type)
        if isinstance(r, EmulationResult):
            return r
        gpa, is_mmio = r
        if not is_mmio and self.mem.write_guest(gpa, value.to_bytes(size, "little")):
            return self._advance(dec, "memory")
        # vcpu_mmio_write: (no in-kernel local APIC) then KVM_MMIO_BUS
        if self.buses.write(KVM_MMIO_BUS, gpa, size, value):
            return self._advance(dec, "KVM_MMIO_BUS")
        # KVM_EXIT_MMIO; writeback (RIP advance) happens before the exit for a write
        self.regs["rip"] = (self.regs["rip"] + dec.length) & _M64
        self._pending_write = True
        self.events["kvm.user_exit.mmio"] += 1
        return EmulationResult(EmulationOutcome.USER_EXIT, dec.length, MmioExit(gpa, size, True, value),
                               handled_by="userspace", reason="MMIO write exits to userspace")

    def _load(self, dec: _Decoded, emulation_type: int, gpa_val: int | None, size: int) -> EmulationResult:
        la = self._linear(dec)
        r = self._operand_gpa(dec, la, size, False, gpa_val, emulation_type)
        if isinstance(r, EmulationResult):
            return r
        gpa, is_mmio = r
        if not is_mmio:
            data = self.mem.read_guest(gpa, size)
            if data is not None:
                self._writeback_load(dec, int.from_bytes(data, "little"))
                return self._result(dec, "memory")
        v = self.buses.read(KVM_MMIO_BUS, gpa, size)
        if v is not None:
            self._writeback_load(dec, v)
            return self._result(dec, "KVM_MMIO_BUS")
        # KVM_EXIT_MMIO for a read: no writeback, RIP stays until userspace completes it
        self._pending = _PendingRead(dec, gpa, size)
        self.events["kvm.user_exit.mmio"] += 1
        return EmulationResult(EmulationOutcome.USER_EXIT, dec.length, MmioExit(gpa, size, False),
                               handled_by="userspace", reason="MMIO read exits to userspace")

    def _writeback_load(self, dec: _Decoded, value: int) -> None:
        """Write the loaded value into the destination register and advance RIP."""
        insn = dec.insn
        size = _mem_size(insn)
        name, dsize, shift = _gpr(insn.op0_register)
        value &= (1 << (8 * size)) - 1
        if insn.mnemonic in (Mnemonic.MOVSX, Mnemonic.MOVSXD) and value >> (8 * size - 1):
            value |= ((1 << (8 * dsize)) - 1) & ~((1 << (8 * size)) - 1)
        value &= (1 << (8 * dsize)) - 1
        old = self.regs[name]
        if dsize == 8:
            new = value
        elif dsize == 4:
            new = value  # a 32-bit destination zero-extends into the full register
        else:
            mask = ((1 << (8 * dsize)) - 1) << shift
            new = (old & ~mask) | (value << shift)
        self.regs[name] = new & _M64
        self.regs["rip"] = (self.regs["rip"] + dec.length) & _M64

    def _advance(self, dec: _Decoded, handled_by: str) -> EmulationResult:
        self.regs["rip"] = (self.regs["rip"] + dec.length) & _M64
        return self._result(dec, handled_by)

    @staticmethod
    def _result(dec: _Decoded, handled_by: str) -> EmulationResult:
        return EmulationResult(EmulationOutcome.CONTINUE, dec.length, handled_by=handled_by)

    # -- failures and exceptions ------------------------------------------------------------

    def _exception(self, vector: int, error_code: int | None, cr2: int | None,
                   reason: str) -> EmulationResult:
        """An exception queued for the guest (``inject_emulated_exception``); RIP unchanged."""
        self.events["kvm.emulate.exception"] += 1
        return EmulationResult(EmulationOutcome.EXCEPTION, exception=InjectedException(vector, error_code, cr2),
                               reason=reason)

    def _failure(self, insn_len: int, emulation_type: int, reason: str) -> EmulationResult:
        """``handle_emulation_failure``."""
        self.events["kvm.emulate.failure"] += 1
        if (self.exit_on_emulation_error or emulation_type & EMULTYPE_SKIP
                or self.regs.get("cpl", 0) == 0):
            self.events["kvm.user_exit.internal_error"] += 1
            return EmulationResult(EmulationOutcome.FAILURE, insn_len,
                                   exception=None if emulation_type & EMULTYPE_SKIP
                                   or self.exit_on_emulation_error else InjectedException(UD_VECTOR),
                                   reason=reason)
        self.events["kvm.emulate.exception"] += 1
        return EmulationResult(EmulationOutcome.EXCEPTION, insn_len, exception=InjectedException(UD_VECTOR),
                               reason=reason + " (#UD queued for the CPL3 guest)")


def _mem_size(insn: Instruction) -> int:
    return MemorySizeExt.size(insn.memory_size)


def _canonical(la: int) -> bool:
    """48-bit canonical (4-level paging)."""
    top = (la & _M64) >> 47
    return top == 0 or top == (1 << 17) - 1
