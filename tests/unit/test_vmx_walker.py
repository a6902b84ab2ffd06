"""The two-dimensional walker: reference counts, EPT violations and their qualification bits,
EPT misconfigurations, guest page faults (fastmmio.sim.vmx.walker)."""

from __future__ import annotations

import pytest

from fastmmio.sim.vmx import layouts as L
from fastmmio.sim.vmx.processor import FETCH, READ, WRITE, Fault
from fastmmio.sim.vmx.testbed import Testbed

LA = 0x7F12_3456_7123
K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30


def refs(ev) -> int:
    return sum(v for k, v in ev.items() if k.startswith("walk.ref."))


def simple(config="sdm-max", **kw) -> Testbed:
    """Guest RAM EPT-mapped with 4 KiB leaves around the page tables and one data page;
    LA -> GPA 0x40000 with a 4 KiB guest page."""
    tb = Testbed(config, **kw)
    tb.map_ept_ram(tb.ram_size - 0x10000, 0x10000)
    tb.map_ept_ram(0x40000, 0x2000)
    tb.map_guest(LA & ~0xFFF, 0x40000)
    return tb


# ------------------------------------------------------------------------------------------
# reference counts (SDM 28.2.1: each guest reference goes through EPT)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["none", "sdm-max", "skylake-sp", "golden-cove"])
def test_cold_walk_4level_guest_4level_ept_4k_is_24_references(config):
    """SDM 28.2.1: 4 guest entries, each at a GPA translated by a 4-entry EPT walk, then the
    final GPA's EPT walk: 4 * (4 + 1) + 4 = 24. The layout puts every structure in its own
    EPT PML4E region so that even sdm-max caches cannot share within the walk."""
    tb = Testbed(config)
    tb.spread_walk(LA, K4, K4)
    r = tb.proc.translate(LA, READ)
    assert isinstance(r, int)
    ev = tb.proc.reset_events()
    assert refs(ev) == 24
    assert ev["walk.ref.guest.pte"] == 1 and ev["walk.ref.ept.pte"] == 5
    assert ev["walk.ref.ept.pml4e"] == 5


@pytest.mark.parametrize("config", ["sdm-max", "skylake-sp", "golden-cove"])
def test_warm_combined_translation_makes_zero_references(config):
    """SDM 4.10.2.3 / 28.3.2: a cached combined translation is used instead of the walk."""
    tb = Testbed(config)
    tb.spread_walk(LA, K4, K4)
    tb.proc.translate(LA, READ)
    tb.proc.reset_events()
    assert isinstance(tb.proc.translate(LA, READ), int)
    ev = tb.proc.reset_events()
    assert refs(ev) == 0 and ev["tlb.combined.hit"] == 1


def test_config_none_always_walks_24():
    """A processor may cache nothing (SDM 4.10.2.2 "Processors need not implement any TLBs")."""
    tb = Testbed("none")
    tb.spread_walk(LA, K4, K4)
    for _ in range(3):
        tb.proc.translate(LA, READ)
        assert refs(tb.proc.reset_events()) == 24


@pytest.mark.parametrize("guest_page,ept_page,expected", [
    (M2, K4, 19), (K4, M2, 19), (M2, M2, 15), (G1, G1, 8), (G1, M2, 11)])
def test_large_pages_cold_reference_counts(guest_page, ept_page, expected):
    """Hand derivation, (g guest levels) x (e EPT levels + 1) + e:
    guest 2 MiB (3 levels) over 4 KiB EPT (4): 3*5 + 4 = 19; guest 4 KiB (4) over 2 MiB EPT
    (3): 4*4 + 3 = 19; both 2 MiB: 3*4 + 3 = 15; both 1 GiB: 2*3 + 2 = 8; guest 1 GiB over
    2 MiB EPT: 2*4 + 3 = 11 (SDM 4.5 and 28.2.2 page sizes)."""
    tb = Testbed("sdm-max")
    la = (LA & ~(guest_page - 1)) | 0x123
    tb.spread_walk(la, guest_page, ept_page)
    assert isinstance(tb.proc.translate(la, READ), int)
    assert refs(tb.proc.reset_events()) == expected


