"""ASID tagging, TLB_CONTROL at VMRUN, what VMRUN and #VMEXIT do not flush, INVLPGA and the
named assumptions on nested caching (fastmmio.sim.svm). Sections are AMD64 APM vol. 2
chapter 15."""

from __future__ import annotations

import pytest

from fastmmio.sim.svm import layouts as S
from fastmmio.sim.svm.caches import ASSUMPTIONS, CONFIGS
from fastmmio.sim.svm.errors import SvmError
from fastmmio.sim.svm.exits import SvmExit
from fastmmio.sim.svm.processor import READ, WRITE, Fault
from fastmmio.sim.svm.testbed import SvmTestbed
from fastmmio.x86 import paging as L

LA = 0x7F12_3456_7000
LA_G = 0x7F12_3456_9000  # a global guest page (CR4.PGE = 1)
DATA, DATA_G = 0x40000, 0x41000


def refs(ev) -> int:
    return sum(v for k, v in ev.items() if k.startswith("walk.ref."))


def machine(config="apm-max", **kw) -> SvmTestbed:
    tb = SvmTestbed(config, **kw)
    tb.map_ept_ram(tb.ram_size - 0x10000, 0x10000)
    tb.map_ept_ram(DATA, 0x2000)
    tb.map_guest(LA, DATA)
    tb.map_guest(LA_G, DATA_G, g=True)
    tb.proc.load_guest_state(cr4=tb.proc.cr4 | (1 << 7))
    return tb


def warm(tb: SvmTestbed) -> None:
    for la in (LA, LA_G):
        assert isinstance(tb.proc.translate(la, READ), int)
    tb.proc.reset_events()


def cached(tb: SvmTestbed) -> tuple[bool, bool, bool]:
    p = tb.proc
    return p.has_translation(LA), p.has_translation(LA_G), p.has_nested_translation(DATA)


def test_entries_of_another_asid_are_not_used():
    """APM 15.16: "TLB entries are tagged with Address Space Identifier (ASID) bits";
    15.25.1: "TLB entries from different guests can coexist". A VMRUN with ASID 2 walks as
    a cold processor does (nothing of ASID 1 is used, nested translations and walk caches
    included); back in ASID 1 the old entries hit."""
    tb = machine()
    warm(tb)
    tb.proc.vmrun(asid=2)
    assert cached(tb) == (False, False, False)
    assert isinstance(tb.proc.translate(LA, READ), int)
    ev = tb.proc.reset_events()
    fresh = machine()
    fresh.proc.translate(LA, READ)
    assert ev["tlb.combined.miss"] == 1 and refs(ev) == refs(fresh.proc.reset_events()) > 4
    tb.proc.vmrun(asid=1)
    assert cached(tb) == (True, True, True)
    tb.proc.translate(LA, READ)
    assert tb.proc.reset_events()["tlb.combined.hit"] == 1


def test_global_pages_are_global_only_within_their_asid():
    """APM 15.16: "global page table entries (PTEs) are global only within an ASID"."""
    tb = machine()
    warm(tb)
    tb.proc.vmrun(asid=5)
    assert not tb.proc.has_translation(LA_G)


def test_vmrun_and_vmexit_do_not_flush():
    """APM 15.16: "The VMRUN instruction and #VMEXIT write the CR0, CR3, CR4 and EFER
    registers, but these writes do not flush the TLB"."""
    tb = machine()
    warm(tb)
    tb.proc.vmexit(SvmExit(S.EXIT_HLT))
    tb.proc.vmrun(S.TLB_CONTROL_DO_NOTHING)
    assert cached(tb) == (True, True, True)
    ev = tb.proc.reset_events()
    assert ev["exit.HLT"] == 1 and ev["vmentry"] == 1
    assert not [k for k in ev if k.startswith("inv.")]


def test_tlb_control_00h_does_not_flush():
    """Table 15-9: 00h "Do not flush"."""
    tb = machine()
    warm(tb)
    tb.proc.vmrun(0x00)
    assert cached(tb) == (True, True, True)


