"""Property: with paging structures that change only together with the invalidation the SDM
asks for, every answer a caching processor gives equals the answer of a processor that caches
nothing (SDM 4.10 and 28.3: caching may change *when* memory is read, never the result
software is promised). Random guest and EPT layouts (present/absent, permissions, large pages,
reserved bits, misconfigurations), random access sequences, every cache configuration."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from walk_mutations import DATA_GPAS, PAGES, apply_mutations

from fastmmio.sim.vmx import layouts as L
from fastmmio.sim.vmx.caches import CONFIGS, CacheSpec, TlbStructure
from fastmmio.sim.vmx.errors import HostMemoryError, LayoutError
from fastmmio.sim.vmx.processor import (
    INVEPT_SINGLE,
    INVVPID_ADDRESS,
    INVVPID_SINGLE,
    Fault,
    Processor,
)
from fastmmio.sim.vmx.testbed import Testbed

K4 = 1 << 12

TINY = replace(
    CONFIGS["skylake-sp"], name="tiny",
    combined_tlb=(TlbStructure((12, 21), CacheSpec(4, 2)), TlbStructure((30,), CacheSpec(1))),
    guest_physical_tlb=(TlbStructure((12, 21, 30), CacheSpec(2, 1, "fifo")),),
    combined_psc={"pde": CacheSpec(2, 1), "pdpte": CacheSpec(1), "pml4e": None},
    guest_physical_psc={"pde": CacheSpec(1), "pdpte": None, "pml4e": CacheSpec(2, 2,
                                                                                "random")},
)
ALL_CONFIGS = [CONFIGS["sdm-max"], CONFIGS["skylake-sp"], CONFIGS["golden-cove"], TINY]

EPT_BITS = [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 63, 47]
EPT_PERMS = [7, 7, 7, 1, 1, 3, 5, 4, 0, 6]  # RWX (often), R, RW, RX, X, none, 110b


@st.composite
def layouts(draw):
    mostly = st.sampled_from([True, True, True, False])
    rarely = st.sampled_from([False, False, False, True])
    maps = draw(st.lists(st.tuples(st.integers(0, len(PAGES) - 1),
                                   st.integers(0, len(DATA_GPAS) - 1),
                                   mostly, mostly, rarely, rarely), min_size=4, max_size=24))
    ept_perms = draw(st.lists(st.sampled_from(EPT_PERMS), min_size=len(DATA_GPAS),
                              max_size=len(DATA_GPAS)))
    mutations = draw(st.lists(st.tuples(st.sampled_from(["guest", "ept"]),
                                        st.integers(0, len(PAGES) - 1),
                                        st.integers(1, 4), st.integers(0, 11)),
                              max_size=3))
    # permissions of the EPT PDE above the second data region (0x300000): non-leaf
    # permissions AND into the leaf's (Table 27-7 bits 3-5)
    pde_perm = draw(st.sampled_from([7, 7, 1, 3, 5, 4]))
    modes = draw(st.fixed_dictionaries({
        "nxe": st.booleans(), "wp": st.booleans(), "smep": st.booleans(),
        "pge": st.booleans(), "ept_ad": st.booleans(), "set_ad": st.booleans(),
        "execute_only": st.booleans(), "vpid_enabled": st.booleans()}))
    return maps, ept_perms, mutations, modes, pde_perm


@st.composite
def an_op(draw):
    """Mostly accesses (so that caches matter); now and then an invalidating operation or
    a paging-structure change followed by the invalidation the SDM asks for."""
    w = draw(st.integers(0, 99))
    if w < 75:
        return ("access", draw(st.integers(0, 23)), draw(st.sampled_from([0, 0, 1, 1, 2])),
                draw(st.sampled_from([0, 3])))
    if w < 79:
        return ("invlpg", draw(st.integers(0, len(PAGES) - 1)))
    if w < 83:
        return ("vmexit",)
    if w < 87:
        return ("mov_cr3",)
    if w < 90:
        return ("invvpid_addr", draw(st.integers(0, len(PAGES) - 1)))
    if w < 95:
        return ("ept_change", draw(st.integers(0, len(DATA_GPAS) - 1)),
                draw(st.sampled_from(EPT_PERMS)))
    return ("guest_change", draw(st.integers(0, len(PAGES) - 1)), draw(st.booleans()))


OPS = an_op()


def build(config, layout) -> Testbed:
    maps, ept_perms, mutations, modes, pde_perm = layout
    tb = Testbed(config, ept_ad=modes["ept_ad"], execute_only=modes["execute_only"],
                 vpid_enabled=modes["vpid_enabled"], set_ad_bits=modes["set_ad"])
    p = tb.proc
    cr0 = p.cr0 if modes["wp"] else p.cr0 & ~(1 << 16)
    cr4 = p.cr4 | (1 << 7 if modes["pge"] else 0) | (1 << 20 if modes["smep"] else 0)
    efer = p.efer if modes["nxe"] else p.efer & ~(1 << 11)
    p.load_guest_state(cr0=cr0, cr4=cr4, efer=efer)
    for page, data, w, us, xd, g in maps:
        tb.map_guest(PAGES[page], DATA_GPAS[data], w=w, us=us, xd=xd and modes["nxe"], g=g)
    # EPT: guest tables (top of RAM) read/write/execute; data pages with drawn permissions
    tb.map_ept_ram(tb.ram_size - 0x40000, 0x40000)
    for i, gpa in enumerate(DATA_GPAS):
        perm = ept_perms[i % len(ept_perms)]
        if perm:
            tb.ept.set_entry(gpa, 1, L.make_ept_entry(tb.ram_hpa + gpa, perm & 1, perm & 2,
                                                      perm & 4, leaf=True))
    ea = tb.ept.entry_address(0x300000, 2)
    if ea is not None and tb.memory.read_u64(ea) & 7:
        tb.memory.write_u64(ea, (tb.memory.read_u64(ea) & ~7) | pde_perm)
    apply_mutations(tb, mutations, EPT_BITS, 7)
    return tb


def step(tb: Testbed, op, layout) -> object:
    p = tb.proc
    kind = op[0]
    if kind == "access":  # one of the mapped pages (mapped at first, at least)
        maps = layout[0]
        return p.translate(PAGES[maps[op[1] % len(maps)][0]] | 0x18, op[2], op[3])
    if kind == "invlpg":
        p.invlpg(PAGES[op[1]])
    elif kind == "vmexit":
        p.vmexit(30)
        p.vmentry()
    elif kind == "mov_cr3":
        p.mov_cr3(p.cr3)
        # MOV to CR3 keeps global translations (4.10.4.1): only correct while no global
        # mapping changed, which the ops here guarantee
    elif kind == "invvpid_addr":
        if p.vpid_enabled:
            p.invvpid(INVVPID_ADDRESS, p.vpid, PAGES[op[1]])
    elif kind == "ept_change":
        # modify a data page's EPT leaf, then INVEPT single-context as 28.3.3.4 asks
        gpa, perm = DATA_GPAS[op[1]], op[2]
        value = (L.make_ept_entry(tb.ram_hpa + gpa, perm & 1, perm & 2, perm & 4, leaf=True)
                 if perm else 0)
        try:
            tb.ept.set_entry(gpa, 1, value)
        except (HostMemoryError, LayoutError):
            pass  # a mutated upper entry points nowhere or maps a large page: skip the edit
        p.invept(INVEPT_SINGLE, p.eptp)
    elif kind == "guest_change":
        # toggle R/W of a guest leaf, then invalidate all of the VPID (globals included:
        # INVVPID single-context, 28.3.3.3) -- or, without VPID, a VM exit/entry pair
        try:
            ea = tb.guest.entry_address(PAGES[op[1]], 1)
        except (HostMemoryError, LayoutError):
            ea = None  # a mutated upper entry points outside RAM or maps a large page
        if ea is not None and 0 <= ea < tb.ram_size:
            tb.write_gpa_u64(ea, tb.read_gpa_u64(ea) ^ L.PTE_RW)
        if p.vpid_enabled:
            p.invvpid(INVVPID_SINGLE, p.vpid)
        else:
            p.vmexit(30)
    return None


def outcome(r):
    if isinstance(r, Fault):
        return ("fault", r.kind, r.linear, r.gpa, r.error_code, r.qualification)
    return r


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda c: c.name)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts(), ops=st.lists(OPS, min_size=20, max_size=80))
def test_cached_answers_equal_uncached_walks(config, layout, ops):
    """SDM 4.10 / 28.3: caches are transparent while software invalidates as required."""
    cached = build(config, layout)
    plain = build("none", layout)
    for i, op in enumerate(ops):
        a = step(cached, op, layout)
        b = step(plain, op, layout)
        assert outcome(a) == outcome(b), (i, op)
        if op[0] == "access":
            # guest A/D flags evolve identically in both memories (the guest tables live
            # in the top 256 KiB of guest RAM)
            first = (cached.ram_hpa + cached.ram_size - 0x40000) >> 12
            for pfn in range(first, first + 0x40):
                assert cached.memory.pages.get(pfn) == plain.memory.pages.get(pfn)


@settings(max_examples=30, deadline=None)
@given(layout=layouts(), ops=st.lists(OPS, min_size=10, max_size=40))
def test_no_cached_entry_from_not_present_or_misconfigured_ept(layout, ops):
    """SDM 28.3.2: after any sequence, no cached guest-physical translation covers a GPA whose
    EPT walk (from memory) ends not present or misconfigured."""
    tb = build(CONFIGS["sdm-max"], layout)
    for op in ops:
        step(tb, op, layout)
    p = tb.proc
    for gpa in DATA_GPAS:
        if p.has_gpa_translation(gpa):
            # an uncached processor walks the same memory
            q = Processor(tb.memory, "none", execute_only=p.execute_only)
            q.set_eptp(p.eptp)
            r = q.translate_gpa(gpa)
            assert not (isinstance(r, Fault) and r.kind == "ept_misconfig"), hex(gpa)
            assert not (isinstance(r, Fault) and r.qualification & 0x38 == 0), hex(gpa)