def test_warm_paging_structure_caches_reduce_references():
    """Second page in the same guest page table, after the first page's walk, sdm-max:
    the combined PDE cache (SDM 4.10.3.1, 28.3.1) gives the guest page table's host-physical
    address, so the guest PTE is read with no EPT walk (1 reference); the new data page's
    GPA shares the data region's EPT page table, so the guest-physical PDE cache
    (28.3.1) leaves only the EPT PTE (1 reference). 24 -> 2."""
    tb = Testbed("sdm-max")
    g = tb.spread_walk(LA, K4, K4)
    # a second data page in the same EPT page table as the first
    tb.ept.map(g["data"] + 0x1000, tb.gpa_to_hpa(g["data"]) + 0x1000)
    tb.guest.map((LA & ~0xFFF) + 0x1000, g["data"] + 0x1000)
    tb.proc.translate(LA, READ)
    tb.proc.reset_events()
    assert isinstance(tb.proc.translate(LA + 0x1000, READ), int)
    ev = tb.proc.reset_events()
    assert refs(ev) == 2
    assert ev["psc.combined.pde.hit"] == 1 and ev["psc.guest_physical.pde.hit"] == 1
    assert ev["walk.ref.guest.pte"] == 1 and ev["walk.ref.ept.pte"] == 1


def test_warm_pdpte_caches_only():
    """Same, but the second page sits under another guest PDE and another EPT PDE: the
    combined PDPTE cache skips the guest PML4E and PDPTE (and their EPT walks); the guest PDE
    is read (1); the new page table GPA (another EPT PDPTE region... here the same EPT PDPT as
    the first page table, so the guest-physical PDPTE cache hits: EPT PDE + PTE = 2) and the
    guest PTE (1); the data GPA in the data region's EPT PDPT (PDPTE-cache hit: 2). Total
    1 + 2 + 1 + 2 = 6."""
    tb = Testbed("sdm-max")
    g = tb.spread_walk(LA, K4, K4)
    la2 = (LA & ~0xFFF) + M2
    pt2 = g["pt"] + M2  # another EPT PDE under the same EPT PDPTE as the first PT
    data2 = g["data"] + M2
    tb.map_gpa(pt2)
    tb.map_gpa(data2)
    queue = [pt2]
    tb.guest.alloc_table = lambda: queue.pop(0)
    tb.guest.map(la2, data2)
    tb.proc.translate(LA, READ)
    tb.proc.reset_events()
    assert isinstance(tb.proc.translate(la2, READ), int)
    ev = tb.proc.reset_events()
    assert ev["psc.combined.pde.miss"] == 1 and ev["psc.combined.pdpte.hit"] == 1
    assert refs(ev) == 6


# ------------------------------------------------------------------------------------------
# the seed's properties (the 2015 review, objections 4 and 5)
# ------------------------------------------------------------------------------------------


def test_misconfigured_final_ept_entry_caches_no_translation_but_upper_levels_stay():
    """SDM 28.3.2: no guest-physical or combined mapping from a misconfigured EPT entry;
    28.2.3.1: bits 2:0 = 110b (KVM's MMIO SPTE) misconfigure; an EPT misconfiguration
    invalidates nothing (28.3.3.1 lists no such invalidation), so the upper-level
    paging-structure-cache entries created by the walk remain."""
    tb = simple("sdm-max")
    mmio_gpa = 0x40000
    tb.ept.set_entry(mmio_gpa, 1, L.EPT_W | L.EPT_X)  # 110b: misconfigured
    p = tb.proc
    r = p.translate(LA, WRITE)
    assert isinstance(r, Fault) and r.kind == "ept_misconfig" and r.gpa == mmio_gpa | 0x123
    assert r.qualification == 0
    assert not p.has_translation(LA) and not p.has_gpa_translation(mmio_gpa)
    assert p.has_psc("combined", "pde", LA)
    assert p.has_psc("guest_physical", "pde", mmio_gpa)
    p.reset_events()
    r2 = p.translate(LA, WRITE)
    assert r2 == r
    ev = p.reset_events()
    # combined PDE hit -> guest PTE read (1); EPT PDE-cache hit -> the EPT PTE again (1)
    assert refs(ev) == 2 and ev["tlb.combined.miss"] == 1


