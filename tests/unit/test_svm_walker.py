"""The SVM processor's two-dimensional walk through nested page tables: reference counts,
nested A/D updates, #NPF error codes (fastmmio.sim.svm.processor). Section numbers are the
AMD64 APM vol. 2 chapter 15."""

from __future__ import annotations

import pytest

from fastmmio.errors import UsageError
from fastmmio.sim.svm import layouts as S
from fastmmio.sim.svm.errors import SvmError
from fastmmio.sim.svm.processor import FETCH, READ, WRITE, Fault
from fastmmio.sim.svm.testbed import SvmTestbed
from fastmmio.x86 import paging as L

LA = 0x7F12_3456_7123
K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30


def refs(ev) -> int:
    return sum(v for k, v in ev.items() if k.startswith("walk.ref."))


def simple(config="apm-max", **kw) -> SvmTestbed:
    """Guest RAM nested-mapped with 4 KiB leaves around the guest page tables and one data
    page; LA -> GPA 0x40000 with a 4 KiB guest page."""
    tb = SvmTestbed(config, **kw)
    tb.map_ept_ram(tb.ram_size - 0x10000, 0x10000)
    tb.map_ept_ram(0x40000, 0x2000)
    tb.map_guest(LA & ~0xFFF, 0x40000)
    return tb


def nested_leaf(tb: SvmTestbed, gpa: int) -> int:
    ea = tb.npt.entry_address(gpa, 1)
    assert ea is not None
    return ea


# ------------------------------------------------------------------------------------------
# reference counts (15.25.5)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["none", "apm-max", "zen4"])
def test_cold_walk_4level_guest_4level_nested_is_24_references(config):
    """APM 15.25.5: every guest page-table entry is at a guest-physical address translated
    through the nested tables before it is read, then the final guest-physical address is
    translated: (4 + 1)(4 + 1) - 1 = 24. Each structure sits in its own nested PML4E region
    so that no cache can share within the walk."""
    tb = SvmTestbed(config)
    tb.spread_walk(LA, K4, K4)
    r = tb.proc.translate(LA, READ)
    assert isinstance(r, int)
    ev = tb.proc.reset_events()
    assert refs(ev) == 24 == (4 + 1) * (4 + 1) - 1
    for level in ("pml4e", "pdpte", "pde", "pte"):
        assert ev[f"walk.ref.nested.{level}"] == 5
        assert ev[f"walk.ref.guest.{level}"] == 1
    # every reference is priced by where it was served
    assert sum(v for k, v in ev.items() if k.startswith("walk.served.")) == 24


@pytest.mark.parametrize("config", ["apm-max", "zen4"])
def test_warm_translation_makes_zero_references(config):
    """APM 15.25.1: "The most-recently used translations from guest linear to system
    physical address are cached in the TLB and used on subsequent guest accesses"."""
    tb = SvmTestbed(config)
    tb.spread_walk(LA, K4, K4)
    tb.proc.translate(LA, READ)
    tb.proc.reset_events()
    assert isinstance(tb.proc.translate(LA, READ), int)
    ev = tb.proc.reset_events()
    assert refs(ev) == 0 and ev["tlb.combined.hit"] == 1


def test_config_none_always_walks_24():
    """Configuration ``none`` caches nothing: every access makes the 24 references."""
    tb = SvmTestbed("none")
    tb.spread_walk(LA, K4, K4)
    for _ in range(3):
        assert isinstance(tb.proc.translate(LA, READ), int)
        assert refs(tb.proc.reset_events()) == 24


def test_invlpga_keeps_nested_translations():
    """APM 15.16.2: INVLPGA invalidates the TLB mapping of a guest virtual page (here, like
    INVLPG, with the guest walk-cache entries that would translate it) and "does not
    provide a means to invalidate a nested translation": the next walk reads the 4 guest
    entries and finds all 5 nested translations cached (0 nested references)."""
    tb = SvmTestbed("apm-max")
    tb.spread_walk(LA, K4, K4)
    tb.proc.translate(LA, READ)
    tb.proc.invlpga(LA, tb.proc.asid)
    tb.proc.reset_events()
    assert isinstance(tb.proc.translate(LA, READ), int)
    ev = tb.proc.reset_events()
    assert refs(ev) == 4 and ev["tlb.nested.hit"] == 5


