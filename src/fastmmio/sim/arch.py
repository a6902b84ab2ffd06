"""The processor architecture of a simulated machine, chosen by ``SimOptions.arch``: what
:class:`fastmmio.sim.backend.SimSession` builds for each (the processor model the CPU
drives, where KVM's TDP root goes, what the processor needs from the CPU).

* ``vmx``: :class:`fastmmio.sim.vmx.processor.Processor` with EPT, the root loaded as EPTP;
* ``svm``: :class:`fastmmio.sim.svm_glue.SvmCpuProcessor` over the AMD model with nested
  paging, the root loaded as nCR3, the guest RIP and the vCPU's VMRUN controls bound to it.
"""

from __future__ import annotations

from typing import Any

from fastmmio.sim.vmx.memory import HostMemory
from fastmmio.sim.vmx.processor import Processor


class VmxArch:
    name = "vmx"

    @staticmethod
    def make_processor(memory: HostMemory, options: Any) -> Any:
        return Processor(memory, options.caches, vpid_enabled=options.vpid,
                         vpid=1 if options.vpid else 0)

    @staticmethod
    def load_root(processor: Any, mmu: Any) -> None:
        processor.set_eptp(mmu.eptp)

    @staticmethod
    def bind(processor: Any, cpu: Any, vcpu: Any) -> None:
        """Nothing: the VMX processor needs nothing from the CPU."""


def get_arch(name: str) -> Any:
    if name == "svm":
        from fastmmio.sim.svm_glue import SvmArch

        return SvmArch
    return VmxArch