def test_tlb_control_01h_flushes_every_asid():
    """Table 15-9 / 15.16.1: with TLB_CONTROL 1 "the VMRUN instruction flushes the TLB for
    all ASIDs, for both global and non-global pages"."""
    tb = machine()
    warm(tb)
    tb.proc.vmrun(asid=2)
    warm(tb)
    tb.proc.vmrun(S.TLB_CONTROL_FLUSH_ALL_ASID, asid=1)
    assert cached(tb) == (False, False, False)
    tb.proc.vmrun(asid=2)
    assert cached(tb) == (False, False, False)
    assert tb.proc.events["inv.tlb_control.flush_all_asid"] == 1


def test_tlb_control_03h_flushes_this_guests_entries_only():
    """Table 15-9: 03h "Flush this guest's TLB entries": global and nested ones of the
    current ASID, none of another ASID."""
    tb = machine()
    warm(tb)
    tb.proc.vmrun(asid=2)
    warm(tb)
    tb.proc.vmrun(S.TLB_CONTROL_FLUSH_ASID, asid=1)
    assert cached(tb) == (False, False, False)
    tb.proc.vmrun(asid=2)
    assert cached(tb) == (True, True, True)


def test_tlb_control_07h_keeps_this_guests_global_entries():
    """Table 15-9: 07h "Flush this guest's non-global TLB entries": the global guest page
    stays; nested translations are never global (15.25.7: "the nested page table entry and
    host hCR4.PGE are irrelevant" to globality) and go; another ASID keeps everything."""
    tb = machine()
    warm(tb)
    tb.proc.vmrun(asid=2)
    warm(tb)
    tb.proc.vmrun(S.TLB_CONTROL_FLUSH_ASID_LOCAL, asid=1)
    assert cached(tb) == (False, True, False)
    tb.proc.vmrun(asid=2)
    assert cached(tb) == (True, True, True)


def test_tlb_control_reserved_and_optional_encodings():
    """Table 15-9: "All encodings not defined in this table are reserved"; 03h and 07h are
    optional (CPUID Fn8000_000A_EDX[FlushByAsid])."""
    tb = machine()
    for bad in (0x02, 0x04, 0xFF):
        with pytest.raises(SvmError):
            tb.proc.vmrun(bad)
    tb = machine(flush_by_asid=False)
    tb.proc.vmrun(S.TLB_CONTROL_FLUSH_ALL_ASID)
    for v in (S.TLB_CONTROL_FLUSH_ASID, S.TLB_CONTROL_FLUSH_ASID_LOCAL):
        with pytest.raises(SvmError):
            tb.proc.vmrun(v)


def test_vmrun_with_asid_zero_is_vmexit_invalid():
    """APM 15.25.1: "if the VMM attempts to execute VMRUN with a guest ASID of zero, the
    result is #VMEXIT(VMEXIT_INVALID)"."""
    tb = machine()
    ex = tb.proc.vmrun(asid=0)
    assert ex is not None and ex.name == "INVALID"
    assert tb.proc.events["exit.INVALID"] == 1 and tb.proc.asid == 1


def test_invlpga_invalidates_one_page_of_one_asid():
    """APM 15.16.2: INVLPGA invalidates "the TLB mapping for a given guest virtual page
    within a given ASID"; it "does not provide a means to invalidate a nested translation
    by guest physical address"."""
    tb = machine()
    warm(tb)
    tb.proc.vmrun(asid=2)
    warm(tb)
    tb.proc.invlpga(LA, 1)
    assert cached(tb) == (True, True, True)  # ASID 2 untouched
    tb.proc.vmrun(asid=1)
    assert cached(tb) == (False, True, True)
    tb.proc.invlpga(LA_G, 1)  # a global page too
    assert not tb.proc.has_translation(LA_G)


