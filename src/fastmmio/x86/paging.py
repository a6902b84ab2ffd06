"""IA-32e (4-level) paging formats: guest paging entries, the page-fault error code, levels
and page sizes, reserved bits (data, shared by the guest builder and the processor models).

Sources (Intel SDM Vol. 3, order no. 325384-059, 2016): IA-32e paging entries 4.5 (Tables
4-14 to 4-20); page-fault error code 4.7 (Figure 4-12). These are the architecture's, not
VMX's: an SVM model's nested walk reads the same guest entries.

Levels are numbered as in the SDM's walk: 4 = PML4E, 3 = PDPTE, 2 = PDE, 1 = PTE.
"""

from __future__ import annotations

from fastmmio.x86.bits import BitLayout, Field, LayoutError, bit_range
from fastmmio.x86.bits import flag as _flag

# --------------------------------------------------------------------------------------------
# IA-32e guest paging entries (SDM 4.5, Tables 4-14 .. 4-19)
# --------------------------------------------------------------------------------------------

ADDR_4K = Field("addr", 51, 12, "physical address of the next structure / 4 KiB page "
                 "(bits above MAXPHYADDR-1 are reserved)", address=True)
_GUEST_COMMON = (
    _flag("p", 0, "present"),
    _flag("rw", 1, "read/write: 0 = writes not allowed"),
    _flag("us", 2, "user/supervisor: 0 = user-mode accesses not allowed"),
    _flag("pwt", 3, "page-level write-through"),
    _flag("pcd", 4, "page-level cache disable"),
    _flag("a", 5, "accessed"),
)
_XD = _flag("xd", 63, "execute-disable (reserved unless IA32_EFER.NXE = 1)")

GUEST_PML4E = BitLayout("guest PML4E", _GUEST_COMMON + (
    _flag("ps", 7, "reserved (must be 0) in a PML4E"), ADDR_4K, _XD),
    "IA-32e PML4 entry referencing a page-directory-pointer table (Table 4-15)")
GUEST_PDPTE_1G = BitLayout("guest PDPTE (1 GiB page)", _GUEST_COMMON + (
    _flag("d", 6, "dirty"), _flag("ps", 7, "page size: 1 = maps a 1 GiB page"),
    _flag("g", 8, "global (CR4.PGE = 1)"), _flag("pat", 12, "PAT index bit"),
    Field("addr", 51, 30, "physical address of the 1 GiB page", address=True),
    Field("pkey", 62, 59, "protection key (CR4.PKE = 1)"), _XD),
    "IA-32e PDPTE that maps a 1 GiB page (Table 4-16); bits 29:13 reserved")
GUEST_PDPTE = BitLayout("guest PDPTE", _GUEST_COMMON + (
    _flag("ps", 7, "page size: 0 = references a page directory"), ADDR_4K, _XD),
    "IA-32e PDPTE that references a page directory (Table 4-17)")
GUEST_PDE_2M = BitLayout("guest PDE (2 MiB page)", _GUEST_COMMON + (
    _flag("d", 6, "dirty"), _flag("ps", 7, "page size: 1 = maps a 2 MiB page"),
    _flag("g", 8, "global (CR4.PGE = 1)"), _flag("pat", 12, "PAT index bit"),
    Field("addr", 51, 21, "physical address of the 2 MiB page", address=True),
    Field("pkey", 62, 59, "protection key (CR4.PKE = 1)"), _XD),
    "IA-32e PDE that maps a 2 MiB page (Table 4-18); bits 20:13 reserved")
GUEST_PDE = BitLayout("guest PDE", _GUEST_COMMON + (
    _flag("ps", 7, "page size: 0 = references a page table"), ADDR_4K, _XD),
    "IA-32e PDE that references a page table (Table 4-19)")
GUEST_PTE = BitLayout("guest PTE", _GUEST_COMMON + (
    _flag("d", 6, "dirty"), _flag("pat", 7, "PAT index bit"),
    _flag("g", 8, "global (CR4.PGE = 1)"), ADDR_4K,
    Field("pkey", 62, 59, "protection key (CR4.PKE = 1)"), _XD),
    "IA-32e PTE that maps a 4 KiB page (Table 4-20)")

# Hot-path bit constants for guest entries.
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
PTE_G = 1 << 8
PTE_XD = 1 << 63

