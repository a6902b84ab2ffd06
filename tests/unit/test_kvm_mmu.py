"""The TDP MMU model (arch/x86/kvm/mmu: kvm_mmu_page_fault, handle_mmio_page_fault,
fast_page_fault, kvm_handle_noslot_fault, kvm_handle_error_pfn, kvm_tdp_mmu_map, make_spte,
make_mmio_spte, kvm_mmu_invalidate_mmio_sptes, kvm_mmu_zap_all_fast), with H3's processor
walking the SPTEs as its EPT."""

import pytest

from fastmmio import layout
from fastmmio.sim.kvm.emulator import EMULTYPE_ALLOW_RETRY_PF, EMULTYPE_PF
from fastmmio.sim.kvm.guestmem import PFERR_PRESENT_MASK, PFERR_RSVD_MASK, PFERR_WRITE_MASK
from fastmmio.sim.kvm.memslots import KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
from fastmmio.sim.kvm.mmu import (
    EPT_SPTE_MMU_WRITABLE,
    MMIO_SPTE_GEN_MASK,
    SHADOW_NONPRESENT_VALUE,
    SPTE_MMU_PRESENT_MASK,
    KvmPageFault,
    RetPf,
    get_mmio_spte_generation,
    get_mmio_spte_gfn,
    make_mmio_spte,
)
from fastmmio.sim.vmx.layouts import EPT_A, EPT_R, EPT_W, EPT_X, ept_bits20_misconfigured
from fastmmio.sim.vmx.walker import READ, WRITE
from kvm_sim_harness import MmuEnv

DB = layout.DOORBELL_GPA
RO = layout.RO_BASE
DATA = layout.DATA_GPA


@pytest.mark.parametrize("gen", [0, 2, 0xFE, 0x100, 0x12345, MMIO_SPTE_GEN_MASK, MMIO_SPTE_GEN_MASK + 2])
def test_mmio_spte_encoding(gen):
    """make_mmio_spte on EPT: W|X with R clear (EPT misconfiguration, SDM 28.2.3.1), gfn in
    51:12, generation low 8 bits in 10:3 and next 11 bits in 62:52 (spte.h, the MMIO SPTE generation layout)."""
    spte = make_mmio_spte(DB >> 12, gen)
    assert spte & 7 == 0b110 and ept_bits20_misconfigured(spte, execute_only=True)
    assert not spte & SPTE_MMU_PRESENT_MASK
    assert get_mmio_spte_gfn(spte) == DB >> 12
    assert get_mmio_spte_generation(spte) == gen & MMIO_SPTE_GEN_MASK
    g = gen & MMIO_SPTE_GEN_MASK
    assert (spte >> 3) & 0xFF == g & 0xFF and (spte >> 52) & 0x7FF == g >> 8


def test_first_mmio_access_installs_mmio_spte_then_misconfig():
    """kvm_handle_noslot_fault + tdp_mmu_map_handle_target_level: no memslot -> MMIO SPTE,
    RET_PF_EMULATE; the next access is an EPT misconfiguration (no ALLOW_RETRY: the MMIO info
    is cached)."""
    e = MmuEnv()
    final, pfs = e.access(DB, WRITE)
    assert final.kind == "ept_violation"
    assert pfs[-1].ret == RetPf.EMULATE and pfs[-1].path == "noslot_mmio_spte"
    assert pfs[-1].emulation_type == EMULTYPE_PF
    assert e.mmu.is_mmio_spte(e.mmu.get_spte(DB))
    assert e.ev["kvm.mmu.spte_install.mmio"] == 1
    again, _ = e.access(DB, WRITE)
    assert again.kind == "ept_misconfig" and again.gpa == DB