def test_read_only_final_ept_entry_caches_reads_then_write_violation_invalidates():
    """SDM 28.3.2: a present read-only EPT entry yields a cached translation; 28.3.3.4: a
    write using it causes an EPT violation (no re-walk: zero references), and 28.3.3.1:
    that violation invalidates the guest-physical and combined mappings used."""
    tb = simple("sdm-max")
    tb.ept.map(0x40000, tb.gpa_to_hpa(0x40000), r=True, w=False, x=False)
    p = tb.proc
    assert isinstance(p.translate(LA, READ), int)
    assert p.has_translation(LA) and p.has_gpa_translation(0x40000)
    p.reset_events()
    assert isinstance(p.translate(LA, READ), int)
    assert refs(p.reset_events()) == 0
    v = p.translate(LA, WRITE)
    assert isinstance(v, Fault) and v.kind == "ept_violation"
    ev = p.reset_events()
    assert refs(ev) == 0 and ev["inv.ept_violation"] == 1
    assert v.qualification == (L.QUAL_WRITE | L.QUAL_READABLE | L.QUAL_GLA_VALID
                               | L.QUAL_TRANSLATED)
    assert v.gpa == 0x40123 and v.linear == LA
    assert not p.has_translation(LA) and not p.has_gpa_translation(0x40000)
    assert not p.has_psc("combined", "pde", LA)
    assert not p.has_psc("guest_physical", "pde", 0x40000)


def test_not_present_ept_entry_never_cached():
    """SDM 28.3.2: nothing cached from a not-present EPT entry (the 2015 review, objection
    4: the RFC's doorbell page stays not-present and every access walks)."""
    tb = simple("sdm-max")
    tb.ept.unmap(0x40000)
    p = tb.proc
    for _ in range(2):
        v = p.translate(LA, WRITE)
        assert isinstance(v, Fault) and v.kind == "ept_violation"
        assert not p.has_translation(LA) and not p.has_gpa_translation(0x40000)


# ------------------------------------------------------------------------------------------
# EPT-violation exit qualification, SDM 27.2.1 Table 27-7
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("access,bit", [(READ, L.QUAL_READ), (WRITE, L.QUAL_WRITE),
                                        (FETCH, L.QUAL_FETCH)])
def test_qualification_access_bits_0_to_2(access, bit):
    """Table 27-7 bits 0-2: data read, data write, instruction fetch."""
    tb = simple("none")
    tb.ept.unmap(0x40000)
    v = tb.proc.translate(LA, access)
    assert v.kind == "ept_violation"
    assert v.qualification & 7 == bit


@pytest.mark.parametrize("perms", [(1, 0, 0), (1, 1, 0), (1, 0, 1), (0, 0, 1)])
def test_qualification_bits_3_to_5_are_and_of_entries(perms):
    """Table 27-7 bits 3-5: the AND of bits 0/1/2 over the EPT entries used. The leaf grants
    RWX; the EPT PDE above grants only ``perms`` (execute-only allowed: capability on)."""
    r, w, x = perms
    tb = simple("none", execute_only=True)
    pde_addr = tb.ept.entry_address(0x40000, 2)
    old = tb.memory.read_u64(pde_addr)
    tb.memory.write_u64(pde_addr, (old & ~7) | r | w << 1 | x << 2)
    access = WRITE if not w else (FETCH if not x else READ)
    v = tb.proc.translate(LA, access)
    assert v.kind == "ept_violation"
    assert (v.qualification >> 3) & 7 == r | w << 1 | x << 2


def test_qualification_bits_3_to_5_zero_when_not_present():
    """Table 27-7 note 2: bits 5:3 are 0 if any EPT entry used was not present."""
    tb = simple("none")
    tb.ept.unmap(0x40000)
    v = tb.proc.translate(LA, READ)
    assert (v.qualification >> 3) & 7 == 0


