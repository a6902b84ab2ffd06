"""VMX entry formats as declared bit layouts (data, not code): EPT entries, EPTP, the
EPT-violation exit qualification, EPT memory types.

The x86 formats they stand beside (guest paging entries, the page-fault error code, levels,
page sizes; :class:`BitLayout` itself) are :mod:`fastmmio.x86`'s and re-exported here for
the VMX modules that read both.

Sources (Intel SDM Vol. 3, order no. 325384-059, 2016):

* EPT paging-structure entries: 28.2.2 (Tables 28-1 to 28-6); EPTP: 24.6.11 (Table 24-8).
  Bit 10 "user-mode execute" (mode-based execute control) is from later editions; in the
  2016 text it is ignored. Reserved bits: 28.2.2 and 28.2.3.1.
* EPT-violation exit qualification: 27.2.1 (Table 27-7).

Levels are numbered as in the SDM's walk: 4 = PML4E, 3 = PDPTE, 2 = PDE, 1 = PTE.
"""

from __future__ import annotations

# the x86 formats, re-exported for the VMX modules (declared once, in fastmmio.x86)
from fastmmio.x86.bits import BitLayout, Field, LayoutError, bit_range  # noqa: F401
from fastmmio.x86.bits import flag as _flag
from fastmmio.x86.paging import (  # noqa: F401
    GUEST_PDE,
    GUEST_PDE_2M,
    GUEST_PDPTE,
    GUEST_PDPTE_1G,
    GUEST_PML4E,
    GUEST_PTE,
    ADDR_4K,
    LEVEL_NAMES,
    LEVEL_SHIFT,
    PAGE_SHIFT_AT,
    PAGE_SIZE_1G,
    PAGE_SIZE_2M,
    PAGE_SIZE_4K,
    PF_ERROR_CODE,
    PFERR_ID,
    PFERR_P,
    PFERR_PK,
    PFERR_RSVD,
    PFERR_U,
    PFERR_W,
    PTE_A,
    PTE_D,
    PTE_G,
    PTE_P,
    PTE_PCD,
    PTE_PS,
    PTE_PWT,
    PTE_RW,
    PTE_US,
    PTE_XD,
    check_maxphyaddr,
    guest_layout,
    guest_reserved_mask,
    make_guest_entry,
    phys_addr_mask,
)

# --------------------------------------------------------------------------------------------
# EPT memory types (SDM 28.2.6 and Table 24-8)
# --------------------------------------------------------------------------------------------

MT_UC = 0
MT_WC = 1
MT_WT = 4
MT_WP = 5
MT_WB = 6
MEMTYPE_NAMES = {0: "UC", 1: "WC", 2: "reserved(2)", 4: "WT", 5: "WP", 6: "WB",
                 3: "reserved(3)", 7: "reserved(7)"}
EPT_RESERVED_MEMTYPES = frozenset({2, 3, 7})  # SDM 28.2.3.1: leaf memory type 2, 3 or 7

# --------------------------------------------------------------------------------------------
# EPT paging-structure entries (SDM 28.2.2, Tables 28-1 .. 28-6)
# --------------------------------------------------------------------------------------------

_EPT_RWX = (
    _flag("r", 0, "read access"),
    _flag("w", 1, "write access"),
    _flag("x", 2, "execute access (supervisor-mode execute with mode-based control)"),
)
_EPT_A = _flag("a", 8, "accessed (if EPTP bit 6 = 1; ignored otherwise)")
_EPT_LEAF = _EPT_RWX + (
    Field("memtype", 5, 3, "EPT memory type (28.2.6); 2, 3, 7 misconfigure",
          names=MEMTYPE_NAMES),
    _flag("ipat", 6, "ignore PAT memory type"),
    _flag("large", 7, "1 = maps a page (PDPTE/PDE); ignored in a PTE"),
    _EPT_A,
    _flag("d", 9, "dirty (if EPTP bit 6 = 1; ignored otherwise)"),
    _flag("ux", 10, "user-mode execute (mode-based execute control; later SDM editions, "
                    "ignored in the 2016 text)"),
    _flag("sve", 63, "suppress #VE"),
)