def test_reserved_fault_uses_mmio_info_then_spte():
    """handle_mmio_page_fault: the per-vCPU MMIO info answers first; without it a lockless
    walk finds the MMIO SPTE of the current generation -> emulate."""
    e = MmuEnv()
    e.access(DB, WRITE)
    r = e.mmu.page_fault(DB, PFERR_RSVD_MASK)
    assert (r.ret, r.path) == (RetPf.EMULATE, "mmio_info")
    assert e.ev["kvm.mmu.mmio_info_hit"] == 1
    e.mmio_info.clear()
    walks = e.ev["kvm.mmu.spte_walk"]
    r = e.mmu.page_fault(DB, PFERR_RSVD_MASK)
    assert (r.ret, r.path) == (RetPf.EMULATE, "mmio_spte")
    assert e.ev["kvm.mmu.spte_walk"] == walks + 1
    assert e.ev["kvm.mmu.fast_page_fault"] == 0  # page_fault_can_be_fast: never for rsvd


def test_stale_generation_takes_slow_path_and_refreshes():
    """check_mmio_spte: a memslot update changes the generation; the stale MMIO SPTE sends the
    fault down the slow path, which installs a new MMIO SPTE with the new generation."""
    e = MmuEnv()
    e.access(DB, WRITE)
    e.slots.set_user_memory_region(5, 0, 0x1000_0000, 0x1000, e.alloc.alloc_page())
    r = e.mmu.page_fault(DB, PFERR_RSVD_MASK)
    assert r.ret == RetPf.EMULATE and r.path == "mmio_spte_stale+noslot_mmio_spte"
    assert e.ev["kvm.mmu.mmio_spte_stale"] == 1
    assert get_mmio_spte_generation(e.mmu.get_spte(DB)) == e.slots.generation


def test_in_progress_generation_is_never_valid():
    """check_mmio_spte returns false while KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS is set."""
    e = MmuEnv()
    e.access(DB, WRITE)
    spte = e.mmu.get_spte(DB)
    e.slots.generation |= KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
    assert not e.mmu.check_mmio_spte(spte)


def test_memslot_created_over_mmio_spte_gets_mapped():
    """A new memslot at an address with an MMIO SPTE: stale generation -> slow path finds the
    slot -> a present SPTE replaces the MMIO one (RET_PF_FIXED)."""
    e = MmuEnv()
    e.access(DB, WRITE)
    e.slots.set_user_memory_region(7, 0, DB, 0x1000, e.alloc.alloc_page())
    r = e.mmu.page_fault(DB, PFERR_RSVD_MASK)
    assert r.ret == RetPf.FIXED
    hpa, _ = e.access(DB, WRITE)
    assert isinstance(hpa, int)


def test_mmio_caching_off_never_installs_spte():
    """kvm.mmio_caching=N: kvm_handle_noslot_fault emulates at once; every access is an EPT
    violation through the page-fault path (kvm.mmio_caching=N)."""
    e = MmuEnv(mmio_caching=False)
    final, pfs = e.access(DB, WRITE)
    assert pfs[-1].ret == RetPf.EMULATE and pfs[-1].path == "noslot_no_caching"
    assert e.mmu.get_spte(DB) == SHADOW_NONPRESENT_VALUE
    final, _ = e.access(DB, WRITE)
    assert final.kind == "ept_violation"
    assert e.ev["kvm.mmu.spte_install.mmio"] == 0


def test_readonly_memslot_read_maps_readonly_write_emulates():
    """mmu.c (kvm_faultin_pfn, RO memslot): a read of a KVM_MEM_READONLY slot maps the page read-only; a write then takes
    an EPT violation (present), fast_page_fault cannot fix it (not MMU-writable), the slow
    path gets KVM_PFN_ERR_RO_FAULT and returns emulate without an MMIO SPTE."""
    e = MmuEnv()
    hpa, _ = e.access(RO, READ)
    assert isinstance(hpa, int)
    spte = e.mmu.get_spte(RO)
    assert spte & EPT_R and spte & EPT_X and not spte & EPT_W and not spte & EPT_SPTE_MMU_WRITABLE
    final, pfs = e.access(RO, WRITE)
    assert final.kind == "ept_violation" and final.qualification & 0x38 == 0x28  # R and X
    r = pfs[-1]
    assert (r.ret, r.path) == (RetPf.EMULATE, "ro_write")
    assert r.emulation_type == EMULTYPE_PF | EMULTYPE_ALLOW_RETRY_PF
    assert e.mmu.get_spte(RO) == spte
    assert e.ev["kvm.mmu.fast_page_fault"] == 1 and e.ev["kvm.mmu.fast_page_fault.fixed"] == 0
    assert e.ev["kvm.mmu.bad_page"] == 1 and e.ev["kvm.mmu.spte_install.mmio"] == 0


