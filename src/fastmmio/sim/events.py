"""The event vocabulary shared by the models and the cost model.

Models only *count* events (``collections.Counter`` keyed by these names); the cost model
(:mod:`fastmmio.costs`) prices them. A name is dotted, most general part first, so a cost
profile can price a whole family by prefix. The names follow the SDM and KVM.

Processor (sim/vmx):
    walk.ref.guest.<level>      a guest paging-structure entry read from memory
                                <level> in pml4e, pdpte, pde, pte
    walk.ref.ept.<level>        an EPT paging-structure entry read from memory
                                (every guest-structure reference and the final GPA go through EPT)
    walk.served.<where>         where a walk reference's cache line was found:
                                l1, l2, llc, mem (the walk data-cache model)
    walk.ad.guest.<level>       a guest entry's accessed/dirty flags written (a write through EPT)
    walk.ad.ept.<level>         an EPT entry's accessed/dirty flags written (EPTP bit 6 set)
    tlb.combined.hit / .miss    combined-translation (linear -> HPA) look-ups
    tlb.combined.dirty_assist   a write hit a cached translation whose dirty flag was clear:
                                the processor walked again to set it (also .guest_physical)
    tlb.linear.* / psc.linear.* the same look-ups for linear mappings (EPT not in use)
    fault.<kind>                translations refused without a VM exit or with one:
                                page_fault (guest #PF), ept_misconfig, gp (non-canonical)
    tlb.guest_physical.hit / .miss   guest-physical-translation (GPA -> HPA) look-ups
    psc.combined.<level>.hit / .miss       combined paging-structure caches (pml4e, pdpte, pde)
    psc.guest_physical.<level>.hit / .miss guest-physical paging-structure caches (EPT levels)
    inv.<cause>                 invalidations performed (ept_violation, vmexit_novpid,
                                vmentry_novpid, invept_single, invept_all, invvpid_<type>
                                with <type> address, single, all, single_retain_globals,
                                mov_cr3, mov_cr4, mov_cr0, invlpg)
    exit.<REASON>               VM exits by SDM basic exit reason name (EPT_VIOLATION,
                                EPT_MISCONFIG, IO_INSTRUCTION, CPUID, HLT, VMCALL, ...)
    vmentry                     VM entries (the other half of each exit's round trip)

Processor (sim/svm, AMD SVM with nested paging; the guest-side names above are shared):
    walk.ref.nested.<level>     a nested page-table entry read (every guest-structure
                                reference and the final GPA go through the nested tables)
    walk.ad.nested.<level>      a nested entry's accessed/dirty flags written (always on;
                                guest page-table walks are user writes, APM 15.25.5)
    tlb.nested.hit / .miss / .dirty_assist   cached nested (GPA -> SPA) translations
    psc.nested.<level>.hit / .miss           the nested page-walk cache
    tlb.nested_fault.hit        a kept faulting nested result (assumption
                                nested_fault_caching=faulting)
    inv.npf                     cached mappings dropped by a nested page fault
    inv.tlb_control.<name>      VMRUN's TLB_CONTROL: flush_all_asid, flush_asid,
                                flush_asid_local (APM Table 15-9)
    inv.invlpga                 INVLPGA
    exit.<NAME>                 #VMEXIT by Linux SVM_EXIT_* name: NPF, IOIO, CPUID, HLT,
                                VMMCALL, MSR, INVALID, ...
    vmentry                     VMRUN (the other half of each exit's round trip)

KVM (sim/kvm):
    kvm.handler.<name>          exit handler invoked: ept_violation, ept_misconfig, io, cpuid, hlt,
                                vmcall
    kvm.handler.ept_violation.prelude   handle_ept_violation returned from a variant's prelude
                                (the RFC's fast-bus hit) before its error code and MMU work
    kvm.handler.npf             SVM: npf_interception (a #NPF)
    kvm.handler.npf.prelude     SVM: npf_interception returned from a variant's prelude
                                (RFC 2/3's fast-bus hit) before the MMU
    kvm.mmu.page_fault          kvm_mmu_page_fault entered
    kvm.mmu.fast_page_fault     fast_page_fault attempted; .fixed when it resolved the fault
    kvm.mmu.slow_path           the slow path ran (memslot look-up, pfn, map)
    kvm.mmu.memslot_lookup      a memslot look-up
    kvm.mmu.spte_install        a present SPTE written; .mmio an MMIO SPTE written
    kvm.mmu.mmio_spte_stale     an MMIO SPTE whose generation no longer matched
    kvm.mmu.bad_page            the bad-page / read-only-write path was taken
    kvm.mmu.mmio_info_hit       handle_mmio_page_fault answered from the per-vCPU MMIO info
    kvm.mmu.spte_walk           a lockless walk of the SPTEs (get_mmio_spte, fast_page_fault)
    kvm.mmu.spurious            a fault the SPTE already allowed (RET_PF_SPURIOUS)
    kvm.mmu.retry               handle_mmio_page_fault found no MMIO SPTE (RET_PF_RETRY)
    kvm.mmu.table_alloc         an SPTE table page allocated
    kvm.mmu.zap                 a leaf SPTE (present or MMIO) zapped
    kvm.mmu.zap_all_fast        kvm_mmu_zap_all_fast (new root; the vCPU reloads its EPTP)
    kvm.bus.lookup.<BUS>        kvm_io_bus_write/read on KVM_PIO_BUS, KVM_MMIO_BUS, KVM_FAST_MMIO_BUS
    kvm.bus.probe               one binary-search step or device tried (cost grows with devices)
    kvm.eventfd.signal          an ioeventfd fired (eventfd_signal)
    kvm.emulate                 the x86 emulator executed an instruction (x86_emulate_insn; a
                                userspace-completed read executes twice; EMULTYPE_SKIP does not count)
    kvm.emulate.fetch           instruction bytes fetched through the guest's tables
    kvm.emulate.decode          an instruction decoded
    kvm.emulate.walk            a software walk of the guest's page tables by KVM (gva_to_gpa)
    kvm.emulate.walk.ref        one guest paging-structure entry read by that walk
    kvm.emulate.failure         emulation failed (handle_emulation_failure)
    kvm.emulate.exception       the emulator queued an exception for the guest (#PF, #GP, #UD)
    kvm.skip.vmcs_length        RIP advanced by the VM-exit instruction length
    kvm.skip.decode             RIP advanced by decoding (EMULTYPE_SKIP, when the length is undefined)
    kvm.skip.next_rip           SVM: RIP set to the VMCB's next RIP (or svm->next_rip)
    kvm.emulate.insn_bytes      SVM: the emulator decoded the VMCB's instruction bytes (decode
                                assists) instead of fetching them
    kvm.user_exit.<kind>        KVM_RUN returned to userspace: io, mmio, internal_error, hlt, shutdown
    kvm.coalesced.append        an access appended to the coalesced MMIO/PIO ring (no exit)

L0 under a nested KVM (sim/nested; KVM is L1, the guest L2):
    nested.ept12.ref            one EPT12 entry read by L0's software walk (FNAME(walk_addr_generic))
    nested.ept02.fix            an EPT02 entry installed from EPT12 without involving L1
    nested.invept               L1's INVEPT trapped by L0 (EPT02 dropped)
    nested.reflect.kvm / .hyperv    an exit synthesized for L1 (nested_vmx_vmexit,
                                prepare_vmcs12), per L0 model
    nested.vmresume.kvm / .hyperv   L1's VMRESUME trapped by L0 (nested_vmx_run)
    nested.enter_l2.kvm / .hyperv   L0 entering L2 again (prepare_vmcs02)

Guest (sim/cpu):
    guest.insn                  guest instructions executed natively (between exits)
"""