EPT_PML4E = BitLayout("EPT PML4E", _EPT_RWX + (
    Field("rsvd7_3", 7, 3, "reserved (must be 0)"), _EPT_A, ADDR_4K),
    "EPT PML4E referencing an EPT page-directory-pointer table (Table 28-1)")
EPT_PDPTE_1G = BitLayout("EPT PDPTE (1 GiB page)", _EPT_LEAF + (
    Field("addr", 51, 30, "physical address of the 1 GiB page", address=True),),
    "EPT PDPTE that maps a 1 GiB page (Table 28-2); bits 29:12 reserved")
EPT_PDPTE = BitLayout("EPT PDPTE", _EPT_RWX + (
    Field("rsvd7_3", 7, 3, "reserved (must be 0); bit 7 = 1 would make it a 1 GiB page"),
    _EPT_A, ADDR_4K),
    "EPT PDPTE referencing an EPT page directory (Table 28-3)")
EPT_PDE_2M = BitLayout("EPT PDE (2 MiB page)", _EPT_LEAF + (
    Field("addr", 51, 21, "physical address of the 2 MiB page", address=True),),
    "EPT PDE that maps a 2 MiB page (Table 28-4); bits 20:12 reserved")
EPT_PDE = BitLayout("EPT PDE", _EPT_RWX + (
    Field("rsvd6_3", 6, 3, "reserved (must be 0)"),
    _flag("large", 7, "must be 0 (otherwise this PDE maps a 2 MiB page)"),
    _EPT_A, ADDR_4K),
    "EPT PDE referencing an EPT page table (Table 28-5)")
EPT_PTE = BitLayout("EPT PTE (4 KiB page)", _EPT_LEAF[:5] + _EPT_LEAF[6:] + (
    ADDR_4K, _flag("ign7", 7, "ignored")),
    "EPT PTE that maps a 4 KiB page (Table 28-6)")

# Hot-path bit constants for EPT entries.
EPT_R = 1 << 0
EPT_W = 1 << 1
EPT_X = 1 << 2
EPT_RWX = EPT_R | EPT_W | EPT_X
EPT_MEMTYPE_SHIFT = 3
EPT_MEMTYPE_MASK = 7 << 3
EPT_IPAT = 1 << 6
EPT_LARGE = 1 << 7
EPT_A = 1 << 8
EPT_D = 1 << 9
EPT_UX = 1 << 10
EPT_SVE = 1 << 63

# --------------------------------------------------------------------------------------------
# EPTP (SDM 24.6.11, Table 24-8)
# --------------------------------------------------------------------------------------------

EPTP = BitLayout("EPTP", (
    Field("memtype", 2, 0, "memory type for EPT paging-structure accesses: 0 UC, 6 WB",
          names=MEMTYPE_NAMES),
    Field("walk_length_minus_1", 5, 3, "EPT page-walk length minus 1 (3 = 4 levels)"),
    _flag("ad", 6, "enable accessed and dirty flags for EPT"),
    Field("rsvd11_7", 11, 7, "reserved"),
    ADDR_4K,
), "Extended-page-table pointer")


def make_eptp(pml4_hpa: int, memtype: int = MT_WB, walk_length: int = 4,
              ad: bool = False) -> int:
    """Build an EPTP for an EPT PML4 table at ``pml4_hpa`` (SDM Table 24-8)."""
    return EPTP.build(memtype=memtype, walk_length_minus_1=walk_length - 1, ad=ad,
                      addr=pml4_hpa)


def eptp_ep4ta(eptp: int) -> int:
    """The EP4TA (EPT PML4 table address, bits 51:12 of the EPTP) that tags cached mappings
    (SDM 28.3.1)."""
    return eptp & ADDR_4K.mask


# --------------------------------------------------------------------------------------------
# EPT-violation exit qualification (SDM 27.2.1, Table 27-7)
# --------------------------------------------------------------------------------------------

