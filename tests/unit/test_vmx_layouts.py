"""Entry formats declared in fastmmio.sim.vmx.layouts against the SDM tables they cite."""

from __future__ import annotations

import pytest

from fastmmio.sim.vmx import layouts as L
from fastmmio.sim.vmx.errors import LayoutError


def test_ept_pte_fields_follow_table_28_6():
    """SDM 28.2.2 Table 28-6: R/W/X 2:0, memory type 5:3, ignore PAT 6, A 8, D 9,
    suppress #VE 63, address N-1:12."""
    v = L.EPT_PTE.build(r=1, w=1, x=0, memtype=L.MT_WB, ipat=1, a=1, d=1, sve=1,
                        addr=0x12345000)
    assert v == 0x8000_0000_1234_5000 | 0b011 | (6 << 3) | (1 << 6) | (1 << 8) | (1 << 9)
    d = L.EPT_PTE.decode(v)
    assert (d["r"], d["w"], d["x"], d["memtype"], d["addr"]) == (1, 1, 0, 6, 0x12345000)
    assert "memtype=WB" in L.EPT_PTE.describe(v)


def test_eptp_follows_table_24_8():
    """SDM 24.6.11 Table 24-8: memory type 2:0, walk length - 1 in 5:3, A/D enable 6."""
    v = L.make_eptp(0xABC000, memtype=L.MT_WB, walk_length=4, ad=True)
    assert v == 0xABC000 | 6 | (3 << 3) | (1 << 6)
    assert L.eptp_ep4ta(v) == 0xABC000


def test_ept_violation_qualification_bits_table_27_7():
    """SDM 27.2.1 Table 27-7: bits 0-5 access and permissions, 7 GLA valid, 8 translated,
    12 NMI unblocking."""
    q = L.EPT_VIOLATION_QUAL
    assert [q[n].lsb for n in ("read", "write", "fetch", "readable", "writable",
                               "executable", "gla_valid", "translated", "nmi_unblocking")] \
        == [0, 1, 2, 3, 4, 5, 7, 8, 12]
    assert L.QUAL_GLA_VALID == q.mask("gla_valid") and L.QUAL_TRANSLATED == q.mask("translated")


def test_pf_error_code_figure_4_12():
    """SDM 4.7 Figure 4-12: P 0, W/R 1, U/S 2, RSVD 3, I/D 4, PK 5."""
    assert L.PF_ERROR_CODE.build(p=1, w=1, u=1, rsvd=1, id=1, pk=1) == 0x3F


@pytest.mark.parametrize("maxphy", [36, 39, 46, 52])
def test_ept_reserved_bits_depend_on_maxphyaddr_and_level(maxphy):
    """SDM 28.2.2 Tables 28-1..28-6 and 28.2.3.1: bits 51:N reserved at every level;
    7:3 in a PML4E and directory-referencing PDPTE, 6:3 in a table-referencing PDE,
    29:12 in a 1 GiB PDPTE, 20:12 in a 2 MiB PDE."""
    hi = ((1 << 52) - 1) & ~((1 << maxphy) - 1)
    assert L.ept_reserved_mask(4, False, maxphy) == hi | 0xF8
    assert L.ept_reserved_mask(3, False, maxphy) == hi | 0xF8
    assert L.ept_reserved_mask(3, True, maxphy) == hi | (((1 << 18) - 1) << 12)
    assert L.ept_reserved_mask(2, True, maxphy) == hi | (((1 << 9) - 1) << 12)
    assert L.ept_reserved_mask(2, False, maxphy) == hi | 0x78
    assert L.ept_reserved_mask(1, False, maxphy) == hi
    assert L.ept_reserved_mask(3, True, maxphy, gbpages=False) & L.EPT_LARGE


def test_guest_reserved_bits_section_4_5():
    """SDM 4.5 Tables 4-14..4-20: 51:M everywhere; PS in PML4E; 29:13 in a 1 GiB PDPTE;
    20:13 in a 2 MiB PDE; XD when IA32_EFER.NXE = 0."""
    hi = ((1 << 52) - 1) & ~((1 << 40) - 1)
    assert L.guest_reserved_mask(4, False, 40) == hi | L.PTE_PS
    assert L.guest_reserved_mask(3, True, 40) == hi | (((1 << 17) - 1) << 13)
    assert L.guest_reserved_mask(2, True, 40) == hi | (((1 << 8) - 1) << 13)
    assert L.guest_reserved_mask(1, False, 40) == hi
    assert L.guest_reserved_mask(1, False, 40, nxe=False) == hi | L.PTE_XD


def test_misconfigured_rwx_values_28_2_3_1():
    """SDM 28.2.3.1: 010b and 110b misconfigure; 100b only without execute-only support."""
    bad = {v for v in range(8) if L.ept_bits20_misconfigured(v, execute_only=False)}
    assert bad == {0b010, 0b110, 0b100}
    bad = {v for v in range(8) if L.ept_bits20_misconfigured(v, execute_only=True)}
    assert bad == {0b010, 0b110}


def test_bad_field_values_raise_layout_error():
    with pytest.raises(LayoutError):
        L.EPT_PTE.build(memtype=8)
    with pytest.raises(LayoutError):
        L.EPT_PTE.build(nosuch=1)
    with pytest.raises(LayoutError):
        L.EPT_PDE_2M.build(addr=0x1000)  # not 2 MiB aligned: bits outside 51:21
    with pytest.raises(LayoutError):
        L.guest_reserved_mask(4, False, 60)


def test_describe_names_reserved_bits():
    assert "RESERVED=0x8" in L.EPT_PML4E.describe(0x8 | 7, L.ept_reserved_mask(4, False, 46))