def test_qualification_bit8_clear_for_paging_structure_access():
    """Table 27-7 bit 8: clear when the access was to a guest paging-structure entry; the
    GPA field is the entry's address (27.2.1); bit 7 set: the GLA is valid."""
    tb = Testbed("none")
    g = tb.spread_walk(LA, K4, K4)
    tb.ept.unmap(g["pt"])
    v = tb.proc.translate(LA, WRITE)
    assert v.kind == "ept_violation"
    assert v.gpa == g["pt"] + ((LA >> 12) & 511) * 8
    assert v.qualification == L.QUAL_READ | L.QUAL_GLA_VALID  # a data read, not translated
    info = tb.proc.exit_info(v)
    assert info.guest_linear_address == LA and info.guest_physical_address == v.gpa


def test_qualification_bit7_clear_for_gpa_access_not_from_linear():
    """Table 27-7 bit 7 clear (and bit 8 reserved 0) for an access that did not come from a
    linear address; the exit then has no GLA."""
    tb = simple("none")
    tb.ept.unmap(0x40000)
    v = tb.proc.translate_gpa(0x40010, READ)
    assert v.kind == "ept_violation" and v.qualification == L.QUAL_READ
    assert tb.proc.exit_info(v).guest_linear_address is None


def test_accessed_flag_write_needs_ept_write_permission():
    """SDM 28.2.3.2: writes to guest paging structures to set accessed/dirty flags are data
    writes; with the guest PT's page EPT read-only and A clear in the PTE, the walk takes an
    EPT violation with bit 1 set and bit 8 clear."""
    tb = Testbed("none")
    g = tb.spread_walk(LA, K4, K4)
    tb.ept.map(g["pt"], tb.gpa_to_hpa(g["pt"]), r=True, w=False, x=False)
    v = tb.proc.translate(LA, READ)
    assert v.kind == "ept_violation"
    assert v.qualification == L.QUAL_WRITE | L.QUAL_READABLE | L.QUAL_GLA_VALID
    # with A already set, the read-only page table is fine (4.8: nothing to write)
    pte = tb.guest.entry_address(LA, 1)
    tb.write_gpa_u64(pte, tb.read_gpa_u64(pte) | L.PTE_A)
    assert isinstance(tb.proc.translate(LA, READ), int)


def test_ept_ad_paging_structure_accesses_are_writes():
    """SDM 28.2.3.2 and Table 27-7 note 1: with EPTP bit 6 set, guest paging-structure
    accesses are writes for EPT; a violation on one sets qualification bits 0 and 1."""
    tb = Testbed("none", ept_ad=True)
    g = tb.spread_walk(LA, K4, K4)
    pte = tb.guest.entry_address(LA, 1)
    tb.write_gpa_u64(pte, tb.read_gpa_u64(pte) | L.PTE_A)
    tb.ept.map(g["pt"], tb.gpa_to_hpa(g["pt"]), r=True, w=False, x=False)
    v = tb.proc.translate(LA, READ)
    assert v.kind == "ept_violation"
    assert v.qualification & 3 == 3 and not v.qualification & L.QUAL_TRANSLATED


def test_ept_ad_flags_set_by_walk():
    """SDM 28.2.4: with EPT A/D enabled the processor sets the accessed flag of each EPT entry
    used and the dirty flag of the leaf on a write."""
    tb = simple("none", ept_ad=True)
    tb.proc.translate(LA, WRITE)
    leaf = tb.ept.get_entry(0x40000, 1)
    assert leaf & L.EPT_A and leaf & L.EPT_D
    assert tb.ept.get_entry(0x40000, 4) & L.EPT_A


# ------------------------------------------------------------------------------------------
# EPT misconfigurations, SDM 28.2.3.1
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rwx", [0b010, 0b110])
def test_misconfig_write_without_read(rwx):
    """28.2.3.1: bits 2:0 = 010b or 110b misconfigure, at any level."""
    for level in (4, 3, 2, 1):
        tb = Testbed("none")
        g = tb.spread_walk(LA, K4, K4)  # the data page alone in its EPT PML4E region
        ea = tb.ept.entry_address(g["data"], level)
        tb.memory.write_u64(ea, (tb.memory.read_u64(ea) & ~7) | rwx)
        f = tb.proc.translate(LA, READ)
        assert f.kind == "ept_misconfig" and f.gpa == g["data"] | 0x123, level
        assert tb.proc.exit_info(f).reason == 49


