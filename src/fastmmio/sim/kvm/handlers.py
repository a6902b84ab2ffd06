"""KVM's VMX exit handlers for one vCPU, and the return to userspace.

Models arch/x86/kvm/vmx/vmx.c and x86.c (Linux 6.16):

* ``handle_io``: a string instruction goes to the emulator; otherwise ``kvm_fast_pio``: an
  OUT is offered to ``KVM_PIO_BUS`` (an ioeventfd or coalesced PIO zone may take it: skip by
  the VM-exit instruction length, back into the guest), else ``KVM_EXIT_IO`` and the
  instruction is skipped when userspace completes it (``complete_fast_pio_out``); an IN reads
  ``KVM_PIO_BUS`` (merging into RAX below 4 bytes, zero-extending at 4), else ``KVM_EXIT_IO``
  and ``complete_fast_pio_in``.
* ``handle_ept_misconfig``: a length-0 write on ``KVM_FAST_MMIO_BUS`` first (not in
  ``upstream-2013``); on a hit ``kvm_skip_emulated_instruction`` -- by the VM-exit instruction
  length, or, when KVM runs as a guest itself (``X86_FEATURE_HYPERVISOR``, the length being
  architecturally undefined for this exit), by decoding (``EMULTYPE_SKIP``, d391f1207067);
  otherwise ``kvm_mmu_page_fault(gpa, PFERR_RSVD_MASK)`` and the emulator.
* ``handle_ept_violation`` / ``__vmx_handle_ept_violation``: the page-fault error code from
  the qualification (read -> ``PFERR_USER_MASK``, write, fetch, present if any of bits 3-5;
  with a valid GLA ``PFERR_GUEST_FINAL`` or ``PFERR_GUEST_PAGE``), then
  ``kvm_mmu_page_fault`` and, when it says so, ``x86_emulate_instruction(EMULTYPE_PF)``.
  Variants hook in at the top (see :mod:`fastmmio.sim.kvm.variants`); one that returns
  from there is charged ``kvm.handler.ept_violation.prelude`` instead of the whole handler.
* ``handle_cpuid`` (``kvm_emulate_cpuid``) and ``handle_halt`` (``kvm_emulate_halt``: with no
  in-kernel irqchip, ``KVM_EXIT_HLT``).

A vCPU implements the :class:`fastmmio.sim.cpu.ExitHandler` protocol (``io_exit``,
``cpuid_exit``, ``ept_exit``): each returns True to re-enter the guest, False when
``KVM_RUN`` returns to userspace and the CPU stops. Userspace is either a callback
(``userspace(exit) -> data``, completing the exit at once as a VMM's run loop would before its
next ``KVM_RUN``; returning None stops the CPU instead) or the caller, who reads
:attr:`KvmVcpu.last_exit` and calls :meth:`KvmVcpu.complete_userspace_io` before running again.
MMU requests (new root, TLB flush) are serviced on the processor before every re-entry.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastmmio.result import ExitRecord
from fastmmio.sim.kvm.emulator import (
    GPR64,
    EmulationOutcome,
    EmulationResult,
    RegisterFile,
    X86Emulator,
)
from fastmmio.sim.kvm.guestmem import (
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    GuestPageWalker,
)
from fastmmio.sim.kvm.iobus import KVM_FAST_MMIO_BUS, KVM_PIO_BUS
from fastmmio.sim.kvm.mmu import PFERR_GUEST_FINAL_MASK, PFERR_GUEST_PAGE_MASK, RetPf
from fastmmio.sim.vmx.exits import (
    EXIT_CPUID,
    EXIT_EPT_MISCONFIG,
    EXIT_EPT_VIOLATION,
    EXIT_HLT,
    EXIT_IO_INSTRUCTION,
    EXIT_VMCALL,
    ExitInfo,
)
from fastmmio.sim.vmx.layouts import (
    QUAL_FETCH,
    QUAL_GLA_VALID,
    QUAL_READ,
    QUAL_TRANSLATED,
    QUAL_WRITE,
)

_M64 = (1 << 64) - 1
KVM_ENOSYS = 1000  # include/uapi/linux/kvm_para.h
KVM_EPERM = 1  # EPERM, as kvm_para.h defines KVM_EPERM
_WRITEBACK = GPR64 + ("rip", "rflags")  # what the CPU gets back after an exit
_WRITEBACK_VALUES = operator.itemgetter(*_WRITEBACK)
_REG_KEYS = frozenset(RegisterFile.KEYS)
_SEGMENT_BASES = frozenset({"fs_base", "gs_base"})
# what KVM's model reads from the CPU's exit register file besides the registers (see
# _control_value): a set, tested at every first read of a key the file does not have
_CONTROL_KEYS = frozenset({"cr0", "cr3", "cr4", "efer", "cpl"}) | _SEGMENT_BASES
_EPT_VIOLATION_PROT_MASK = 0x38  # qualification bits 5:3

Userspace = Callable[[ExitRecord], "int | None"]


def ept_violation_error_code(qualification: int) -> int:
    """``__vmx_handle_ept_violation``: the page-fault error code KVM builds."""
    ec = PFERR_USER_MASK if qualification & QUAL_READ else 0
    ec |= PFERR_WRITE_MASK if qualification & QUAL_WRITE else 0
    ec |= PFERR_FETCH_MASK if qualification & QUAL_FETCH else 0
    ec |= PFERR_PRESENT_MASK if qualification & _EPT_VIOLATION_PROT_MASK else 0
    if qualification & QUAL_GLA_VALID:
        ec |= PFERR_GUEST_FINAL_MASK if qualification & QUAL_TRANSLATED else PFERR_GUEST_PAGE_MASK
    return ec


@dataclass
class _PendingPio:
    is_in: bool
    port: int
    size: int
    insn_len: int | None


class KvmVcpu:
    """One vCPU of a :class:`~fastmmio.sim.kvm.vm.KvmVm` on a processor model.

    ``nested``: KVM itself runs as a guest (``X86_FEATURE_HYPERVISOR``), so the exits its
    variant does not trust the VM-exit instruction length for (EPT misconfigurations upstream,
    d391f1207067; see :meth:`~fastmmio.sim.kvm.variants.Variant.decodes_when_nested`) are
    skipped by decoding. ``irqchip_in_kernel``: HLT blocks in the kernel
    instead of exiting. ``cpuid``: the guest CPUID table (``KVM_SET_CPUID2``) as
    ``{(leaf, subleaf): (eax, ebx, ecx, edx)}``; missing leaves read as zeros.
    """

    def __init__(self, vm: Any, processor: Any, *, nested: bool = False,
                 irqchip_in_kernel: bool = False,
                 cpuid: Mapping[tuple[int, int], tuple[int, int, int, int]] | None = None,
                 userspace: Userspace | None = None, exit_on_emulation_error: bool = False):
        self.vm = vm
        self.processor = processor
        self.events = vm.events
        self.nested = nested
        self.irqchip_in_kernel = irqchip_in_kernel
        self.cpuid = dict(cpuid or {})
        self.userspace = userspace
        self.regs: MutableMapping[str, int] = RegisterFile()  # this exit's (see _run_handler)
        self._own_regs = self.regs
        self._control = (_CONTROL_KEYS, self._control_value)  # ExitRegisters.more
        self.walker = GuestPageWalker(self.regs, vm.guest_memory, self.events,
                                      maxphyaddr=vm.memory.maxphyaddr)
        self.emulator = X86Emulator(self.regs, vm.guest_memory, self.walker, vm.buses,
                                    vm.mmio_info, self.events,
                                    exit_on_emulation_error=exit_on_emulation_error,
                                    gpa_available=vm.variant.emulator_gpa_available)
        self.current_exit: ExitInfo | None = None
        self.last_exit: ExitRecord | None = None  # the last exit to userspace
        self.last_emulation: EmulationResult | None = None
        self.steps: list[str] = []  # what the last exit did, step by step
        self._pending_pio: _PendingPio | None = None
        self._pending_mmio = False

    # -- the ExitHandler protocol of fastmmio.sim.cpu ---------------------------------------

    def ept_exit(self, info: ExitInfo, regs: dict[str, int]) -> bool:
        return self._run_handler(info, regs, self.handle_ept_misconfig
                                 if info.reason == EXIT_EPT_MISCONFIG
                                 else self.handle_ept_violation)

    def io_exit(self, info: ExitInfo, regs: dict[str, int], port: int, size: int,
                is_in: bool, value: int) -> bool:
        return self._run_handler(info, regs, self.handle_io)

    def cpuid_exit(self, info: ExitInfo, regs: dict[str, int]) -> bool:
        return self._run_handler(info, regs, self.handle_cpuid)

    def vmcall_exit(self, info: ExitInfo, regs: dict[str, int]) -> bool:
        return self._run_handler(info, regs, self.handle_vmcall)

    def handle_exit(self, info: ExitInfo, regs: dict[str, int]) -> bool:
        """Dispatch any modelled exit by basic reason (``kvm_vmx_exit_handlers``)."""
        handlers = {EXIT_EPT_VIOLATION: self.handle_ept_violation,
                    EXIT_EPT_MISCONFIG: self.handle_ept_misconfig,
                    EXIT_IO_INSTRUCTION: self.handle_io, EXIT_CPUID: self.handle_cpuid,
                    EXIT_HLT: self.handle_hlt, EXIT_VMCALL: self.handle_vmcall}
        h = handlers.get(info.reason)
        if h is None:
            return self._run_handler(info, regs, self._unhandled)
        return self._run_handler(info, regs, h)

    def _run_handler(self, info: ExitInfo, regs: dict[str, int], handler: Callable[[ExitInfo], bool]) -> bool:
        self.steps = []
        self.current_exit = info
        vm = self.vm
        vm.running_vcpu = self
        # The CPU's own exit register file (fastmmio.sim.cpu.ExitRegisters: it reads a
        # register from the CPU when first used and writes back what changed) is used as it
        # is, the control registers and CPL read from the processor when first used
        # (_control_value): a doorbell's handler reads the two or three registers it needs,
        # and nothing is copied. Any other mapping goes through the vCPU's own file.
        own = not getattr(regs, "lazy_registers", False)
        if own:
            self._load_regs(regs)
        else:
            regs.more = self._control  # type: ignore[attr-defined]
            self.regs = self.emulator.regs = self.walker.regs = regs
        try:
            go_on = handler(info)
        finally:
            vm.running_vcpu = None
        if go_on and vm.mmu.requests:  # (no request pending: nothing to do at entry)
            self._before_entry()
        if own:
            regs.update(zip(_WRITEBACK, _WRITEBACK_VALUES(self.regs)))
        return go_on

    def _load_regs(self, regs: Mapping[str, int]) -> None:
        """A caller's register mapping (a partial set, not the CPU's exit register file) copied
        into the vCPU's own :class:`RegisterFile` over its current values, with the processor's
        control registers and CPL; :meth:`_run_handler` copies the result back after the
        handler."""
        p = self.processor
        prev = self.regs
        r = self._own_regs
        if prev is not r:  # (after an exit from the CPU: its registers as they were)
            r.update({k: prev[k] for k in r})
            self.regs = self.emulator.regs = self.walker.regs = r
        r.update({k: v for k, v in regs.items() if k in _REG_KEYS})
        r["cr0"], r["cr3"], r["cr4"], r["efer"], r["cpl"] = p.cr0, p.cr3, p.cr4, p.efer, p.cpl

    def _control_value(self, name: str) -> int:
        """A control register or the CPL as the handler reads it from the CPU's register
        file: the processor's; FS and GS base as the vCPU's own register file holds them
        (the CPU does not report them)."""
        if name in _SEGMENT_BASES:
            return self._own_regs[name]
        return getattr(self.processor, name)

    def _before_entry(self) -> None:
        """Service the MMU's pending requests before VM entry (called when there are)."""
        for d in self.vm.mmu.service_requests(self.processor):
            self.step(f"request:{d}")

    def step(self, what: str) -> None:
        """Record one step of the current exit's handling (for ``explain``)."""
        self.steps.append(what)

    # -- skipping ---------------------------------------------------------------------------

    def skip_emulated_instruction(self, info: ExitInfo | None) -> bool:
        """``kvm_skip_emulated_instruction`` -> vmx ``skip_emulated_instruction``."""
        if info is not None and self.nested and self.vm.variant.decodes_when_nested(info):
            r = self.emulator.skip_instruction()
            self.step("skip:decode")
            if r.outcome is EmulationOutcome.CONTINUE:
                return True
            return self._emulation_result(r)
        length = info.instruction_length if info is not None else None
        if length is None:
            self.step("skip:undefined_length")
            return self._internal_error("the VM-exit instruction length is undefined for this exit "
                                        "and KVM uses it to skip the instruction")
        regs = self.regs
        regs["rip"] = (regs["rip"] + length) & _M64
        self.events["kvm.skip.vmcs_length"] += 1
        self.step("skip:vmcs_length")
        return True

    # -- handlers ---------------------------------------------------------------------------

    def handle_ept_misconfig(self, info: ExitInfo) -> bool:
        self.events["kvm.handler.ept_misconfig"] += 1
        gpa = info.guest_physical_address or 0
        vm = self.vm
        if vm.variant.fast_mmio_on_misconfig:
            self.step("fast_mmio_bus")
            if vm.buses.write(KVM_FAST_MMIO_BUS, gpa, 0, None):
                self.step("fast_mmio_bus:hit")
                return self.skip_emulated_instruction(info)
        return self.kvm_mmu_page_fault(gpa, PFERR_RSVD_MASK)

    def handle_ept_violation(self, info: ExitInfo) -> bool:
        """A variant's prelude that returns early is priced as its own event
        (``kvm.handler.ept_violation.prelude``, counted by the variant); only a violation that
        goes on to the error code and ``kvm_mmu_page_fault`` counts the whole handler."""
        r = self.vm.variant.ept_violation_prelude(self, info)
        if r is not None:
            return r
        self.events["kvm.handler.ept_violation"] += 1
        gpa = info.guest_physical_address or 0
        return self.kvm_mmu_page_fault(gpa, ept_violation_error_code(info.qualification))

    def kvm_mmu_page_fault(self, gpa: int, error_code: int, insn: bytes | None = None) -> bool:
        """``kvm_mmu_page_fault``: the MMU, then ``x86_emulate_instruction`` on EMULATE; any
        other RET_PF_* resumes the guest (a variant hook that took the access has skipped the
        instruction already, or recorded why it could not). ``insn``: instruction bytes the
        processor recorded (SVM decode assists), handed to the emulator."""
        pf = self.vm.mmu.page_fault(gpa, error_code)
        self.step(f"mmu:{pf.path}:{pf.ret.name}")
        if pf.ret != RetPf.EMULATE:
            return not any(s.startswith("internal_error") for s in self.steps)
        if insn:
            self.step(f"emulate:insn_bytes:{len(insn)}")
        r = self.emulator.x86_emulate_instruction(pf.emulation_type, gpa, insn)
        return self._emulation_result(r)

    def handle_io(self, info: ExitInfo) -> bool:
        """``handle_io`` -> ``kvm_fast_pio``."""
        self.events["kvm.handler.io"] += 1
        q = info.qualification
        if q & (1 << 4):  # string instruction
            self.step("io:string:emulate")
            return self._emulation_result(self.emulator.x86_emulate_instruction(0))
        return self.kvm_fast_pio((q & 7) + 1, q >> 16, bool(q & 8), info)

    def kvm_fast_pio(self, size: int, port: int, is_in: bool, info: Any) -> bool:
        """``kvm_fast_pio`` (arch/x86/kvm/x86.c), common to VMX and SVM: an OUT offered to
        ``KVM_PIO_BUS``, an IN read from it; otherwise ``KVM_EXIT_IO``."""
        if not is_in:
            value = self.regs["rax"] & ((1 << (8 * size)) - 1)
            self.step("pio_bus")
            if self.vm.buses.write(KVM_PIO_BUS, port, size, value):
                self.step("pio_bus:hit")
                return self.skip_emulated_instruction(info)
            self._pending_pio = _PendingPio(False, port, size, getattr(info, "instruction_length", None))
            return self._user_exit(ExitRecord("io", port, size, True, value))
        v = self.vm.buses.read(KVM_PIO_BUS, port, size)
        self.step("pio_bus")
        if v is not None:
            self._complete_pio_in(size, v)
            return self.skip_emulated_instruction(info)
        self._pending_pio = _PendingPio(True, port, size, getattr(info, "instruction_length", None))
        return self._user_exit(ExitRecord("io", port, size, False, 0))

    def handle_cpuid(self, info: ExitInfo) -> bool:
        """``kvm_emulate_cpuid``: EAX/EBX/ECX/EDX from the guest CPUID table, then skip."""
        self.events["kvm.handler.cpuid"] += 1
        leaf, sub = self.regs["rax"] & 0xFFFF_FFFF, self.regs["rcx"] & 0xFFFF_FFFF
        eax, ebx, ecx, edx = self.cpuid.get((leaf, sub), self.cpuid.get((leaf, 0), (0, 0, 0, 0)))
        self.regs.update(rax=eax, rbx=ebx, rcx=ecx, rdx=edx)
        return self.skip_emulated_instruction(info)

    def handle_vmcall(self, info: ExitInfo) -> bool:
        """``kvm_emulate_hypercall`` (arch/x86/kvm/x86.c): the hypercall number in RAX; a
        guest not at CPL0 gets ``-KVM_EPERM``; a number KVM does not know ``-KVM_ENOSYS``
        (include/uapi/linux/kvm_para.h); the result goes to RAX, then the skip. Only the
        unknown-number path is modelled (kvm-unit-tests' vmcall test calls number 0)."""
        self.events["kvm.handler.vmcall"] += 1
        if self.regs["cpl"] != 0:
            ret = -KVM_EPERM
            self.step("hypercall:eperm")
        else:
            ret = -KVM_ENOSYS
            self.step(f"hypercall:{self.regs['rax'] & 0xFFFF_FFFF_FFFF_FFFF:#x}:enosys")
        self.regs["rax"] = ret & _M64
        return self.skip_emulated_instruction(info)

    def handle_hlt(self, info: ExitInfo) -> bool:
        """``kvm_emulate_halt``: skip, then block in the kernel (in-kernel irqchip) or
        ``KVM_EXIT_HLT``."""
        self.events["kvm.handler.hlt"] += 1
        if not self.skip_emulated_instruction(info):
            return False
        if self.irqchip_in_kernel:
            self.step("halt:blocked")
            return True
        self.last_exit = ExitRecord("hlt")
        self.events["kvm.user_exit.hlt"] += 1
        return False

    def _unhandled(self, info: ExitInfo) -> bool:
        return self._internal_error(f"exit {info.name} is not modelled")

    # -- statistics -------------------------------------------------------------------------

    def kvm_stats(self) -> dict[str, int]:
        """The model's counts under the names of KVM's binary vCPU statistics
        (``KVM_GET_STATS_FD``; arch/x86/kvm/x86.c ``kvm_vcpu_stats_desc``), for comparison with
        the real backend: ``exits``, ``io_exits`` (``handle_io``), ``mmio_exits`` (MMIO exits to
        userspace), ``halt_exits``, ``insn_emulation`` (every decode, skips included),
        ``insn_emulation_fail``, and the MMU's ``pf_taken``, ``pf_fixed``, ``pf_emulate``,
        ``pf_spurious``, ``pf_fast``, ``pf_mmio_spte_created``."""
        ev = self.events
        out = {
            # nested: exits L0 resolved itself (EPT02 fixes) never reach KVM
            "exits": sum(v for k, v in ev.items() if k.startswith("exit."))
            - ev["nested.ept02.fix"],
            "io_exits": ev["kvm.handler.io"],
            "mmio_exits": ev["kvm.user_exit.mmio"],
            "halt_exits": ev["kvm.handler.hlt"],
            "insn_emulation": ev["kvm.emulate.decode"],
            "insn_emulation_fail": ev["kvm.emulate.failure"],
        }
        for k in ("pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "pf_fast", "pf_mmio_spte_created"):
            out[k] = self.vm.mmu.stats[k]
        return out

    # -- results, userspace -----------------------------------------------------------------

    def _emulation_result(self, r: EmulationResult) -> bool:
        self.last_emulation = r
        self.step(f"emulate:{r.outcome.value}" + (f":{r.handled_by}" if r.handled_by else ""))
        if r.outcome is EmulationOutcome.CONTINUE:
            return True
        if r.outcome is EmulationOutcome.USER_EXIT:
            assert r.mmio is not None
            self._pending_mmio = True
            return self._user_exit(ExitRecord("mmio", r.mmio.phys_addr, r.mmio.len, r.mmio.is_write,
                                              r.mmio.data), counted=True)
        if r.outcome is EmulationOutcome.EXCEPTION:
            # the guest images install no exception handlers: delivery ends in a triple fault
            assert r.exception is not None
            self.last_exit = ExitRecord("shutdown", data=r.exception.vector)
            self.events["kvm.user_exit.shutdown"] += 1
            self.step(f"inject:vector{r.exception.vector}:shutdown")
            return False
        self.last_exit = ExitRecord("internal-error")
        self.step(f"internal_error:{r.reason}")
        return False

    def _internal_error(self, reason: str) -> bool:
        self.last_exit = ExitRecord("internal-error")
        self.events["kvm.user_exit.internal_error"] += 1
        self.step(f"internal_error:{reason}")
        return False

    def _user_exit(self, rec: ExitRecord, counted: bool = False) -> bool:
        self.last_exit = rec
        if not counted:
            self.events[f"kvm.user_exit.{rec.kind}"] += 1
        self.step(f"user_exit:{rec.kind}")
        if self.userspace is None:
            return False
        data = self.userspace(rec)
        if data is None:
            return False
        return self.complete_userspace_io(data)

    def complete_userspace_io(self, data: int = 0) -> bool:
        """The next ``KVM_RUN``: ``vcpu->arch.complete_userspace_io``. ``data`` is what
        userspace answered for a read (``run->io`` data or ``run->mmio.data``). Returns whether
        the guest may run (False if completing failed)."""
        if self._pending_pio is not None:
            p, self._pending_pio = self._pending_pio, None
            if p.is_in:
                self._complete_pio_in(p.size, data)
            self.step("complete_fast_pio_" + ("in" if p.is_in else "out"))
            info = ExitInfo(EXIT_IO_INSTRUCTION, instruction_length=p.insn_len) if p.insn_len else None
            ok = self.skip_emulated_instruction(info)
        elif self._pending_mmio:
            self._pending_mmio = False
            r = self.emulator.complete_userspace_io(data)
            self.step("complete_emulated_mmio")
            ok = self._emulation_result(r) if r.outcome is not EmulationOutcome.CONTINUE else True
        else:
            ok = True
        if ok:
            self._before_entry()
        return ok

    def _complete_pio_in(self, size: int, value: int) -> None:
        """``complete_emulator_pio_in`` into RAX: merge below 4 bytes, zero-extend at 4."""
        value &= (1 << (8 * size)) - 1
        if size < 4:
            mask = (1 << (8 * size)) - 1
            self.regs["rax"] = (self.regs["rax"] & ~mask) | value
        else:
            self.regs["rax"] = value