def test_readonly_memslot_first_write_leaves_spte_not_present():
    """A first write to a read-only slot page emulates without installing anything."""
    e = MmuEnv()
    final, pfs = e.access(RO + 0x1000, WRITE)
    assert pfs[-1].path == "ro_write"
    assert e.mmu.get_spte(RO + 0x1000) == SHADOW_NONPRESENT_VALUE


def test_ram_read_fault_maps_writable():
    """kvm_tdp_mmu_map/make_spte: a RAM page is mapped writable even on a read fault; with
    EPT A/D the accessed bit is preset."""
    e = MmuEnv()
    hpa, pfs = e.access(DATA, READ)
    assert hpa == e.ram_hpa + DATA
    spte = e.mmu.get_spte(DATA)
    assert spte & EPT_W and spte & EPT_A and spte & SPTE_MMU_PRESENT_MASK
    assert all(p.ret == RetPf.FIXED for p in pfs)
    hpa, pfs = e.access(DATA, WRITE)
    assert pfs == []


def test_spurious_fault():
    """tdp_mmu_map_handle_target_level / fast_page_fault: an access the SPTE already allows is
    RET_PF_SPURIOUS."""
    e = MmuEnv()
    e.access(DATA, WRITE)
    r = e.mmu.page_fault(DATA, PFERR_WRITE_MASK | PFERR_PRESENT_MASK)
    assert (r.ret, r.path) == (RetPf.SPURIOUS, "spurious")


def test_fast_page_fault_makes_mmu_writable_spte_writable():
    """fast_page_fault: a write fault on a present SPTE that is MMU-writable but not writable
    is fixed in place."""
    e = MmuEnv()
    e.access(DATA, WRITE)
    level, sptep, spte = e.mmu.walk(DATA >> 12)[-1]
    e.mem.write_u64(sptep, spte & ~EPT_W)
    e.proc.invept(1, e.mmu.eptp)
    final, pfs = e.access(DATA, WRITE)
    assert isinstance(final, int)
    assert pfs[-1].path == "fast" and e.ev["kvm.mmu.fast_page_fault.fixed"] == 1


def test_fast_page_fault_not_present_only_without_ad():
    """page_fault_can_be_fast: a not-present fault is fast only when KVM's A/D bits are off
    (access tracking); restoring an access-tracked SPTE fixes it."""
    e = MmuEnv(ad_enabled=False)
    e.access(DATA, READ)
    assert e.mmu.age_gfn(DATA >> 12)
    assert e.mmu.get_spte(DATA) & 7 == 0
    final, pfs = e.access(DATA, READ)
    assert isinstance(final, int) and pfs[-1].path == "fast"
    assert e.mmu.get_spte(DATA) & EPT_R
    e2 = MmuEnv(ad_enabled=True)
    assert not e2.mmu.page_fault_can_be_fast(KvmPageFault.from_error_code(DATA, 0))
    assert e2.mmu.page_fault_can_be_fast(KvmPageFault.from_error_code(DATA, PFERR_WRITE_MASK | 1))
    assert not e2.mmu.page_fault_can_be_fast(KvmPageFault.from_error_code(DATA, 1))
    assert not e2.mmu.page_fault_can_be_fast(KvmPageFault.from_error_code(DATA, PFERR_RSVD_MASK | 3))