def test_misconfig_execute_only_without_capability():
    """28.2.3.1: 100b misconfigures unless execute-only translations are supported; with
    support, a read of an execute-only page is an EPT violation (28.2.3.2)."""
    tb = simple("none", execute_only=False)
    tb.ept.map(0x40000, tb.gpa_to_hpa(0x40000), r=False, w=False, x=True)
    assert tb.proc.translate(LA, READ).kind == "ept_misconfig"
    tb = simple("none", execute_only=True)
    tb.ept.map(0x40000, tb.gpa_to_hpa(0x40000), r=False, w=False, x=True)
    assert tb.proc.translate(LA, READ).kind == "ept_violation"
    assert isinstance(tb.proc.translate(LA, FETCH), int)


@pytest.mark.parametrize("level,bit", [(4, 3), (4, 7), (3, 6), (2, 3), (2, 6), (4, 47),
                                       (1, 46), (1, 51)])
def test_misconfig_reserved_bits(level, bit):
    """28.2.2 / 28.2.3.1: reserved bits (7:3 in a PML4E, 7:3 in a directory-referencing
    PDPTE, 6:3 in a table-referencing PDE) and address bits at or above MAXPHYADDR (46 here)
    misconfigure."""
    tb = Testbed("none", maxphyaddr=46)
    g = tb.spread_walk(LA, K4, K4)
    ea = tb.ept.entry_address(g["data"], level)
    tb.memory.write_u64(ea, tb.memory.read_u64(ea) | (1 << bit))
    f = tb.proc.translate(LA, READ)
    assert f.kind == "ept_misconfig", (level, bit)


def test_misconfig_reserved_bits_of_large_leaves():
    """28.2.2 Tables 28-2 and 28-4: bits 29:12 of a 1 GiB EPT PDPTE and 20:12 of a 2 MiB
    EPT PDE are reserved."""
    for page, bit in ((M2, 12), (M2, 20), (G1, 12), (G1, 29)):
        tb = Testbed("none")
        la = (LA & ~(page - 1))
        g = tb.spread_walk(la, K4, page)
        lvl = 2 if page == M2 else 3
        ea = tb.ept.entry_address(g["data"], lvl)
        tb.memory.write_u64(ea, tb.memory.read_u64(ea) | (1 << bit))
        assert tb.proc.translate(la, READ).kind == "ept_misconfig", (page, bit)


def test_misconfig_1g_ept_page_without_support():
    """28.2.2 note: bit 7 of an EPT PDPTE may be 1 only if 1 GiB pages are supported;
    otherwise it is a reserved bit."""
    tb = Testbed("none", ept_1g=False)
    g = tb.spread_walk(LA & ~(G1 - 1), K4, G1)
    assert tb.proc.translate(LA & ~(G1 - 1), READ).kind == "ept_misconfig"
    assert g


@pytest.mark.parametrize("memtype", [2, 3, 7])
def test_misconfig_leaf_memory_type(memtype):
    """28.2.3.1: the last EPT entry with memory type 2, 3 or 7 misconfigures."""
    tb = simple("none")
    tb.ept.map(0x40000, tb.gpa_to_hpa(0x40000), memtype=memtype)
    assert tb.proc.translate(LA, READ).kind == "ept_misconfig"


@pytest.mark.parametrize("memtype", [0, 1, 4, 5, 6])
def test_valid_leaf_memory_types(memtype):
    """28.2.6: UC, WC, WT, WP, WB are valid leaf memory types."""
    tb = simple("none")
    tb.ept.map(0x40000, tb.gpa_to_hpa(0x40000), memtype=memtype)
    assert isinstance(tb.proc.translate(LA, READ), int)


