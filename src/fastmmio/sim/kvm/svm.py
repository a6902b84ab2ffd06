"""KVM's SVM exit handlers for one vCPU: the SVM-specific half of KVM on an AMD processor.

Everything above the exit handlers is the same KVM as on VMX (:mod:`.handlers`): memslots,
the TDP MMU (writing NPT entries: :func:`fastmmio.sim.kvm.spte.npt_format`), the I/O buses,
ioeventfds and the emulator. What differs is modelled on arch/x86/kvm/svm/svm.c (Linux 7.0,
with 01cde4eaaeca; the variants of :mod:`.variants` select the older behaviours):

* ``npf_interception``: EXITINFO1 is the page-fault error code as the MMU wants it (P, W, U,
  RSVD, ID, and ``PFERR_GUEST_FINAL``/``PFERR_GUEST_PAGE`` in bits 32/33: APM 15.25.6 and
  KVM's ``PFERR_*`` agree bit for bit), EXITINFO2 the GPA. With 01cde4eaaeca (variant
  ``svm``): a fault with RSVD outside guest mode first passes
  ``svm_check_emulate_instruction(EMULTYPE_PF | EMULTYPE_NO_DECODE)`` (nothing to refuse for
  a guest that is not SEV), then, if ``nrips`` and the VMCB's next RIP is non-zero, a length-0
  write on ``KVM_FAST_MMIO_BUS`` and on a hit ``kvm_skip_emulated_instruction``. Otherwise
  (``svm-pre-7.0``, no next RIP, or a miss) ``kvm_mmu_page_fault(gpa, error_code,
  insn_bytes)`` with the VMCB's guest instruction bytes when the processor has
  DecodeAssists: an MMIO SPTE sends it to ``handle_mmio_page_fault`` and the emulator, which
  decodes those bytes without fetching, and ``vcpu_mmio_write`` finds a length-0 ioeventfd
  on ``KVM_MMIO_BUS``. A variant may return early from the top (``rfc-2015-svm``).
* ``io_interception``: string I/O goes to the emulator; otherwise ``svm->next_rip`` =
  EXITINFO2 (the next RIP of IOIO intercepts, APM 15.10.2) and ``kvm_fast_pio`` as on VMX.
* ``cpuid_interception``, ``halt_interception``, ``vmmcall_interception``: the common
  ``kvm_emulate_cpuid`` / ``kvm_emulate_halt`` / ``kvm_emulate_hypercall``.
* ``svm_skip_emulated_instruction`` (``__svm_skip_emulated_instruction``): with ``nrips``
  and a non-zero VMCB next RIP, RIP = next RIP (``kvm.skip.next_rip``); else
  ``svm->next_rip`` if a handler set it (IOIO); else decode with ``EMULTYPE_SKIP``
  (``kvm.skip.decode``, the emulator fetching the bytes).
* TLB maintenance before VMRUN: a new NPT root goes to nCR3 (``svm_load_mmu_pgd``); a flush
  of the current context (``svm_flush_tlb_current`` -> ``svm_flush_tlb_asid``) sets
  TLB_CONTROL to 03h (flush this ASID) with FlushByAsid, else takes a new ASID; TLB_CONTROL
  goes back to 00h after the VMRUN that used it (``svm_vcpu_run``).

The processor is :class:`fastmmio.sim.svm.processor.SvmProcessor`; the exit information a
handler reads is an :class:`fastmmio.sim.svm.exits.SvmExit`. The CPU glue
(:mod:`fastmmio.sim.svm_glue`) keeps the exit it made as ``processor.last_exit`` and the
handlers read it when the CPU passes its own exit record.
"""

from __future__ import annotations

from typing import Any

from fastmmio.sim.kvm.handlers import KvmVcpu
from fastmmio.sim.kvm.emulator import EmulationOutcome
from fastmmio.sim.kvm.guestmem import PFERR_RSVD_MASK
from fastmmio.sim.kvm.iobus import KVM_FAST_MMIO_BUS
from fastmmio.sim.svm.exits import SvmExit
from fastmmio.sim.svm.layouts import (
    EXIT_CPUID,
    EXIT_HLT,
    EXIT_IOIO,
    EXIT_NPF,
    EXIT_VMMCALL,
    IOIO_EXITINFO1,
    TLB_CONTROL_DO_NOTHING,
    TLB_CONTROL_FLUSH_ASID,
)

_M64 = (1 << 64) - 1


