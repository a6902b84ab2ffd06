"""Entry formats as declared bit layouts (data, not code).

In the spirit of amaranth ``lib/data``: a :class:`BitLayout` is a named list of :class:`Field`
declarations over a 64-bit integer, with ``get``/``set``/``build``/``decode``/``describe``.
The models keep entries as plain ``int`` (that is what host memory holds); the layouts are
for building entries, reading them in tests and reports, and for deriving the masks the
walker's hot path uses (exported below as module-level constants).

Sources (Intel SDM Vol. 3, order no. 325384-059, 2016):

* IA-32e guest paging entries: 4.5 (Tables 4-14 to 4-19); page-fault error code 4.7
  (Figure 4-12).
* EPT paging-structure entries: 28.2.2 (Tables 28-1 to 28-6); EPTP: 24.6.11 (Table 24-8).
  Bit 10 "user-mode execute" (mode-based execute control) is from later editions; in the
  2016 text it is ignored. Reserved bits: 28.2.2 and 28.2.3.1.
* EPT-violation exit qualification: 27.2.1 (Table 27-7).

Levels are numbered as in the SDM's walk: 4 = PML4E, 3 = PDPTE, 2 = PDE, 1 = PTE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from fastmmio.sim.vmx.errors import LayoutError

# --------------------------------------------------------------------------------------------
# Declared layouts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One field of a :class:`BitLayout`: bits ``msb:lsb`` inclusive.

    ``address=True`` marks a physical-address field: :meth:`get` returns the bits *in place*
    (``value & mask``, a ready-to-use address) and :meth:`set` takes an in-place address.
    Other fields are shifted down to bit 0. ``names`` optionally names field values
    (memory types).
    """

    name: str
    msb: int
    lsb: int
    doc: str = ""
    address: bool = False
    names: Mapping[int, str] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.msb - self.lsb + 1

    @property
    def mask(self) -> int:
        """The field's bits, in place."""
        return ((1 << self.width) - 1) << self.lsb

    def get(self, value: int) -> int:
        if self.address:
            return value & self.mask
        return (value >> self.lsb) & ((1 << self.width) - 1)

    def set(self, value: int, x: int) -> int:
        """Return ``value`` with this field replaced by ``x`` (bool accepted for 1-bit fields)."""
        x = int(x)
        if self.address:
            if x & ~self.mask:
                raise LayoutError(
                    f"field {self.name}: address {x:#x} has bits outside {self.msb}:{self.lsb}"
                )
            return (value & ~self.mask) | x
        if x < 0 or x >> self.width:
            raise LayoutError(f"field {self.name}: value {x} does not fit in {self.width} bits")
        return (value & ~self.mask) | (x << self.lsb)


class BitLayout:
    """A 64-bit entry format declared as a list of fields.

    >>> hex(EPT_PTE.build(r=1, w=1, memtype=6, addr=0x5000))
    '0x5033'
    >>> EPT_PTE.describe(0x5033)
    'EPT PTE (4 KiB page): r w memtype=WB addr=0x5000'
    """

    def __init__(self, name: str, fields: Iterable[Field], doc: str = "", width: int = 64):
        self.name = name
        self.doc = doc
        self.width = width
        self.fields: dict[str, Field] = {}
        used = 0
        for f in fields:
            if f.name in self.fields:
                raise LayoutError(f"{name}: duplicate field {f.name}")
            if f.mask & used:
                raise LayoutError(f"{name}: field {f.name} overlaps another field")
            if f.msb >= width or f.lsb < 0 or f.msb < f.lsb:
                raise LayoutError(f"{name}: field {f.name} bits {f.msb}:{f.lsb} out of range")
            used |= f.mask
            self.fields[f.name] = f
        self.declared_mask = used

    def __getitem__(self, name: str) -> Field:
        try:
            return self.fields[name]
        except KeyError:
            raise LayoutError(
                f"{self.name} has no field {name!r} (fields: {', '.join(self.fields)})"
            ) from None

    def __repr__(self) -> str:
        return f"BitLayout({self.name!r}, {len(self.fields)} fields)"

    def mask(self, name: str) -> int:
        return self[name].mask

    def get(self, value: int, name: str) -> int:
        return self[name].get(value)

    def set(self, value: int, name: str, x: int) -> int:
        return self[name].set(value, x)

    def build(self, **values: int) -> int:
        """Build an entry from field values (unnamed fields are 0)."""
        v = 0
        for name, x in values.items():
            v = self[name].set(v, x)
        return v

    def decode(self, value: int) -> dict[str, int]:
        """Every declared field's value, by name."""
        return {name: f.get(value) for name, f in self.fields.items()}

    def describe(self, value: int, reserved_mask: int = 0) -> str:
        """One human line: set flags by name, multi-bit fields as name=value.

        If ``reserved_mask`` is given and ``value`` sets any of those bits, they are named.
        """
        parts: list[str] = []
        for name, f in self.fields.items():
            x = f.get(value)
            if f.width == 1:
                if x:
                    parts.append(name)
            elif f.address:
                parts.append(f"{name}={x:#x}")
            elif x or f.names:
                parts.append(f"{name}={f.names.get(x, x)}" if f.names else f"{name}={x}")
        bad = value & reserved_mask
        if bad:
            parts.append(f"RESERVED={bad:#x}")
        return f"{self.name}: " + " ".join(parts) if parts else f"{self.name}: (zero)"


