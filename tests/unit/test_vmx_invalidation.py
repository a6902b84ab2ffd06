"""Creation tags and invalidation of cached translation information (SDM 4.10.4.1, 28.3.2,
28.3.3.1, 28.3.3.4) in fastmmio.sim.vmx.processor."""

from __future__ import annotations

import pytest

from fastmmio.sim.vmx import layouts as L
from fastmmio.sim.vmx.errors import VmxError
from fastmmio.sim.vmx.exits import EXIT_IO_INSTRUCTION, ExitInfo
from fastmmio.sim.vmx.layouts import make_eptp
from fastmmio.sim.vmx.processor import (
    INVEPT_ALL,
    INVEPT_SINGLE,
    INVVPID_ADDRESS,
    INVVPID_ALL,
    INVVPID_SINGLE,
    INVVPID_SINGLE_RETAIN_GLOBALS,
    READ,
    WRITE,
    Fault,
)
from fastmmio.sim.vmx.tables import PageTableBuilder
from fastmmio.sim.vmx.testbed import Testbed

LA = 0x7F12_3456_7123
LA2 = LA + 0x1000
GLOBAL_LA = 0x7F12_3456_9000
CR4_PGE = 1 << 7
CR4_PCIDE = 1 << 17


def bed(config="sdm-max", **kw) -> Testbed:
    """Two ordinary pages and one global page; CR4.PGE set."""
    tb = Testbed(config, **kw)
    tb.map_ept_ram(tb.ram_size - 0x10000, 0x10000)
    tb.map_ept_ram(0x40000, 0x4000)
    tb.map_guest(LA & ~0xFFF, 0x40000)
    tb.map_guest(LA2 & ~0xFFF, 0x41000)
    tb.map_guest(GLOBAL_LA, 0x42000, g=True)
    tb.proc.load_guest_state(cr4=tb.proc.cr4 | CR4_PGE)
    return tb


def warm(p, *las):
    for la in las:
        assert isinstance(p.translate(la, READ), int)


def test_vmexit_and_vmentry_without_vpid_flush_combined_mappings():
    """SDM 28.3.3.1: with "enable VPID" = 0, VM exits and VM entries invalidate linear and
    combined mappings for VPID 0000H; guest-physical mappings stay (28.3.3.2)."""
    tb = bed(vpid_enabled=False)
    p = tb.proc
    warm(p, LA, GLOBAL_LA)
    p.vmexit(ExitInfo(EXIT_IO_INSTRUCTION, instruction_length=2))
    assert not p.has_translation(LA) and not p.has_translation(GLOBAL_LA)
    assert not p.has_psc("combined", "pde", LA)
    assert p.has_gpa_translation(0x40000)
    warm(p, LA)
    p.vmentry()
    assert not p.has_translation(LA)
    ev = p.events
    assert ev["inv.vmexit_novpid"] == 1 and ev["inv.vmentry_novpid"] == 1
    assert ev["exit.IO_INSTRUCTION"] == 1 and ev["vmentry"] == 1


def test_vmexit_and_vmentry_with_vpid_keep_combined_mappings():
    """SDM 28.3.3.2: with "enable VPID" = 1, VMX transitions need not invalidate."""
    tb = bed(vpid_enabled=True, vpid=5)
    p = tb.proc
    warm(p, LA)
    p.vmexit(EXIT_IO_INSTRUCTION)
    p.vmentry()
    assert p.has_translation(LA)
    p.reset_events()
    warm(p, LA)
    assert p.reset_events()["tlb.combined.hit"] == 1


def test_mappings_tagged_by_vpid():
    """SDM 28.3.2: combined mappings are associated with the current VPID; another VPID does
    not use them."""
    tb = bed(vpid=1)
    p = tb.proc
    warm(p, LA)
    p.set_vpid(2)
    assert not p.has_translation(LA)
    p.set_vpid(1)
    assert p.has_translation(LA)