# --------------------------------------------------------------------------------------------
# Page-fault error code (SDM 4.7, Figure 4-12)
# --------------------------------------------------------------------------------------------

PF_ERROR_CODE = BitLayout("#PF error code", (
    _flag("p", 0, "0 = non-present page; 1 = protection violation"),
    _flag("w", 1, "the access was a write"),
    _flag("u", 2, "user-mode access (CPL = 3)"),
    _flag("rsvd", 3, "a reserved bit was set in some paging-structure entry"),
    _flag("id", 4, "the access was an instruction fetch"),
    _flag("pk", 5, "protection-key violation"),
    _flag("sgx", 15, "SGX-specific access-control violation"),
), "Page-fault error code (Figure 4-12)", width=32)

PFERR_P = 1 << 0
PFERR_W = 1 << 1
PFERR_U = 1 << 2
PFERR_RSVD = 1 << 3
PFERR_ID = 1 << 4
PFERR_PK = 1 << 5

# --------------------------------------------------------------------------------------------
# Levels, page sizes, reserved bits
# --------------------------------------------------------------------------------------------

LEVEL_NAMES = {4: "pml4e", 3: "pdpte", 2: "pde", 1: "pte"}  # = fastmmio.sim.events names
LEVEL_SHIFT = {4: 39, 3: 30, 2: 21, 1: 12}  # bits of the address that index each level
PAGE_SHIFT_AT = {3: 30, 2: 21, 1: 12}  # page size mapped by a leaf at each level
PAGE_SIZE_4K = 1 << 12
PAGE_SIZE_2M = 1 << 21
PAGE_SIZE_1G = 1 << 30


def phys_addr_mask(maxphyaddr: int, page_shift: int = 12) -> int:
    """Mask of address bits ``maxphyaddr-1 : page_shift``."""
    check_maxphyaddr(maxphyaddr)
    return ((1 << maxphyaddr) - 1) & ~((1 << page_shift) - 1)



def check_maxphyaddr(maxphyaddr: int) -> None:
    if not 32 <= maxphyaddr <= 52:
        raise LayoutError(f"MAXPHYADDR must be between 32 and 52, got {maxphyaddr}")


def guest_layout(level: int, ps: bool) -> BitLayout:
    """The IA-32e layout of a guest entry at ``level`` (4..1) with PS = ``ps``."""
    if level == 4:
        return GUEST_PML4E
    if level == 3:
        return GUEST_PDPTE_1G if ps else GUEST_PDPTE
    if level == 2:
        return GUEST_PDE_2M if ps else GUEST_PDE
    if level == 1:
        return GUEST_PTE
    raise LayoutError(f"guest paging level must be 1..4, got {level}")


def guest_reserved_mask(level: int, ps: bool, maxphyaddr: int, nxe: bool = True,
                        gbpages: bool = True) -> int:
    """Bits that must be 0 in a present IA-32e guest entry (SDM 4.5 Tables 4-14..4-20).

    Bits 51:MAXPHYADDR at every level; XD (63) unless IA32_EFER.NXE = 1; PS in a PML4E;
    29:13 in a 1 GiB PDPTE; 20:13 in a 2 MiB PDE; PS in a PDPTE if 1 GiB pages are not
    supported (CPUID.80000001H:EDX.Page1GB = 0).
    """
    check_maxphyaddr(maxphyaddr)
    m = bit_range(51, maxphyaddr) if maxphyaddr < 52 else 0
    if not nxe:
        m |= PTE_XD
    if level == 4:
        m |= PTE_PS
    elif level == 3 and ps:
        m |= PTE_PS if not gbpages else bit_range(29, 13)
    elif level == 2 and ps:
        m |= bit_range(20, 13)
    elif level not in (1, 2, 3):
        raise LayoutError(f"guest paging level must be 1..4, got {level}")
    return m


def make_guest_entry(gpa: int, rw: bool = True, us: bool = True, ps: bool = False,
                     g: bool = False, xd: bool = False, p: bool = True) -> int:
    """A guest IA-32e paging entry pointing at ``gpa`` (A and D start clear)."""
    return ((PTE_P if p else 0) | (PTE_RW if rw else 0) | (PTE_US if us else 0)
            | (PTE_PS if ps else 0) | (PTE_G if g else 0) | (PTE_XD if xd else 0) | gpa)