def _flag(name: str, bit: int, doc: str) -> Field:
    return Field(name, bit, bit, doc)


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
# IA-32e guest paging entries (SDM 4.5, Tables 4-14 .. 4-19)
# --------------------------------------------------------------------------------------------

_ADDR_4K = Field("addr", 51, 12, "physical address of the next structure / 4 KiB page "
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
    _flag("ps", 7, "reserved (must be 0) in a PML4E"), _ADDR_4K, _XD),
    "IA-32e PML4 entry referencing a page-directory-pointer table (Table 4-15)")
GUEST_PDPTE_1G = BitLayout("guest PDPTE (1 GiB page)", _GUEST_COMMON + (
    _flag("d", 6, "dirty"), _flag("ps", 7, "page size: 1 = maps a 1 GiB page"),
    _flag("g", 8, "global (CR4.PGE = 1)"), _flag("pat", 12, "PAT index bit"),
    Field("addr", 51, 30, "physical address of the 1 GiB page", address=True),
    Field("pkey", 62, 59, "protection key (CR4.PKE = 1)"), _XD),
    "IA-32e PDPTE that maps a 1 GiB page (Table 4-16); bits 29:13 reserved")
GUEST_PDPTE = BitLayout("guest PDPTE", _GUEST_COMMON + (
    _flag("ps", 7, "page size: 0 = references a page directory"), _ADDR_4K, _XD),
    "IA-32e PDPTE that references a page directory (Table 4-17)")
GUEST_PDE_2M = BitLayout("guest PDE (2 MiB page)", _GUEST_COMMON + (
    _flag("d", 6, "dirty"), _flag("ps", 7, "page size: 1 = maps a 2 MiB page"),
    _flag("g", 8, "global (CR4.PGE = 1)"), _flag("pat", 12, "PAT index bit"),
    Field("addr", 51, 21, "physical address of the 2 MiB page", address=True),
    Field("pkey", 62, 59, "protection key (CR4.PKE = 1)"), _XD),
    "IA-32e PDE that maps a 2 MiB page (Table 4-18); bits 20:13 reserved")
GUEST_PDE = BitLayout("guest PDE", _GUEST_COMMON + (
    _flag("ps", 7, "page size: 0 = references a page table"), _ADDR_4K, _XD),
    "IA-32e PDE that references a page table (Table 4-19)")
GUEST_PTE = BitLayout("guest PTE", _GUEST_COMMON + (
    _flag("d", 6, "dirty"), _flag("pat", 7, "PAT index bit"),
    _flag("g", 8, "global (CR4.PGE = 1)"), _ADDR_4K,
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
    Field("rsvd7_3", 7, 3, "reserved (must be 0)"), _EPT_A, _ADDR_4K),
    "EPT PML4E referencing an EPT page-directory-pointer table (Table 28-1)")
EPT_PDPTE_1G = BitLayout("EPT PDPTE (1 GiB page)", _EPT_LEAF + (
    Field("addr", 51, 30, "physical address of the 1 GiB page", address=True),),
    "EPT PDPTE that maps a 1 GiB page (Table 28-2); bits 29:12 reserved")
EPT_PDPTE = BitLayout("EPT PDPTE", _EPT_RWX + (
    Field("rsvd7_3", 7, 3, "reserved (must be 0); bit 7 = 1 would make it a 1 GiB page"),
    _EPT_A, _ADDR_4K),
    "EPT PDPTE referencing an EPT page directory (Table 28-3)")
EPT_PDE_2M = BitLayout("EPT PDE (2 MiB page)", _EPT_LEAF + (
    Field("addr", 51, 21, "physical address of the 2 MiB page", address=True),),
    "EPT PDE that maps a 2 MiB page (Table 28-4); bits 20:12 reserved")
