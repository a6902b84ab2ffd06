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

What a KVM-on-SVM model calls (the interface :mod:`fastmmio.sim.kvm.svm` and
:mod:`fastmmio.sim.svm_glue` use):

* set-up: ``SvmProcessor(memory, config, asid=..., next_rip_on_npf=..., ...)``, the nested
  tables built in host memory in the x86 format (``PageTableBuilder("guest", ...)``),
  ``set_ncr3(root)``, ``load_guest_state(...)``; an MMIO SPTE is
  ``layouts.npt_mmio_spte_mask(phys_bits[, sme_c_bit])`` written as a nested leaf;
* each entry: ``vmrun(tlb_control, asid=...)`` (KVM's ``svm_flush_tlb_*`` choose 01h/03h
  or a new ASID; ``vmentry`` is counted);
* each guest access: ``translate(la, access)`` -> system-physical address, guest
  ``page_fault``, or ``npf`` Fault (``error_code`` = EXITINFO1, ``gpa`` = EXITINFO2);
* exits: ``npf_exit(fault, rip, insn_len)`` -> :class:`~.exits.SvmExit` with
  ``exitinfo1`` (what ``npf_interception`` reads as the error code: RSV for an MMIO SPTE),
  ``exitinfo2``, ``next_rip`` (0 unless ``next_rip_on_npf="yes"``: 01cde4eaaeca's fast path
  needs it non-zero) and ``insn_bytes`` (what ``kvm_mmu_page_fault`` hands the emulator;
  empty means KVM fetches and decodes itself); ``ioio_exit(port, size, is_in, rip, len)``
  for ``io_interception`` (skip by ``next_rip``); ``intercept_exit(code, rip, len)`` for
  CPUID/HLT/VMMCALL; each counts ``exit.<NAME>``.
"""