from __future__ import annotations

from collections import Counter

PAGING_LEVELS = ("pml4e", "pdpte", "pde", "pte")
PSC_LEVELS = ("pml4e", "pdpte", "pde")
SERVED_BY = ("l1", "l2", "llc", "mem")

Events = Counter  # the type every model returns: event name -> count

TRANSLATION_KINDS = ("combined", "guest_physical", "linear", "nested")  # nested: sim/svm
FAULT_KINDS = ("page_fault", "ept_misconfig", "gp")
INVALIDATION_CAUSES = ("ept_violation", "vmexit_novpid", "vmentry_novpid", "invept_single",
                       "invept_all", "invvpid_address", "invvpid_single", "invvpid_all",
                       "invvpid_single_retain_globals", "mov_cr3", "mov_cr4", "mov_cr0",
                       "invlpg", "npf", "invlpga")
USER_EXIT_KINDS = ("io", "mmio", "internal_error", "hlt", "shutdown")
KVM_EVENTS = (
    "kvm.handler.ept_violation", "kvm.handler.ept_misconfig", "kvm.handler.io",
    "kvm.handler.cpuid", "kvm.handler.hlt", "kvm.handler.vmcall",
    "kvm.handler.ept_violation.prelude",
    "kvm.mmu.page_fault", "kvm.mmu.fast_page_fault", "kvm.mmu.fast_page_fault.fixed",
    "kvm.mmu.slow_path", "kvm.mmu.memslot_lookup", "kvm.mmu.spte_install",
    "kvm.mmu.spte_install.mmio", "kvm.mmu.mmio_spte_stale", "kvm.mmu.bad_page",
    "kvm.mmu.mmio_info_hit", "kvm.mmu.spte_walk", "kvm.mmu.spurious", "kvm.mmu.retry",
    "kvm.mmu.table_alloc", "kvm.mmu.zap", "kvm.mmu.zap_all_fast",
    "kvm.bus.probe", "kvm.eventfd.signal",
    "kvm.emulate", "kvm.emulate.fetch", "kvm.emulate.decode", "kvm.emulate.walk",
    "kvm.emulate.walk.ref", "kvm.emulate.failure", "kvm.emulate.exception",
    "kvm.skip.vmcs_length", "kvm.skip.decode", "kvm.coalesced.append",
    # KVM on SVM (sim/kvm/svm.py)
    "kvm.handler.npf", "kvm.handler.npf.prelude", "kvm.skip.next_rip", "kvm.emulate.insn_bytes",
)