@pytest.mark.parametrize("assumption,expected", [("yes", 2), ("no", 5)])
def test_warm_walk_caches_second_page(assumption, expected):
    """A second page under the same guest page table and the same nested page table, after
    the first page's walk. apm-max: the guest walk cache gives the guest page table's
    system-physical address (guest PTE read: 1) and the nested walk cache the nested page
    table (nested PTE read: 1): 2. With the assumption ``nested_walk_cache=no`` (the APM
    names no nested walk cache, 15.25.1) the final GPA is walked in full: 1 + 4 = 5."""
    tb = SvmTestbed("apm-max", assumptions={"nested_walk_cache": assumption})
    g = tb.spread_walk(LA, K4, K4)
    tb.npt.map(g["data"] + 0x1000, tb.gpa_to_hpa(g["data"]) + 0x1000)
    tb.guest.map((LA & ~0xFFF) + 0x1000, g["data"] + 0x1000)
    tb.proc.translate(LA, READ)
    tb.proc.reset_events()
    assert isinstance(tb.proc.translate(LA + 0x1000, READ), int)
    ev = tb.proc.reset_events()
    assert refs(ev) == expected
    assert ev["psc.combined.pde.hit"] == 1 and ev["walk.ref.guest.pte"] == 1
    assert tb.proc.has_psc("nested", "pde", g["data"]) == (assumption == "yes")


@pytest.mark.parametrize("guest_page,nested_page,expected", [
    (M2, K4, 19), (K4, M2, 19), (M2, M2, 15), (G1, G1, 8), (G1, M2, 11)])
def test_large_pages_cold_reference_counts(guest_page, nested_page, expected):
    """(g guest levels)(n nested levels + 1) + n with large pages at either level
    (15.25.5, the nested tables in the host's long-mode format)."""
    tb = SvmTestbed("apm-max")
    la = (LA & ~(guest_page - 1)) | 0x123
    tb.spread_walk(la, guest_page, nested_page)
    assert isinstance(tb.proc.translate(la, READ), int)
    assert refs(tb.proc.reset_events()) == expected


# ------------------------------------------------------------------------------------------
# nested accesses: user writes for guest tables, A/D in the nested entries (15.25.5)
# ------------------------------------------------------------------------------------------


def test_guest_table_walks_set_nested_accessed_and_dirty():
    """APM 15.25.5: walks for guest page tables are user writes at the nested level: "the
    dirty and accessed bits are always set in the nested page table entries that were
    touched"; the walk for the data page is a read here: accessed, not dirty."""
    tb = simple()
    g = tb.guest
    pt_gpa = g.entry_address(LA, 1) & ~0xFFF
    assert isinstance(tb.proc.translate(LA, READ), int)
    table_leaf = tb.memory.read_u64(nested_leaf(tb, pt_gpa))
    assert table_leaf & L.PTE_A and table_leaf & L.PTE_D
    data_leaf = tb.memory.read_u64(nested_leaf(tb, 0x40000))
    assert data_leaf & L.PTE_A and not data_leaf & L.PTE_D
    assert isinstance(tb.proc.translate(LA, WRITE), int)
    assert tb.memory.read_u64(nested_leaf(tb, 0x40000)) & L.PTE_D


def test_read_only_nested_guest_table_faults_as_a_user_write_during_the_walk():
    """APM 15.25.5: the nested page holding a guest page table "must be writable by user at
    the nested page table level, or else a #VMEXIT(NPF) is raised"; 15.25.6: RW set
    ("host table walks for guest page tables are always treated as data writes"), US set,
    ID clear even for a code read, bit 33 (guest page-table walk), not bit 32."""
    tb = simple()
    pt_gpa = tb.guest.entry_address(LA, 1) & ~0xFFF
    ea = nested_leaf(tb, pt_gpa)
    tb.memory.write_u64(ea, tb.memory.read_u64(ea) & ~L.PTE_RW)
    f = tb.proc.translate(LA, FETCH)
    assert isinstance(f, Fault) and f.kind == "npf" and f.gpa == tb.guest.entry_address(LA, 1)
    d = S.NPF_EXITINFO1.decode(f.error_code)
    assert (d["p"], d["rw"], d["us"], d["rsv"], d["id"]) == (1, 1, 1, 0, 0)
    assert (d["guest_walk"], d["final_gpa"]) == (1, 0)


