"""The simulated AMD SVM processor with nested paging (knows nothing of KVM).

Sibling of :mod:`fastmmio.sim.vmx`, sharing what is common: host memory
(:mod:`fastmmio.sim.vmx.memory`), the x86 paging-entry formats and bit layouts, the guest
side of the two-dimensional walk with its reference accounting
(:class:`fastmmio.sim.vmx.walker.Walker`), the cache storage and data-cache model
(:mod:`fastmmio.sim.vmx.caches`) and the guest's own invalidating instructions
(:mod:`fastmmio.sim.vmx.guestops`). What is AMD's own (AMD64 APM vol. 2, chapter 15):

* :mod:`.layouts`: #NPF EXITINFO1 (15.25.6), IOIO EXITINFO1 (15.10.2), TLB_CONTROL
  (15.16.1), exit codes, the guest-instruction-bytes field (15.8.4), and the nested MMIO
  SPTE encoding KVM uses on NPT, all as data;
* :mod:`.caches`: named configurations (``apm-max``, ``none``, ``zen4``) and the named
  assumptions where the APM says less than the SDM;
* :mod:`.processor`: the nested walk (15.25.5), ASID-tagged caches, VMRUN's TLB_CONTROL,
  #VMEXIT, INVLPGA, #NPF and IOIO exits with next RIP (15.7.1) and decode assists (15.8.4);
* :mod:`.testbed`: a minimal machine for tests.
"""