class SvmVcpu(KvmVcpu):
    """One vCPU of a KVM VM on an SVM processor (see the module docstring).

    ``nrips``: KVM's ``nrips`` module parameter (on when the processor has NRIPS).
    ``guest_mode``: the vCPU runs an L2 guest (the fast path is for L1 only). ``sev_es``:
    the guest's state is encrypted (no next RIP to use; not modelled beyond that).
    """

    def __init__(self, vm: Any, processor: Any, *, nrips: bool | None = None,
                 guest_mode: bool = False, **kw: Any):
        super().__init__(vm, processor, **kw)
        self.nrips = bool(getattr(processor, "nrips", True)) if nrips is None else nrips
        self.guest_mode = guest_mode
        self.svm_next_rip = 0  # svm->next_rip
        self.tlb_ctl = TLB_CONTROL_DO_NOTHING  # vmcb->control.tlb_ctl for the next VMRUN
        self.new_asid: int | None = None  # an ASID to take at the next VMRUN

    # -- the exit the CPU reports -----------------------------------------------------------

    def _svm_exit(self, info: Any) -> SvmExit:
        if isinstance(info, SvmExit):
            return info
        last = getattr(self.processor, "last_exit", None)
        if not isinstance(last, SvmExit):
            raise TypeError(f"no #VMEXIT information for {info!r}")
        return last

    def ept_exit(self, info: Any, regs: dict[str, int]) -> bool:
        return self._run_handler(self._svm_exit(info), regs, self.npf_interception)

    def io_exit(self, info: Any, regs: dict[str, int], port: int, size: int,
                is_in: bool, value: int) -> bool:
        return self._run_handler(self._svm_exit(info), regs, self.io_interception)

    def cpuid_exit(self, info: Any, regs: dict[str, int]) -> bool:
        return self._run_handler(self._svm_exit(info), regs, self.handle_cpuid)

    def vmcall_exit(self, info: Any, regs: dict[str, int]) -> bool:
        return self._run_handler(self._svm_exit(info), regs, self.handle_vmcall)

    def handle_exit(self, info: Any, regs: dict[str, int]) -> bool:
        """Dispatch by exit code (``svm_exit_handlers``)."""
        ex = self._svm_exit(info)
        handlers = {EXIT_NPF: self.npf_interception, EXIT_IOIO: self.io_interception,
                    EXIT_CPUID: self.handle_cpuid, EXIT_HLT: self.handle_hlt,
                    EXIT_VMMCALL: self.handle_vmcall}
        return self._run_handler(ex, regs, handlers.get(ex.code, self._unhandled))

    def _run_handler(self, info: Any, regs: dict[str, int], handler: Any) -> bool:
        self.svm_next_rip = 0  # svm_vcpu_run clears it at every exit
        return super()._run_handler(info, regs, handler)

    def _unhandled(self, info: Any) -> bool:
        return self._internal_error(f"exit {info.name} is not modelled")

    # -- skipping ---------------------------------------------------------------------------

    def skip_emulated_instruction(self, info: Any = None) -> bool:
        """``svm_skip_emulated_instruction``: the VMCB's next RIP (with ``nrips``), else
        ``svm->next_rip`` (set by ``io_interception``), else decode (``EMULTYPE_SKIP``)."""
        ex = self.current_exit
        if self.nrips and isinstance(ex, SvmExit) and ex.next_rip:
            self.svm_next_rip = ex.next_rip
        if not self.svm_next_rip:
            r = self.emulator.skip_instruction()
            self.step("skip:decode")
            if r.outcome is EmulationOutcome.CONTINUE:
                return True
            return self._emulation_result(r)
        self.regs["rip"] = self.svm_next_rip & _M64
        self.events["kvm.skip.next_rip"] += 1
        self.step("skip:next_rip")
        return True

    # -- handlers ---------------------------------------------------------------------------

    def npf_interception(self, info: SvmExit) -> bool:
        """``npf_interception`` (see the module docstring). A variant's prelude that returns
        early is charged ``kvm.handler.npf.prelude`` (by the variant) instead of the whole
        handler."""
        r = self.vm.variant.npf_prelude(self, info)
        if r is not None:
            return r
        self.events["kvm.handler.npf"] += 1
        error_code, gpa = info.exitinfo1, info.exitinfo2
        if self.vm.variant.fast_mmio_on_npf and error_code & PFERR_RSVD_MASK and not self.guest_mode:
            # svm_check_emulate_instruction(EMULTYPE_PF | EMULTYPE_NO_DECODE): X86EMUL_CONTINUE
            # for a guest that is not SEV
            if self.nrips and info.next_rip:
                self.step("fast_mmio_bus")
                if self.vm.buses.write(KVM_FAST_MMIO_BUS, gpa, 0, None):
                    self.step("fast_mmio_bus:hit")
                    return self.skip_emulated_instruction(info)
            else:
                self.step("fast_mmio:no_next_rip")
        insn = info.insn_bytes if info.insn_bytes is not None else None
        return self.kvm_mmu_page_fault(gpa, error_code, insn)

    def io_interception(self, info: SvmExit) -> bool:
        """``io_interception``: EXITINFO1 port/size/direction; string I/O emulated; otherwise
        ``svm->next_rip = exit_info_2`` and ``kvm_fast_pio`` (the same bus and userspace
        handling as VMX's ``handle_io``)."""
        self.events["kvm.handler.io"] += 1
        f = IOIO_EXITINFO1.decode(info.exitinfo1)
        if f["str"]:
            self.step("io:string:emulate")
            return self._emulation_result(self.emulator.x86_emulate_instruction(0))
        self.svm_next_rip = info.exitinfo2
        size = 1 if f["sz8"] else 2 if f["sz16"] else 4
        return self.kvm_fast_pio(size, f["port"], bool(f["type_in"]), info)

    # -- TLB maintenance before VMRUN ---------------------------------------------------------

    def _before_entry(self) -> None:
        for d in self.vm.mmu.take_requests():
            if d == "mmu_reload":
                self.processor.set_ncr3(self.vm.mmu.root_hpa)  # svm_load_mmu_pgd
            self.flush_tlb_asid()
            self.step(f"request:{d}")

    def flush_tlb_asid(self) -> None:
        """``svm_flush_tlb_asid``: TLB_CONTROL 03h with FlushByAsid, else a new ASID."""
        if getattr(self.processor, "flush_by_asid", True):
            self.tlb_ctl = TLB_CONTROL_FLUSH_ASID
        else:
            self.new_asid = (self.new_asid or self.processor.asid) + 1

    def vmrun_controls(self) -> tuple[int, int | None]:
        """TLB_CONTROL and ASID for the next VMRUN; TLB_CONTROL is reset to 00h afterwards
        (``svm_vcpu_run``)."""
        ctl, asid = self.tlb_ctl, self.new_asid
        self.tlb_ctl, self.new_asid = TLB_CONTROL_DO_NOTHING, None
        return ctl, asid
