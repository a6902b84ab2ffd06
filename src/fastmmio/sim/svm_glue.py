"""The SVM machine behind the simulator's CPU: :class:`~fastmmio.sim.cpu.GuestCpu` runs the
guest image on unicorn and asks its processor for translations, exit information, #VMEXIT
and VM entry; on the SVM machine that processor is :class:`SvmCpuProcessor`, which answers
with the AMD model (:class:`fastmmio.sim.svm.processor.SvmProcessor`) and hands KVM's SVM
handlers (:class:`fastmmio.sim.kvm.svm.SvmVcpu`) the #VMEXIT as the APM defines it:

* a refused translation is a #NPF (``npf_exit``): EXITINFO1 the error code, EXITINFO2 the
  exact GPA, next RIP (zero unless the processor fills it on #NPF: ``next_rip_on_npf``) and
  the guest instruction bytes (DecodeAssists, APM 15.8.4);
* ``IN``/``OUT`` is an IOIO intercept (``ioio_exit``, APM 15.10.2: EXITINFO2 and nRIP the
  next RIP); ``CPUID`` a CPUID intercept with nRIP (15.7.1);
* ``VMCALL``: on AMD it is #UD, which KVM intercepts and answers by rewriting the
  instruction into ``VMMCALL`` (``emulator_fix_hypercall``, under the default
  ``KVM_X86_QUIRK_FIX_HYPERCALL_INSN``) and re-executing it. That one-time rewrite is not
  modelled: the guest's VMCALL is presented as the VMMCALL intercept it becomes (nRIP saved,
  15.7.1), which is every execution after the first, i.e. the measured steady state;
* VM entry is VMRUN with the TLB_CONTROL (and ASID) KVM chose before it
  (:meth:`fastmmio.sim.kvm.svm.SvmVcpu.vmrun_controls`).

The guest's RIP at an exit comes from the CPU (``bind``). Everything else (``translate``,
``uncounted``, ``events``, ``config``, guest state) is the SVM processor's own.
"""

from __future__ import annotations

from typing import Any, Callable

from fastmmio.sim.svm.exits import SvmExit
from fastmmio.sim.svm.layouts import EXIT_CPUID, EXIT_VMMCALL
from fastmmio.sim.svm.processor import SvmProcessor
from fastmmio.sim.vmx.exits import EXIT_CPUID as VMX_EXIT_CPUID
from fastmmio.sim.vmx.exits import EXIT_IO_INSTRUCTION, EXIT_VMCALL, ExitInfo
from fastmmio.sim.vmx.walker import Fault


class SvmCpuProcessor:
    """The processor :class:`~fastmmio.sim.cpu.GuestCpu` drives on the SVM machine."""

    def __init__(self, proc: SvmProcessor):
        self.proc = proc
        self.last_exit: SvmExit | None = None  # the #VMEXIT the handlers read
        self._rip: Callable[[], int] = lambda: 0
        self._vcpu: Any = None

    def bind(self, rip: Callable[[], int], vcpu: Any) -> None:
        """Where the guest RIP at an exit comes from, and the vCPU whose VMRUN controls
        the next entry uses."""
        self._rip, self._vcpu = rip, vcpu

    def __getattr__(self, name: str) -> Any:
        return getattr(self.proc, name)

    # -- what GuestCpu calls ------------------------------------------------------------------

    def exit_info(self, fault: Fault, instruction_length: int | None = None) -> SvmExit:
        """The #VMEXIT(NPF) of ``fault`` (counted here: :meth:`vmexit` does not count it
        again)."""
        self.last_exit = self.proc.npf_exit(fault, self._rip(), instruction_length)
        return self.last_exit

    def vmexit(self, info: SvmExit | ExitInfo) -> SvmExit:
        """#VMEXIT for an exit the CPU describes in VMX terms (I/O instruction, CPUID,
        VMCALL), made into the SVM intercept; an :class:`SvmExit` from :meth:`exit_info` is
        already counted."""
        if isinstance(info, SvmExit):
            return info
        rip = self._rip()
        if info.reason == EXIT_IO_INSTRUCTION:
            q = info.qualification
            ex = self.proc.ioio_exit(q >> 16, (q & 7) + 1, bool(q & 8), rip,
                                     info.instruction_length or 0, string=bool(q & 16),
                                     rep=bool(q & 32))
        elif info.reason == VMX_EXIT_CPUID:
            ex = self.proc.intercept_exit(EXIT_CPUID, rip, info.instruction_length or 2)
        elif info.reason == EXIT_VMCALL:
            ex = self.proc.intercept_exit(EXIT_VMMCALL, rip, info.instruction_length or 3)
        else:
            raise ValueError(f"no SVM intercept modelled for {info.name}")
        self.last_exit = ex
        return ex

    def vmentry(self) -> None:
        """VMRUN with the TLB_CONTROL and ASID KVM set up."""
        ctl, asid = self._vcpu.vmrun_controls() if self._vcpu is not None else (0, None)
        self.proc.vmrun(ctl, asid)


class SvmArch:
    """The SVM machine for :mod:`fastmmio.sim.arch`: ASIDs always on (``options.vpid`` does
    not apply), next RIP on #NPF as ``options.next_rip_on_npf``."""

    name = "svm"

    @staticmethod
    def make_processor(memory: Any, options: Any) -> SvmCpuProcessor:
        return SvmCpuProcessor(SvmProcessor(memory, options.caches,
                                            next_rip_on_npf=options.next_rip_on_npf))

    @staticmethod
    def load_root(processor: SvmCpuProcessor, mmu: Any) -> None:
        processor.set_ncr3(mmu.root_hpa)

    @staticmethod
    def bind(processor: SvmCpuProcessor, cpu: Any, vcpu: Any) -> None:
        from unicorn.x86_const import UC_X86_REG_RIP

        processor.bind(lambda: cpu.reg(UC_X86_REG_RIP), vcpu)