def test_supervisor_nested_page_refuses_every_guest_access():
    """APM 15.25.7: "The page must be marked user in the nested page table to allow any
    guest access at all"; the #NPF is a protection fault (P = 1) on the final GPA (bit
    32)."""
    tb = simple()
    ea = nested_leaf(tb, 0x40000)
    tb.memory.write_u64(ea, tb.memory.read_u64(ea) & ~L.PTE_US)
    f = tb.proc.translate(LA, READ, cpl=3)
    assert isinstance(f, Fault) and f.kind == "npf"
    assert f.error_code == S.NPF_P | S.NPF_US | S.NPF_FINAL_GPA
    assert f.gpa == 0x40000 | (LA & 0xFFF)


@pytest.mark.parametrize("level", [2, 3, 4])
def test_supervisor_upper_nested_entry_refuses_the_access(level):
    """APM 15.25.7 applies to every nested entry used, not only the leaf: a nested PDE,
    PDPTE or PML4E with U/S = 0 above the data page refuses the access (P = 1), once the
    hypervisor has flushed after decreasing the permission (15.16.1)."""
    tb = simple()
    tb.map_guest((LA & ~0xFFF) + 0x1000, 0x41000)
    assert isinstance(tb.proc.translate(LA + 0x1000, READ), int)  # fills the walk caches
    ea = tb.npt.entry_address(0x40000, level)
    tb.memory.write_u64(ea, tb.memory.read_u64(ea) & ~L.PTE_US)
    tb.proc.vmrun(S.TLB_CONTROL_FLUSH_ASID)  # 15.16.1: permissions were decreased
    f = tb.proc.translate(LA, READ)
    assert isinstance(f, Fault) and f.kind == "npf"
    assert f.error_code & S.NPF_P and f.error_code & S.NPF_US


# ------------------------------------------------------------------------------------------
# #NPF error codes (15.25.6)
# ------------------------------------------------------------------------------------------


def test_not_present_nested_page_on_the_final_gpa():
    """APM 15.25.6: P "cleared to 0 if the nested page was not present"; RW for a write;
    bit 32 (final guest physical address); EXITINFO2 the faulting GPA."""
    tb = simple()
    tb.memory.write_u64(nested_leaf(tb, 0x40000), 0)
    f = tb.proc.translate(LA, WRITE)
    assert isinstance(f, Fault) and f.kind == "npf" and f.is_vm_exit
    assert f.error_code == S.NPF_RW | S.NPF_US | S.NPF_FINAL_GPA
    assert f.gpa == 0x40000 | (LA & 0xFFF)
    ex = tb.proc.npf_exit(f, rip=0x1000, insn_len=3)
    assert ex.exitinfo1 == f.error_code and ex.exitinfo2 == f.gpa
    assert tb.proc.events["exit.NPF"] == 1


def test_not_present_nested_page_during_the_guest_walk():
    """APM 15.25.6: bit 33 "set to 1 if nested page fault occurred while translating the
    guest page tables", here the guest PML4 table's page; P = 0, RW = 1 (a walk is a
    write), the GPA is the guest PML4E's."""
    tb = simple()
    pml4 = tb.guest.root
    tb.memory.write_u64(nested_leaf(tb, pml4), 0)
    f = tb.proc.translate(LA, READ)
    assert isinstance(f, Fault) and f.kind == "npf"
    assert f.error_code == S.NPF_RW | S.NPF_US | S.NPF_GUEST_WALK
    assert f.gpa == tb.guest.entry_address(LA, 4)


@pytest.mark.parametrize("access,rw", [(READ, 0), (WRITE, S.NPF_RW)])
def test_reserved_bit_nested_entry_is_a_rsv_npf(access, rw):
    """APM 15.25.6: RSV "set to 1 if reserved bits were set in the corresponding nested page
    table entry", with P = 1 (present). The entry is KVM's MMIO SPTE on NPT: bit 51 plus
    present below a 52-bit MAXPHYADDR (layouts.npt_mmio_spte_mask). Nothing is cached:
    the next access faults the same way."""
    tb = simple()
    tb.memory.write_u64(nested_leaf(tb, 0x40000), S.npt_mmio_spte_mask(46))
    for _ in range(2):
        f = tb.proc.translate(LA, access)
        assert isinstance(f, Fault) and f.kind == "npf"
        assert f.error_code == S.NPF_P | S.NPF_RSV | S.NPF_US | rw | S.NPF_FINAL_GPA
        assert not tb.proc.has_nested_translation(0x40000)