def vocabulary() -> frozenset[str]:
    """Every event name the models can count (the families above, expanded over every
    paging level, cache level of every named configuration, exit reason (VMX and SVM), bus,
    invalidation cause and user-exit kind), and the ``events`` the registered KVM variants
    declare (:attr:`fastmmio.sim.kvm.variants.Variant.events`). A profile that prices all of them cannot meet an unpriced event
    in a run, so a command checks it before simulating (:func:`fastmmio.costs.model.
    check_prices`); ``tests/unit/test_events_vocabulary.py`` holds the models to it."""
    from fastmmio.sim.kvm.iobus import KvmBus
    from fastmmio.sim.kvm.variants import ALL_VARIANTS
    from fastmmio.sim.svm import caches as svm_caches
    from fastmmio.sim.svm.layouts import EXIT_CODES, TLB_CONTROL_NAMES
    from fastmmio.sim.vmx.caches import CONFIGS
    from fastmmio.sim.vmx.exits import EXIT_REASONS

    names = {"vmentry", "guest.insn", "tlb.nested_fault.hit", *KVM_EVENTS}
    served = set(SERVED_BY)
    for cfg in (*CONFIGS.values(), *svm_caches.CONFIGS.values()):
        served |= {lv.name for lv in cfg.data_cache or ()}
    names |= {f"walk.served.{s}" for s in served}
    for structure in ("guest", "ept", "nested"):
        for level in PAGING_LEVELS:
            names |= {f"walk.ref.{structure}.{level}", f"walk.ad.{structure}.{level}"}
    for kind in TRANSLATION_KINDS:
        names |= {f"tlb.{kind}.{o}" for o in ("hit", "miss", "dirty_assist")}
        names |= {f"psc.{kind}.{level}.{o}" for level in PSC_LEVELS for o in ("hit", "miss")}
    names |= {f"fault.{k}" for k in FAULT_KINDS}
    names |= {f"inv.{c}" for c in INVALIDATION_CAUSES}
    names |= {f"exit.{n}" for n in (*EXIT_REASONS.values(), *EXIT_CODES.values())}
    names |= {f"inv.tlb_control.{n}" for n in TLB_CONTROL_NAMES.values()}
    names |= {f"kvm.bus.lookup.{b.name}" for b in KvmBus}
    names |= {f"kvm.user_exit.{k}" for k in USER_EXIT_KINDS}
    names |= {e for cls in ALL_VARIANTS.values() for e in cls.events}  # the registered variants'
    return frozenset(names)