def test_fault_priority_not_present_beats_upper_permission():
    """28.2.3.3: a not-present entry ends the walk with an EPT violation at once; privileges
    are evaluated only at the leaf, so an upper entry without write permission and a lower
    not-present entry give a violation with bits 5:3 = 0."""
    tb = Testbed("none")
    g = tb.spread_walk(LA, K4, K4)
    ea = tb.ept.entry_address(g["data"], 4)
    tb.memory.write_u64(ea, tb.memory.read_u64(ea) & ~L.EPT_W)
    tb.ept.unmap(g["data"])
    v = tb.proc.translate(LA, WRITE)
    assert v.kind == "ept_violation" and (v.qualification >> 3) & 7 == 0


def test_fault_priority_misconfig_beats_upper_permission():
    """28.2.3.3: a misconfiguration below an entry lacking the permission still wins."""
    tb = Testbed("none")
    g = tb.spread_walk(LA, K4, K4)
    ea = tb.ept.entry_address(g["data"], 4)
    tb.memory.write_u64(ea, tb.memory.read_u64(ea) & ~L.EPT_W)
    tb.ept.set_entry(g["data"], 1, L.EPT_W | L.EPT_X)
    assert tb.proc.translate(LA, WRITE).kind == "ept_misconfig"


# ------------------------------------------------------------------------------------------
# guest paging: page faults (SDM 4.6, 4.7) and their priority against EPT (28.2.3.3)
# ------------------------------------------------------------------------------------------


def test_page_fault_not_present_error_code():
    """SDM 4.7: P = 0 for a not-present page; W/R and U/S report the access."""
    tb = simple("none")
    f = tb.proc.translate(LA + 0x1000, WRITE, cpl=3)
    assert f.kind == "page_fault" and f.error_code == L.PFERR_W | L.PFERR_U


def test_page_fault_reserved_bit():
    """SDM 4.7: RSVD = 1 (and P = 1) when a reserved bit is set (bit 51 > MAXPHYADDR)."""
    tb = simple("none")
    pte = tb.guest.entry_address(LA, 1)
    tb.write_gpa_u64(pte, tb.read_gpa_u64(pte) | (1 << 51))
    f = tb.proc.translate(LA, READ)
    assert f.kind == "page_fault" and f.error_code == L.PFERR_P | L.PFERR_RSVD


def test_page_fault_protection_cases():
    """SDM 4.6: a user access to a supervisor page, a write to a read-only page (CR0.WP for
    supervisor writes), a fetch from an XD page (NXE), SMEP."""
    tb = simple("none")
    tb.map_guest(LA & ~0xFFF, 0x40000, w=False, us=False, xd=True)
    p = tb.proc
    assert p.translate(LA, READ, cpl=3).error_code == L.PFERR_P | L.PFERR_U
    assert p.translate(LA, WRITE, cpl=0).error_code == L.PFERR_P | L.PFERR_W
    assert p.translate(LA, FETCH, cpl=0).error_code == L.PFERR_P | L.PFERR_ID
    p.load_guest_state(cr0=p.cr0 & ~(1 << 16))  # CR0.WP = 0
    assert isinstance(p.translate(LA, WRITE, cpl=0), int)
    tb.map_guest(LA & ~0xFFF, 0x40000, us=True)
    p.load_guest_state(cr4=p.cr4 | (1 << 20))  # SMEP
    assert p.translate(LA, FETCH, cpl=0).error_code == L.PFERR_P | L.PFERR_ID


def test_guest_page_fault_before_final_ept_check():
    """28.2.3.3 step 2: the guest privileges are evaluated before the final GPA is accessed,
    so a write to a guest read-only page backed by a not-present EPT entry is a #PF."""
    tb = simple("none")
    tb.map_guest(LA & ~0xFFF, 0x40000, w=False)
    tb.ept.unmap(0x40000)
    assert tb.proc.translate(LA, WRITE).kind == "page_fault"


def test_ept_violation_on_guest_table_before_guest_page_fault():
    """28.2.3.3 step 1a: the EPT translation of a guest entry's GPA happens before the entry
    is consulted: an unmapped guest page table gives an EPT violation even though the PTE
    inside it would have been not present."""
    tb = Testbed("none")
    g = tb.spread_walk(LA, K4, K4)
    tb.ept.unmap(g["pt"])
    assert tb.proc.translate(LA + 0x1000, READ).kind == "ept_violation"