def test_mappings_tagged_by_ep4ta():
    """SDM 28.3.2: guest-physical and combined mappings are associated with the EP4TA; an
    EPTP with another PML4 table address does not use them, and INVEPT single-context
    invalidates one EP4TA's mappings only (28.3.3.1)."""
    tb = bed()
    p = tb.proc
    eptp1 = p.eptp
    warm(p, LA)
    # a second EPT hierarchy mapping the same RAM
    ept2 = PageTableBuilder.ept(tb.memory, tb.alloc)
    for off in range(0, 0x10000, 0x1000):
        g = tb.ram_size - 0x10000 + off
        ept2.map(g, tb.ram_hpa + g)
    for g in (0x40000, 0x41000, 0x42000):
        ept2.map(g, tb.ram_hpa + g)
    eptp2 = make_eptp(ept2.root)
    p.set_eptp(eptp2)
    assert not p.has_translation(LA) and not p.has_gpa_translation(0x40000)
    warm(p, LA)
    p.invept(INVEPT_SINGLE, eptp1)
    assert p.has_translation(LA) and p.has_gpa_translation(0x40000)
    p.set_eptp(eptp1)
    assert not p.has_translation(LA) and not p.has_gpa_translation(0x40000)
    assert not p.has_psc("guest_physical", "pde", 0x40000)


def test_invept_all_context():
    """SDM 28.3.3.1: INVEPT type 2 invalidates guest-physical and combined mappings of all
    EP4TAs (all VPIDs and PCIDs)."""
    tb = bed()
    p = tb.proc
    warm(p, LA, GLOBAL_LA)
    p.set_vpid(7)
    warm(p, LA)
    p.invept(INVEPT_ALL)
    assert p.cached_counts() == {k: 0 for k in p.cached_counts()}


def test_invept_single_invalidates_all_vpids_and_pcids_of_the_ep4ta():
    """SDM 28.3.3.1: "Combined mappings for that EP4TA are invalidated for all VPIDs and all
    PCIDs"."""
    tb = bed()
    p = tb.proc
    warm(p, LA)
    p.set_vpid(9)
    warm(p, LA)
    p.invept(INVEPT_SINGLE, p.eptp)
    assert not p.has_translation(LA)
    p.set_vpid(1)
    assert not p.has_translation(LA)


def test_invvpid_individual_address():
    """SDM 28.3.3.1: INVVPID type 0 invalidates the mappings of the VPID that would
    translate the address, for all PCIDs; other pages and other VPIDs stay."""
    tb = bed(vpid=3)
    p = tb.proc
    warm(p, LA, LA2)
    p.set_vpid(4)
    warm(p, LA)
    p.invvpid(INVVPID_ADDRESS, 3, LA)
    assert p.has_translation(LA)  # VPID 4
    p.set_vpid(3)
    assert not p.has_translation(LA) and p.has_translation(LA2)
    assert not p.has_psc("combined", "pde", LA)


def test_invvpid_single_context_and_all_contexts():
    """SDM 28.3.3.1: type 1 invalidates all of one VPID (globals too); type 2 every VPID
    except 0000H."""
    tb = bed(vpid=3)
    p = tb.proc
    warm(p, LA, GLOBAL_LA)
    p.invvpid(INVVPID_SINGLE, 3)
    assert not p.has_translation(LA) and not p.has_translation(GLOBAL_LA)
    warm(p, LA)
    p.set_vpid(5)
    warm(p, LA)
    p.invvpid(INVVPID_ALL, 0)
    assert not p.has_translation(LA)
    p.set_vpid(3)
    assert not p.has_translation(LA)


def test_invvpid_all_contexts_spares_vpid_0():
    """SDM 28.3.3.1: all-context INVVPID invalidates every VPID "except VPID 0000H"."""
    tb = bed(vpid_enabled=False)
    p = tb.proc
    warm(p, LA)
    p.invvpid(INVVPID_ALL, 0)
    assert p.has_translation(LA)


def test_invvpid_single_context_retaining_globals():
    """SDM 28.3.3.1: type 3 keeps global translations."""
    tb = bed(vpid=3)
    p = tb.proc
    warm(p, LA, GLOBAL_LA)
    p.invvpid(INVVPID_SINGLE_RETAIN_GLOBALS, 3)
    assert not p.has_translation(LA) and p.has_translation(GLOBAL_LA)
    assert not p.has_psc("combined", "pde", LA)