EPT_VIOLATION_QUAL = BitLayout("EPT-violation qualification", (
    _flag("read", 0, "the access was a data read (also set, with bit 1, for a guest "
                     "paging-structure access when EPT A/D flags are enabled)"),
    _flag("write", 1, "the access was a data write (A/D-flag updates included)"),
    _flag("fetch", 2, "the access was an instruction fetch"),
    _flag("readable", 3, "AND of bit 0 of the EPT entries used (0 if one was not present)"),
    _flag("writable", 4, "AND of bit 1 of the EPT entries used (0 if one was not present)"),
    _flag("executable", 5, "AND of bit 2 of the EPT entries used (0 if one was not present)"),
    _flag("user_executable", 6, "reserved in the 2016 text (later: AND of bit 10)"),
    _flag("gla_valid", 7, "the guest linear-address field is valid"),
    _flag("translated", 8, "if bit 7: 1 = access to the translation of the linear address, "
                           "0 = access to a paging-structure entry (walk or A/D update)"),
    _flag("nmi_unblocking", 12, "NMI unblocking due to IRET"),
), "Exit qualification for EPT violations (Table 27-7)")

QUAL_READ = 1 << 0
QUAL_WRITE = 1 << 1
QUAL_FETCH = 1 << 2
QUAL_READABLE = 1 << 3
QUAL_WRITABLE = 1 << 4
QUAL_EXECUTABLE = 1 << 5
QUAL_GLA_VALID = 1 << 7
QUAL_TRANSLATED = 1 << 8
QUAL_NMI_UNBLOCKING = 1 << 12

def ept_layout(level: int, large: bool) -> BitLayout:
    """The layout of an EPT entry at ``level`` (4..1) with bit 7 = ``large``."""
    if level == 4:
        return EPT_PML4E
    if level == 3:
        return EPT_PDPTE_1G if large else EPT_PDPTE
    if level == 2:
        return EPT_PDE_2M if large else EPT_PDE
    if level == 1:
        return EPT_PTE
    raise LayoutError(f"EPT level must be 1..4, got {level}")


def ept_reserved_mask(level: int, large: bool, maxphyaddr: int, gbpages: bool = True) -> int:
    """Bits whose setting makes a present EPT entry misconfigured (SDM 28.2.2, 28.2.3.1).

    Bits 51:N (N = MAXPHYADDR) everywhere; 7:3 in a PML4E and in a PDPTE that references a
    directory; 6:3 in a PDE that references a table; 29:12 in a 1 GiB PDPTE; 20:12 in a
    2 MiB PDE; bit 7 of a PDPTE if the processor does not support 1 GiB EPT pages. The
    memory-type and bits-2:0 conditions are checked separately (they are values, not bits).
    """
    check_maxphyaddr(maxphyaddr)
    m = bit_range(51, maxphyaddr) if maxphyaddr < 52 else 0
    if level == 4:
        m |= bit_range(7, 3)
    elif level == 3:
        if large:
            m |= EPT_LARGE if not gbpages else bit_range(29, 12)
        else:
            m |= bit_range(7, 3)
    elif level == 2:
        m |= bit_range(20, 12) if large else bit_range(6, 3)
    elif level != 1:
        raise LayoutError(f"EPT level must be 1..4, got {level}")
    return m


def ept_bits20_misconfigured(rwx: int, execute_only: bool) -> bool:
    """SDM 28.2.3.1: bits 2:0 = 010b or 110b always misconfigure; 100b does unless the
    processor supports execute-only translations (IA32_VMX_EPT_VPID_CAP bit 0)."""
    rwx &= 7
    if rwx in (0b010, 0b110):
        return True
    return rwx == 0b100 and not execute_only


def make_ept_entry(hpa: int, r: bool = True, w: bool = True, x: bool = True,
                   memtype: int = MT_WB, ipat: bool = False, large: bool = False,
                   leaf: bool = False) -> int:
    """An EPT entry pointing at ``hpa``. Non-leaf entries (``leaf=False``) carry only R/W/X and
    the address; a leaf carries the memory type and ignore-PAT too; ``large`` sets bit 7
    (a 1 GiB PDPTE or 2 MiB PDE). Validity of the combination is *not* checked: the walker
    does that, so tests can build misconfigured entries on purpose."""
    v = (EPT_R if r else 0) | (EPT_W if w else 0) | (EPT_X if x else 0) | hpa
    if leaf or large:
        v |= (memtype & 7) << EPT_MEMTYPE_SHIFT | (EPT_IPAT if ipat else 0)
    if large:
        v |= EPT_LARGE
    return v