def test_guest_mov_cr3_flushes_only_the_current_asid():
    """APM 15.16.1: "A MOV CR3 instruction ... affects only the TLB entries belonging to
    the current ASID" (non-global ones)."""
    tb = machine()
    warm(tb)
    tb.proc.vmrun(asid=2)
    warm(tb)
    tb.proc.mov_cr3(tb.proc.cr3)
    assert cached(tb)[:2] == (False, True)
    tb.proc.vmrun(asid=1)
    assert cached(tb) == (True, True, True)


def test_nested_change_without_flush_may_use_the_stale_translation():
    """APM 15.16.1: after "clearing present bits" in a nested table the hypervisor "should
    use either TLB command 011b or 001b": until it does, the cached translation is used;
    after 03h the access faults."""
    tb = machine()
    warm(tb)
    ea = tb.npt.entry_address(DATA, 1)
    tb.memory.write_u64(ea, 0)
    assert isinstance(tb.proc.translate(LA, READ), int)
    tb.proc.vmrun(S.TLB_CONTROL_FLUSH_ASID)
    f = tb.proc.translate(LA, READ)
    assert isinstance(f, Fault) and f.kind == "npf" and not f.error_code & S.NPF_P


def test_raising_nested_rights_needs_no_flush_by_default():
    """Assumption ``nested_fault_caching=none`` (APM 15.16.1 lists only decreasing
    permissions, clearing present bits and changing translations as needing a flush):
    after a #NPF, setting the present bit or the write bit takes effect without one."""
    tb = machine()
    ea = tb.npt.entry_address(DATA, 1)
    good = tb.memory.read_u64(ea)
    tb.memory.write_u64(ea, good & ~L.PTE_RW)
    assert isinstance(tb.proc.translate(LA, READ), int)
    assert isinstance(tb.proc.translate(LA, WRITE), Fault)
    tb.memory.write_u64(ea, good)
    assert isinstance(tb.proc.translate(LA, WRITE), int)
    tb.memory.write_u64(ea, 0)
    tb.proc.vmrun(S.TLB_CONTROL_FLUSH_ASID)
    assert isinstance(tb.proc.translate(LA, READ), Fault)
    tb.memory.write_u64(ea, good)
    assert isinstance(tb.proc.translate(LA, READ), int)


def test_assumption_faulting_keeps_the_fault_until_a_flush():
    """Assumption ``nested_fault_caching=faulting``: the faulting nested result is kept
    for the page until a TLB_CONTROL flush of the ASID (a bound for hypervisors that skip
    the flush; the APM does not say either way)."""
    tb = machine(assumptions={"nested_fault_caching": "faulting"})
    ea = tb.npt.entry_address(DATA, 1)
    good = tb.memory.read_u64(ea)
    tb.memory.write_u64(ea, 0)
    assert isinstance(tb.proc.translate(LA, READ), Fault)
    tb.memory.write_u64(ea, good)
    f = tb.proc.translate(LA, READ)
    assert isinstance(f, Fault) and not f.error_code & S.NPF_P
    assert tb.proc.has_nested_fault_cached(DATA)
    tb.proc.vmrun(S.TLB_CONTROL_FLUSH_ASID)
    assert not tb.proc.has_nested_fault_cached(DATA)
    assert isinstance(tb.proc.translate(LA, READ), int)


def test_assumptions_and_configs_are_named_with_the_apm_words():
    """Every assumption carries its APM text and the reading chosen; every bounded
    structure of every configuration names its source."""
    for a in ASSUMPTIONS.values():
        assert a.default in a.values and "15." in a.apm and a.reading
    for cfg in CONFIGS.values():
        for st in cfg.combined_tlb + cfg.guest_physical_tlb:
            assert st.spec.source
        for d in (cfg.combined_psc, cfg.guest_physical_psc):
            for spec in d.values():
                assert spec is not None and spec.source
    z = CONFIGS["zen4"]
    assert z.combined_tlb[0].spec.entries == 3072 and z.combined_tlb[1].spec.entries == 72