def test_invvpid_bad_operands_fail():
    """SDM Chapter 30 (INVVPID): VPID 0 with types 0/1/3, or a non-canonical address with
    type 0, fail (VMfailValid); unknown types are invalid."""
    p = bed().proc
    for t in (0, 1, 3):
        with pytest.raises(VmxError):
            p.invvpid(t, 0, LA)
    with pytest.raises(VmxError):
        p.invvpid(INVVPID_ADDRESS, 1, 0x0000_8000_0000_0000)
    with pytest.raises(VmxError):
        p.invvpid(4, 1)
    with pytest.raises(VmxError):
        p.invept(3)


def test_mov_cr3_without_pcide_keeps_globals():
    """SDM 4.10.4.1: MOV to CR3 with CR4.PCIDE = 0 invalidates the TLB entries of PCID 000H
    except global ones, and all paging-structure-cache entries of PCID 000H."""
    tb = bed()
    p = tb.proc
    warm(p, LA, GLOBAL_LA)
    p.mov_cr3(p.cr3)
    assert not p.has_translation(LA) and p.has_translation(GLOBAL_LA)
    assert not p.has_psc("combined", "pde", GLOBAL_LA)
    p.reset_events()
    warm(p, GLOBAL_LA)
    assert p.reset_events()["tlb.combined.hit"] == 1


def test_mov_cr3_with_pcide():
    """SDM 4.10.1 / 4.10.4.1: with CR4.PCIDE = 1 mappings are per PCID; MOV to CR3 flushes
    only the PCID being established, and none if bit 63 of the source is 1. Global entries
    are used under any PCID (4.10.2.4)."""
    tb = bed()
    p = tb.proc
    root = p.cr3
    p.load_guest_state(cr4=p.cr4 | CR4_PCIDE, cr3=root | 1)
    warm(p, LA, GLOBAL_LA)
    p.mov_cr3(root | 2)  # switch to PCID 2: PCID 1's entries stay
    assert not p.has_translation(LA) and p.has_translation(GLOBAL_LA)
    warm(p, LA)
    p.mov_cr3(root | 1 | (1 << 63))  # back to PCID 1 without flushing
    assert p.has_translation(LA)
    p.mov_cr3(root | 1)  # flushes PCID 1
    assert not p.has_translation(LA) and p.has_translation(GLOBAL_LA)
    p.mov_cr3(root | 2 | (1 << 63))
    assert p.has_translation(LA)  # PCID 2's entry survived


def test_invlpg():
    """SDM 4.10.4.1: INVLPG invalidates the page's TLB entries (global ones too) and all
    paging-structure-cache entries of the current PCID; other pages' translations stay."""
    tb = bed()
    p = tb.proc
    warm(p, LA, LA2, GLOBAL_LA)
    p.invlpg(LA)
    assert not p.has_translation(LA) and p.has_translation(LA2)
    assert not p.has_psc("combined", "pde", LA2)
    p.invlpg(GLOBAL_LA)
    assert not p.has_translation(GLOBAL_LA)
    assert p.has_gpa_translation(0x40000)  # 28.3.3.2: guest-physical mappings untouched


def test_mov_cr4_pge_change_flushes_globals():
    """SDM 4.10.4.1: MOV to CR4 changing PGE invalidates all TLB entries, global included."""
    tb = bed()
    p = tb.proc
    warm(p, GLOBAL_LA)
    p.mov_cr4(p.cr4 & ~CR4_PGE)
    assert not p.has_translation(GLOBAL_LA)


def test_mov_cr0_clearing_pg_flushes():
    """SDM 4.10.4.1: MOV to CR0 clearing PG invalidates all TLB and PSC entries."""
    tb = bed()
    p = tb.proc
    warm(p, LA, GLOBAL_LA)
    p.mov_cr0(p.cr0 & ~(1 << 31))
    p.load_guest_state(cr0=p.cr0 | (1 << 31))
    assert not p.has_translation(LA) and not p.has_translation(GLOBAL_LA)


def test_guest_page_fault_invalidates_linear_address():
    """SDM 4.10.4.1: a page fault invalidates the TLB entries for its linear address and the
    paging-structure-cache entries that would translate it; 4.10.2.3: the cached rights may
    be used. A read caches a read-only translation; the PTE is then made writable in memory
    without INVLPG; the write faults from the cache once, and not again."""
    tb = bed()
    tb.map_guest(LA & ~0xFFF, 0x40000, w=False)
    p = tb.proc
    warm(p, LA)
    pte = tb.guest.entry_address(LA, 1)
    tb.write_gpa_u64(pte, tb.read_gpa_u64(pte) | L.PTE_RW)
    f = p.translate(LA, WRITE)
    assert isinstance(f, Fault) and f.kind == "page_fault" and f.error_code == L.PFERR_P | L.PFERR_W
    assert not p.has_translation(LA) and not p.has_psc("combined", "pde", LA)
    assert isinstance(p.translate(LA, WRITE), int)