def test_fetch_npf_sets_id():
    """APM 15.25.6: ID "set to 1 if the nested page table level access was a code read"."""
    tb = simple()
    tb.memory.write_u64(nested_leaf(tb, 0x40000), 0)
    f = tb.proc.translate(LA, FETCH)
    assert isinstance(f, Fault) and f.error_code == S.NPF_ID | S.NPF_US | S.NPF_FINAL_GPA


def test_nested_nx_needs_host_nxe():
    """APM 15.25.7: executable only if executable at both levels; with host EFER.NXE clear
    "all nested page table mappings are executable" -- bit 63 is then a reserved bit."""
    tb = simple()
    ea = nested_leaf(tb, 0x40000)
    tb.memory.write_u64(ea, tb.memory.read_u64(ea) | L.PTE_XD)
    f = tb.proc.translate(LA, FETCH)
    assert isinstance(f, Fault) and f.error_code == (S.NPF_P | S.NPF_ID | S.NPF_US
                                                     | S.NPF_FINAL_GPA)
    assert isinstance(tb.proc.translate(LA, READ), int)
    tb = simple(host_nxe=False)
    ea = nested_leaf(tb, 0x40000)
    tb.memory.write_u64(ea, tb.memory.read_u64(ea) | L.PTE_XD)
    f = tb.proc.translate(LA, READ)
    assert isinstance(f, Fault) and f.error_code & S.NPF_RSV


def test_read_only_nested_page_refuses_a_guest_write():
    """APM 15.25.7: "A page is considered writable by the guest only if it is marked
    writable at both the guest and nested page table levels"; the write that the cached
    read translation cannot serve is a #NPF from the cached rights (P = 1, RW = 1)."""
    tb = simple()
    ea = nested_leaf(tb, 0x40000)
    tb.memory.write_u64(ea, tb.memory.read_u64(ea) & ~L.PTE_RW)
    assert isinstance(tb.proc.translate(LA, READ), int)
    f = tb.proc.translate(LA, WRITE)
    assert isinstance(f, Fault) and f.structure == "tlb"
    assert f.error_code == S.NPF_P | S.NPF_RW | S.NPF_US | S.NPF_FINAL_GPA


def test_guest_fault_comes_before_the_final_nested_translation():
    """APM 15.25.6 order: guest permissions are checked before the final nested walk; a
    guest #PF is not a #VMEXIT."""
    tb = simple()
    tb.memory.write_u64(nested_leaf(tb, 0x40000), 0)
    tb.guest.map(LA & ~0xFFF, 0x40000, w=False)
    f = tb.proc.translate(LA, WRITE)
    assert isinstance(f, Fault) and f.kind == "page_fault" and not f.is_vm_exit


def test_paging_disabled_guest_translates_its_address_in_the_nested_tables():
    """APM 15.25.5: with gCR0.PG = 0 "the final guest-physical address is equal to the
    guest-linear address, and is still translated in the nested page tables"."""
    tb = simple("none")
    tb.proc.load_guest_state(cr0=0x11)
    assert tb.proc.translate(0x40010, READ) == tb.ram_hpa + 0x40010
    assert refs(tb.proc.reset_events()) == 4


def test_ncr3_mbz_bits_and_bad_asid_are_refused():
    tb = simple()
    with pytest.raises(SvmError):
        tb.proc.set_ncr3(1 << 50)
    with pytest.raises(SvmError):
        SvmTestbed("apm-max", asid=0)
    with pytest.raises(UsageError):
        SvmTestbed("no-such-config")
    with pytest.raises(SvmError):
        SvmTestbed("apm-max", assumptions={"nested_fault_caching": "maybe"})


def test_walk_events_are_priced_by_the_existing_profiles():
    """The nested walk reports the VMX walker's event families (walk.ref/served/ad, tlb.*,
    psc.*, inv.*), so a cost profile written for VMX prices an SVM walk without new keys:
    the walk component is the served references and the A/D writes at their unit prices."""
    from fastmmio.costs.model import CostModel

    tb = SvmTestbed("zen4")
    tb.spread_walk(LA, K4, K4)
    tb.proc.translate(LA, WRITE)
    tb.proc.vmrun(S.TLB_CONTROL_FLUSH_ASID)
    tb.proc.translate(LA, READ)
    ev = tb.proc.reset_events()
    ev.pop("vmentry")
    model = CostModel("skylake-sp")
    p = model.cost(ev)
    expected = sum(n * model.unit(k) for k, n in ev.items()
                   if k.startswith(("walk.served.", "walk.ad.")))
    assert expected > 0 and p.breakdown["walk"] == pytest.approx(expected)