EPT_PDE = BitLayout("EPT PDE", _EPT_RWX + (
    Field("rsvd6_3", 6, 3, "reserved (must be 0)"),
    _flag("large", 7, "must be 0 (otherwise this PDE maps a 2 MiB page)"),
    _EPT_A, _ADDR_4K),
    "EPT PDE referencing an EPT page table (Table 28-5)")
EPT_PTE = BitLayout("EPT PTE (4 KiB page)", _EPT_LEAF[:5] + _EPT_LEAF[6:] + (
    _ADDR_4K, _flag("ign7", 7, "ignored")),
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
    _ADDR_4K,
), "Extended-page-table pointer")


def make_eptp(pml4_hpa: int, memtype: int = MT_WB, walk_length: int = 4,
              ad: bool = False) -> int:
    """Build an EPTP for an EPT PML4 table at ``pml4_hpa`` (SDM Table 24-8)."""
    return EPTP.build(memtype=memtype, walk_length_minus_1=walk_length - 1, ad=ad,
                      addr=pml4_hpa)


def eptp_ep4ta(eptp: int) -> int:
    """The EP4TA (EPT PML4 table address, bits 51:12 of the EPTP) that tags cached mappings
    (SDM 28.3.1)."""
    return eptp & _ADDR_4K.mask


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
    _check_maxphyaddr(maxphyaddr)
    return ((1 << maxphyaddr) - 1) & ~((1 << page_shift) - 1)


def _check_maxphyaddr(maxphyaddr: int) -> None:
    if not 32 <= maxphyaddr <= 52:
        raise LayoutError(f"MAXPHYADDR must be between 32 and 52, got {maxphyaddr}")


def _bits(msb: int, lsb: int) -> int:
    return ((1 << (msb - lsb + 1)) - 1) << lsb


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


def guest_reserved_mask(level: int, ps: bool, maxphyaddr: int, nxe: bool = True,
                        gbpages: bool = True) -> int:
    """Bits that must be 0 in a present IA-32e guest entry (SDM 4.5 Tables 4-14..4-20).

    Bits 51:MAXPHYADDR at every level; XD (63) unless IA32_EFER.NXE = 1; PS in a PML4E;
    29:13 in a 1 GiB PDPTE; 20:13 in a 2 MiB PDE; PS in a PDPTE if 1 GiB pages are not
    supported (CPUID.80000001H:EDX.Page1GB = 0).
    """
    _check_maxphyaddr(maxphyaddr)
    m = _bits(51, maxphyaddr) if maxphyaddr < 52 else 0
    if not nxe:
        m |= PTE_XD
    if level == 4:
        m |= PTE_PS
    elif level == 3 and ps:
        m |= PTE_PS if not gbpages else _bits(29, 13)
    elif level == 2 and ps:
        m |= _bits(20, 13)
    elif level not in (1, 2, 3):
        raise LayoutError(f"guest paging level must be 1..4, got {level}")
    return m


def ept_reserved_mask(level: int, large: bool, maxphyaddr: int, gbpages: bool = True) -> int:
    """Bits whose setting makes a present EPT entry misconfigured (SDM 28.2.2, 28.2.3.1).

    Bits 51:N (N = MAXPHYADDR) everywhere; 7:3 in a PML4E and in a PDPTE that references a
    directory; 6:3 in a PDE that references a table; 29:12 in a 1 GiB PDPTE; 20:12 in a
    2 MiB PDE; bit 7 of a PDPTE if the processor does not support 1 GiB EPT pages. The
    memory-type and bits-2:0 conditions are checked separately (they are values, not bits).
    """
    _check_maxphyaddr(maxphyaddr)
    m = _bits(51, maxphyaddr) if maxphyaddr < 52 else 0
    if level == 4:
        m |= _bits(7, 3)
    elif level == 3:
        if large:
            m |= EPT_LARGE if not gbpages else _bits(29, 12)
        else:
            m |= _bits(7, 3)
    elif level == 2:
        m |= _bits(20, 12) if large else _bits(6, 3)
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


def make_guest_entry(gpa: int, rw: bool = True, us: bool = True, ps: bool = False,
                     g: bool = False, xd: bool = False, p: bool = True) -> int:
    """A guest IA-32e paging entry pointing at ``gpa`` (A and D start clear)."""
    return ((PTE_P if p else 0) | (PTE_RW if rw else 0) | (PTE_US if us else 0)
            | (PTE_PS if ps else 0) | (PTE_G if g else 0) | (PTE_XD if xd else 0) | gpa)