def test_ad_enabled_aging_clears_accessed_only():
    """kvm_age_gfn with A/D: the accessed bit is cleared, the SPTE stays present."""
    e = MmuEnv()
    e.access(DATA, READ)
    assert e.mmu.age_gfn(DATA >> 12)
    assert e.mmu.get_spte(DATA) & 7 == 7 and not e.mmu.get_spte(DATA) & EPT_A


def test_generation_wrap_zaps_all_and_reloads_root():
    """kvm_mmu_invalidate_mmio_sptes: when the 19-bit MMIO generation (address-space bit
    stripped) wraps to 0, kvm_mmu_zap_all_fast: a new root the vCPU must load."""
    e = MmuEnv()
    e.access(DB, WRITE)
    old_root = e.mmu.root_hpa
    e.slots.generation = MMIO_SPTE_GEN_MASK + 1 - 2
    e.slots.set_user_memory_region(6, 0, 0x1000_0000, 0x1000, e.alloc.alloc_page())
    assert e.slots.generation & MMIO_SPTE_GEN_MASK == 0
    assert e.mmu.root_hpa != old_root and "mmu_reload" in e.mmu.requests
    assert e.ev["kvm.mmu.zap_all_fast"] == 1
    assert e.mmu.service_requests(e.proc) == ["mmu_reload"]
    assert e.proc.eptp == e.mmu.eptp
    final, pfs = e.access(DB, WRITE)
    assert pfs[-1].path == "noslot_mmio_spte"


def test_memslot_delete_zaps_all_fast_by_default():
    """kvm_arch_flush_shadow_memslot under KVM_X86_QUIRK_SLOT_ZAP_ALL: kvm_mmu_zap_all_fast."""
    e = MmuEnv()
    e.access(RO, READ)
    e.slots.set_user_memory_region(layout.RO_SLOT, 0, RO, 0)
    assert "mmu_reload" in e.mmu.requests
    final, pfs = e.access(RO, READ)
    assert pfs[-1].path == "noslot_mmio_spte"


def test_memslot_delete_without_quirk_zaps_range_and_flushes():
    """kvm_mmu_zap_memslot (quirk disabled): only the slot's SPTEs go, with a TLB flush."""
    e = MmuEnv(slot_zap_all=False)
    e.access(RO, READ)
    e.access(DATA, READ)
    e.slots.set_user_memory_region(layout.RO_SLOT, 0, RO, 0)
    assert e.mmu.requests == {"tlb_flush"}
    assert e.mmu.get_spte(RO) == SHADOW_NONPRESENT_VALUE
    assert e.mmu.get_spte(DATA) & EPT_R


def test_write_to_guest_page_table_retries():
    """kvm_mmu_page_fault: RET_PF_EMULATE for a write to a guest paging structure
    (PFERR_GUEST_PAGE|WRITE|PRESENT) unprotects and resumes instead of emulating."""
    e = MmuEnv()
    e.access(RO, READ)
    r = e.mmu.page_fault(RO, (1 << 33) | PFERR_WRITE_MASK | PFERR_PRESENT_MASK)
    assert r.ret == RetPf.RETRY and r.path.endswith("guest_page_write")


def test_variant_hooks():
    """Hooks for the thread's alternatives: the RO-write (bad page) path can take the access,
    and a read-only page can be given an MMIO SPTE instead of a read-only one."""
    e = MmuEnv()
    seen = []
    e.mmu.ro_write_fault_hook = lambda gpa: seen.append(gpa) or True
    r = e.mmu.page_fault(RO, PFERR_WRITE_MASK)
    assert (r.ret, r.path, seen) == (RetPf.RETRY, "hook", [RO])
    e = MmuEnv()
    e.mmu.mmio_spte_for_readonly_hook = lambda gfn: gfn == RO >> 12
    final, pfs = e.access(RO, WRITE)
    assert pfs[-1].path == "mmio_spte_for_readonly"
    final, _ = e.access(RO, READ)
    assert final.kind == "ept_misconfig"
    hpa, _ = e.access(RO + 0x1000, READ)
    assert isinstance(hpa, int)
