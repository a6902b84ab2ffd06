"""The simulated Intel VMX processor with EPT (knows nothing of KVM).

Modules: :mod:`.layouts` (VMX entry formats; the x86 ones are :mod:`fastmmio.x86`),
:mod:`.memory` (host-physical memory, allocator), :mod:`.tables` (building paging structures), :mod:`.walker` (the two-dimensional walk),
:mod:`.caches` (TLBs and paging-structure caches with the SDM's rules), :mod:`.exits`
(VM exits as data), :mod:`.processor` (the vCPU view the simulator and KVM model call),
:mod:`.trace` (trace replay).
"""