def test_ept_violation_does_not_recur_after_permission_upgrade_without_invept():
    """SDM 28.3.3.4: after changing EPT permissions from 0 to 1 without INVEPT, one EPT
    violation may occur (from the cached translation); it invalidates the mappings it used,
    so the access then succeeds."""
    tb = bed()
    tb.ept.map(0x40000, tb.gpa_to_hpa(0x40000), w=False)
    p = tb.proc
    warm(p, LA)
    tb.ept.map(0x40000, tb.gpa_to_hpa(0x40000), w=True)
    v = p.translate(LA, WRITE)
    assert isinstance(v, Fault) and v.kind == "ept_violation"
    assert isinstance(p.translate(LA, WRITE), int)


def test_ept_violation_on_paging_structure_does_not_recur():
    """SDM 28.3.3.4 again, for a guest paging-structure page: its EPT entry is read-only
    when the combined PDE-cache entry is made; the guest PTE of a second page has A clear,
    so the walk must write it: violation. The EPT entry is made writable without INVEPT; the
    retry succeeds because the violation dropped the combined mappings for the address."""
    tb = bed()
    p = tb.proc
    pt_gpa = tb.guest.entry_address(LA, 1) & ~0xFFF
    warm(p, LA)  # sets A on LA's PTE and caches the PDE entry
    tb.ept.map(pt_gpa, tb.gpa_to_hpa(pt_gpa), w=False)
    p.invept(INVEPT_SINGLE, p.eptp)
    warm(p, LA)  # PDE cache now records the page table's page as read-only
    assert p.has_psc("combined", "pde", LA2)
    v = p.translate(LA2, READ)  # LA2's PTE has A = 0: needs a write
    assert v.kind == "ept_violation" and v.qualification & L.QUAL_WRITE
    assert not v.qualification & L.QUAL_TRANSLATED
    tb.ept.map(pt_gpa, tb.gpa_to_hpa(pt_gpa), w=True)
    assert isinstance(p.translate(LA2, READ), int)


def test_no_invept_needed_after_fixing_misconfigured_or_not_present_entry():
    """SDM 28.3.3.4: nothing is cached from not-present or misconfigured EPT entries, so
    replacing one needs no INVEPT (what KVM relies on when it installs SPTEs)."""
    tb = bed()
    p = tb.proc
    tb.ept.set_entry(0x40000, 1, L.EPT_W | L.EPT_X)
    assert p.translate(LA, WRITE).kind == "ept_misconfig"
    tb.ept.map(0x40000, tb.gpa_to_hpa(0x40000))
    assert isinstance(p.translate(LA, WRITE), int)
    tb.ept.unmap(0x41000)
    assert p.translate(LA2, READ).kind == "ept_violation"
    tb.ept.map(0x41000, tb.gpa_to_hpa(0x41000))
    assert isinstance(p.translate(LA2, READ), int)


def test_stale_translation_used_until_invalidated():
    """SDM 4.10.2.3 / 28.3.3: the processor does not snoop paging structures: a cached
    translation survives a change in memory until an invalidation (here INVEPT)."""
    tb = bed()
    p = tb.proc
    warm(p, LA)
    before = p.translate(LA, READ)
    tb.ept.map(0x40000, tb.gpa_to_hpa(0x43000))
    assert p.translate(LA, READ) == before
    p.invept(INVEPT_SINGLE, p.eptp)
    assert p.translate(LA, READ) == tb.gpa_to_hpa(0x43123)


def test_invalidation_listeners_are_told():
    """The simulator CPU mirrors translations in unicorn's TLB: it must hear of every
    invalidation."""
    tb = bed(vpid_enabled=False)
    heard = []
    tb.proc.listeners.append(heard.append)
    tb.proc.vmexit(EXIT_IO_INSTRUCTION)
    tb.proc.invlpg(LA)
    assert heard == ["vmexit_novpid", "invlpg"]