def test_accessed_and_dirty_flags_written():
    """SDM 4.8: A set in every entry used; D in the leaf on a write."""
    tb = simple("none")
    tb.proc.translate(LA, READ)
    pte = tb.guest.get_entry(LA, 1)
    assert pte & L.PTE_A and not pte & L.PTE_D
    assert tb.guest.get_entry(LA, 4) & L.PTE_A
    tb.proc.translate(LA, WRITE)
    assert tb.guest.get_entry(LA, 1) & L.PTE_D


def test_write_through_clean_cached_translation_walks_to_set_dirty():
    """SDM 4.8 / 4.10.2.2: the TLB holds the dirty flag; a write through an entry cached
    with D = 0 must set D in memory, so the processor walks again."""
    tb = simple("sdm-max")
    p = tb.proc
    p.translate(LA, READ)
    p.reset_events()
    assert isinstance(p.translate(LA, WRITE), int)
    ev = p.reset_events()
    assert ev["tlb.combined.dirty_assist"] == 1 and refs(ev) > 0
    assert tb.guest.get_entry(LA, 1) & L.PTE_D
    assert isinstance(p.translate(LA, WRITE), int)
    assert refs(p.reset_events()) == 0


def test_non_canonical_address_is_gp():
    """SDM 4.5: a non-canonical linear address is not translated (#GP)."""
    tb = simple("none")
    assert tb.proc.translate(0x0000_8000_0000_0000, READ).kind == "gp"


def test_paging_off_linear_is_guest_physical():
    """SDM 28.2.1: with CR0.PG = 0 each linear address is a GPA translated by EPT only."""
    tb = simple("sdm-max")
    p = tb.proc
    p.load_guest_state(cr0=0x11, cr4=0, efer=0)
    assert p.translate(0x40123, READ) == tb.gpa_to_hpa(0x40123)
    ev = p.reset_events()
    assert ev["walk.ref.guest.pte"] == 0 and refs(ev) > 0
    assert p.has_translation(0x40123)


def test_ept_disabled_uses_linear_mappings():
    """SDM 28.3.2: without EPT, guest addresses are physical and linear mappings are made."""
    tb = Testbed("sdm-max", ept=False)
    tb.map_guest(LA & ~0xFFF, 0x40000)
    p = tb.proc
    p.load_guest_state(cr3=tb.gpa_to_hpa(tb.guest.root))
    # the guest tables were written at their RAM HPAs; without EPT the walker reads HPAs,
    # so point every table entry at HPAs by rebuilding on host memory directly
    from fastmmio.sim.vmx.tables import PageTableBuilder
    b = PageTableBuilder("guest", tb.alloc.alloc_page(), tb.memory.read_u64,
                         tb.memory.write_u64, tb.alloc.alloc_page)
    b.map(LA & ~0xFFF, 0x5000_0000)
    p.load_guest_state(cr3=b.root)
    assert p.translate(LA, READ) == 0x5000_0123
    ev = p.reset_events()
    assert ev["tlb.linear.miss"] == 1 and ev["walk.ref.guest.pte"] == 1
    assert sum(v for k, v in ev.items() if k.startswith("walk.ref.ept")) == 0
    p.translate(LA, READ)
    assert p.reset_events()["tlb.linear.hit"] == 1


def test_ref_log_records_structure_level_address_and_server():
    """Every reference is recorded: structure, level, host-physical address, which cache."""
    tb = Testbed("sdm-max")
    tb.spread_walk(LA, K4, K4)
    tb.proc.ref_log = []
    tb.proc.translate(LA, READ)
    log = tb.proc.ref_log
    assert len(log) == 24
    assert [e[0] for e in log[:5]] == ["ept"] * 4 + ["guest"]
    assert [e[1] for e in log[:5]] == ["pml4e", "pdpte", "pde", "pte", "pml4e"]
    assert all(e[3] in ("l1", "l2", "llc", "mem") for e in log)
    ev = tb.proc.events
    assert sum(v for k, v in ev.items() if k.startswith("walk.served.")) == 24
