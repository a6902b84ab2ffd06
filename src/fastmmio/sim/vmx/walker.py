"""The two-dimensional walker with its translation caches.

:class:`Walker` holds the translation state of one logical processor (CR0/CR3/CR4/EFER, CPL,
EPTP, VPID) and its caches, and translates:

* :meth:`Walker.translate` a linear address (IA-32e 4-level guest paging, or CR0.PG = 0)
  through EPT (or without EPT), using and filling the combined TLB and paging-structure
  caches;
* :meth:`Walker.translate_gpa` a guest-physical address that did not come from a linear
  address (SDM 27.2.1: EPT-violation qualification bit 7 clear).

A successful translation returns the host-physical address (an ``int``); otherwise a
:class:`Fault`: a guest ``page_fault`` (with its error code), an ``ept_violation`` (its exit
qualification, GPA and GLA), an ``ept_misconfig`` (its GPA) or ``gp`` (a non-canonical
address). Faults are results, never exceptions.

Architectural rules implemented here, with their source (SDM Vol. 3, 2016, 325384-059):

* Walk order and fault priority: 28.2.3.3. Every guest paging-structure reference is a
  guest-physical access translated through EPT (28.2.1). EPT entries: not present (bits 2:0
  = 0) is an EPT violation at once; a misconfiguration (28.2.3.1) stops the walk; privileges
  (AND of R/W/X over the entries used) are evaluated only once the leaf is reached.
* EPT-violation qualification (27.2.1, Table 27-7): bits 0-2 access type (a guest
  paging-structure read is a data read; an A/D-flag update a data write; with EPT A/D
  enabled paging-structure accesses are writes and set bits 0 and 1); bits 3-5 the AND of
  R/W/X along the walk, all 0 if an entry was not present; bit 7 GLA valid; bit 8 set for an
  access to the translation of the linear address, clear for a paging-structure access.
* Guest paging (4.5) and access rights (4.6: U/S, R/W with CR0.WP, XD with EFER.NXE, SMEP);
  page-fault error codes (4.7). SMAP and protection keys are not modelled.
* Accessed and dirty flags: guest A set on every entry used as the walk uses it, D on the
  leaf for a write once the final guest-physical address has translated (a write that EPT
  refuses sets no dirty flag; the SDM does not order the two, this model picks the order
  that makes a cached and an uncached walk leave the same memory), both as writes through
  EPT that need EPT write permission (28.2.3.2); EPT A/D flags when EPTP bit 6 is set
  (28.2.4). ``set_ad_bits=False`` turns the guest updates off (the walk then
  neither checks nor writes A/D).
* Cache creation (4.10.2.3, 4.10.3.1, 28.3.2): nothing from EPT entries that are not present
  or misconfigured; nothing combined from guest entries that are not present or set
  reserved bits; paging-structure-cache entries only from non-leaf entries and only once
  their accessed flags are 1; cached permissions are those the walk found.
* Use (4.10.3.2, 28.3.2): combined translation first, then the PDE, PDPTE, PML4E caches;
  guest-physical translations and EPT paging-structure caches for every guest-physical
  address, with tags (VPID, PCID, EP4TA) and EP4TA; global translations for any PCID.
* A cached translation whose permissions do not allow the access gives an EPT violation (or a
  page fault) from the cached values, not a re-walk (28.3.3.4, 4.10.4.1); a write through a
  cached translation whose dirty flag is clear re-walks to set it (4.8).
* Invalidation by faults: an EPT violation invalidates the guest-physical mappings for its GPA
  and the combined mappings for its linear address (28.3.3.1). The SDM names the combined
  mappings "for that linear address" when the GPA is the translation of the linear address;
  this model also drops them when the violation hit a guest paging-structure access, because
  28.3.3.4 promises that a violation "will not recur" once the entry is fixed, and a combined
  paging-structure-cache entry holding the old EPT permissions would make it recur (the
  processor "may invalidate any cached mappings at any time", 28.3.3.2). A page fault
  invalidates the TLB entries and paging-structure-cache entries for its linear address
  (4.10.4.1). A misconfiguration invalidates nothing (nothing was cached from the entry).

Speed without a change in what is counted: the slow path looks its structures up through the
current tag's live tables (built by ``_derive_tags``), and a walk that ends in an EPT
misconfiguration having changed nothing (the doorbell on an MMIO SPTE) is recorded and
replayed while its inputs hold (the walk memo, :meth:`Walker._translate_slow`; SDM 28.3.2:
nothing is cached from a misconfigured entry, so the walk repeats). ``walk_memo=False`` is the
reference, held equal by ``tests/unit/test_vmx_walk_memo.py``.
"""

from __future__ import annotations

import struct
from collections import Counter, _count_elements
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastmmio.sim.vmx import layouts as L
from fastmmio.sim.vmx.caches import (
    SHIFT_1G,
    SHIFT_2M,
    SHIFT_4K,
    Cache,
    DataCacheModel,
    MultiSizeTlb,
    get_config,
)
from fastmmio.sim.vmx.errors import VmxError
from fastmmio.sim.vmx.memory import HostMemory

READ, WRITE, FETCH = 0, 1, 2
ACCESS_NAMES = ("read", "write", "fetch")

GLOBAL_PCID = -1  # pseudo-PCID under which global translations are kept (usable by any PCID)
NO_EPT = -1  # pseudo-EP4TA of linear mappings (created while EPT is not in use)

_PSC_LEVELS = ((2, "pde"), (3, "pdpte"), (4, "pml4e"))  # look-up order: longest match first
_LNAME = L.LEVEL_NAMES
_SHIFT = L.LEVEL_SHIFT
_LA_MASK = (1 << 48) - 1
_U64 = struct.Struct("<Q")  # a paging-structure entry as HostMemory stores it
_EPT_LEAF_SHIFT = {1: SHIFT_4K, 2: SHIFT_2M, 3: SHIFT_1G}

# event names, built once (no string formatting on the walk's path)
_REF_KEYS: dict[tuple[str, int], str] = {}


def _ref_key(structure: str, level: int) -> str:
    k = _REF_KEYS.get((structure, level))
    if k is None:
        k = _REF_KEYS[(structure, level)] = f"walk.ref.{structure}.{_LNAME[level]}"
    return k


# the methods a recorded walk runs through (the walk memo relies on what they log)
_MEMO_WALK = ("_translate_uncached", "_lookup_tlb", "_walk", "_guest_ad_write", "_ref",
              "_ept_translate", "_gpa_cached", "_gpa_psc_start")

# rights bits of a cached combined translation
R_RW, R_US, R_XD = 1, 2, 4
R_EPT_SHIFT = 3  # EPT R/W/X AND in bits 5:3
R_DIRTY = 64


VM_EXIT_KINDS = frozenset({"ept_violation", "ept_misconfig", "npf"})  # faults that are exits


class Fault:
    """A translation that did not produce a host-physical address (never changed once made:
    a derived fault is a new one, so one may be handed out again).

    ``kind``: ``page_fault``, ``ept_violation``, ``ept_misconfig`` or ``gp``.
    ``linear``: the linear address (None for :meth:`Walker.translate_gpa`).
    ``gpa``: the guest-physical address of an EPT violation or misconfiguration.
    ``error_code``: the #PF error code. ``qualification``: the EPT-violation exit
    qualification (0 for a misconfiguration, SDM 27.2.1). ``structure``/``level``: where
    the walk stopped (``guest``/``ept``/``tlb``; 4..1, 0 for a cached translation).
    """

    __slots__ = ("kind", "linear", "gpa", "error_code", "qualification", "structure", "level")

    def __init__(self, kind: str, linear: int | None = None, gpa: int | None = None,
                 error_code: int = 0, qualification: int = 0, structure: str | None = None,
                 level: int = 0):
        self.kind = kind
        self.linear = linear
        self.gpa = gpa
        self.error_code = error_code
        self.qualification = qualification
        self.structure = structure
        self.level = level

    def _key(self) -> tuple:
        return (self.kind, self.linear, self.gpa, self.error_code, self.qualification)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fault) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        s = f"Fault({self.kind}"
        if self.linear is not None:
            s += f", la={self.linear:#x}"
        if self.gpa is not None:
            s += f", gpa={self.gpa:#x}"
        if self.kind == "page_fault":
            s += f", error_code={self.error_code:#x}"
        if self.kind == "ept_violation":
            s += f", qual={self.qualification:#x}"
        if self.kind == "npf":
            s += f", exitinfo1={self.error_code:#x}"
        if self.structure:
            s += f", at={self.structure}:{self.level}"
        return s + ")"

    @property
    def is_vm_exit(self) -> bool:
        return self.kind in VM_EXIT_KINDS


class _CountLog:
    """Stands in for the event counter while a walk is recorded: counts go through to the
    counter, and each increment is logged in order."""

    __slots__ = ("counts", "log")

    def __init__(self, counts: Counter[str]):
        self.counts = counts
        self.log: list[tuple[str, int]] = []

    def __getitem__(self, key: str) -> int:
        return self.counts[key]

    def __setitem__(self, key: str, value: int) -> None:
        self.log.append((key, value - self.counts[key]))
        self.counts[key] = value


class TlbEntry:
    """A cached combined translation (or a linear translation when EPT is off):
    linear page -> host-physical frame, with the rights the walk found."""

    __slots__ = ("base", "mask", "rights", "gpa_base")

    def __init__(self, base: int, mask: int, rights: int, gpa_base: int):
        self.base = base  # host-physical frame of the page
        self.mask = mask  # offset mask (page size - 1)
        self.rights = rights  # R_RW | R_US | R_XD | EPT RWX << 3 | R_DIRTY
        self.gpa_base = gpa_base  # guest-physical frame (for EPT violations from the entry)


class GpaEntry:
    """A cached guest-physical translation: guest-physical page -> host-physical frame."""

    __slots__ = ("base", "mask", "perm", "shift", "dirty")

    def __init__(self, base: int, mask: int, perm: int, shift: int, dirty: bool):
        self.base = base
        self.mask = mask
        self.perm = perm  # AND of R/W/X over the EPT entries used
        self.shift = shift
        self.dirty = dirty  # EPT dirty flag known set (only meaningful with EPT A/D)


class PscEntry:
    """A combined (or linear) paging-structure-cache entry: upper linear-address bits -> the
    guest paging structure below, by guest-physical and host-physical address, with the
    guest rights so far and the EPT permissions of that structure's page."""

    __slots__ = ("next_gpa", "next_hpa", "next_perm", "rights")

    def __init__(self, next_gpa: int, next_hpa: int, next_perm: int, rights: int):
        self.next_gpa = next_gpa
        self.next_hpa = next_hpa
        self.next_perm = next_perm
        self.rights = rights  # R_RW | R_US | R_XD accumulated above


class EptPscEntry:
    """A guest-physical paging-structure-cache entry: upper GPA bits -> the EPT paging
    structure below (host-physical), with the AND of R/W/X so far."""

    __slots__ = ("next_hpa", "perm")

    def __init__(self, next_hpa: int, perm: int):
        self.next_hpa = next_hpa
        self.perm = perm


class Walker:
    """Translation state, caches and the walk of one logical processor.

    The second dimension (EPT here) is walked by :meth:`_ept_translate`; a subclass with
    another second-level format (AMD nested paging, :mod:`fastmmio.sim.svm`) overrides it,
    :meth:`_qual` and :meth:`_ept_violation`, and names its events with ``_gpa_kind``
    (``tlb.<kind>.*``, ``psc.<kind>.*``).

    See :class:`fastmmio.sim.vmx.processor.Processor` for the instruction-level operations
    (VM exit/entry, INVEPT, INVVPID, MOV to CR3, INVLPG) built on top.
    """

    _gpa_kind = "guest_physical"  # event name of the second dimension's caches

    def __init__(self, memory: HostMemory, config: Any = "sdm-max", *,
                 maxphyaddr: int | None = None, ept: bool = True, execute_only: bool = True,
                 ept_1g: bool = True, guest_1g: bool = True, vpid_enabled: bool = True,
                 vpid: int = 1, set_ad_bits: bool = True, seed: int = 0,
                 walk_memo: bool = True):
        self.memory = memory
        self.maxphyaddr = memory.maxphyaddr if maxphyaddr is None else maxphyaddr
        if self.maxphyaddr > memory.maxphyaddr:
            raise VmxError(f"MAXPHYADDR {self.maxphyaddr} exceeds the memory's "
                           f"{memory.maxphyaddr}")
        self.config = get_config(config)
        self.execute_only = execute_only
        self.ept_1g = ept_1g
        self.guest_1g = guest_1g
        self.set_ad_bits = set_ad_bits
        self._counts: Counter[str] = Counter()
        self._fast_hits = 0
        self.ref_log: list[tuple[str, str, int, str]] | None = None
        self.listeners: list[Any] = []  # callables(kind: str) told of every invalidation

        cfg = self.config
        self.tlb = MultiSizeTlb("combined", cfg.combined_tlb, seed)
        self.gtlb = MultiSizeTlb("guest_physical", cfg.guest_physical_tlb, seed + 100)
        self.psc: dict[int, Cache | None] = {}
        self.epsc: dict[int, Cache | None] = {}
        for lvl, name in _PSC_LEVELS:
            spec = cfg.combined_psc.get(name)
            self.psc[lvl] = Cache(f"psc.{name}", spec, seed + lvl) if spec else None
            spec = cfg.guest_physical_psc.get(name)
            self.epsc[lvl] = Cache(f"epsc.{name}", spec, seed + 10 + lvl) if spec else None
        self._psc_order = [(lvl, c, f"{n}") for lvl, n in _PSC_LEVELS
                           if (c := self.psc[lvl]) is not None]
        self._epsc_order = [(lvl, c, f"{n}") for lvl, n in _PSC_LEVELS
                            if (c := self.epsc[lvl]) is not None]
        self.dcache = DataCacheModel(cfg.data_cache) if cfg.data_cache else None
        self._served_keys = {n: f"walk.served.{n}"
                             for n in (*(lv.name for lv in cfg.data_cache or ()), "mem")}

        # the walk memo (see _translate_slow): one epoch for every cache of this processor
        self._epoch = [0]
        for cache in (*self.tlb.caches, *self.gtlb.caches,
                      *(x for x in (*self.psc.values(), *self.epsc.values()) if x is not None)):
            cache.epoch = self._epoch
        # only for the walk whose every memory read goes through _ref and every cache hit
        # is logged here (a subclass with its own walk or second dimension keeps it off)
        self.walk_memo = walk_memo and all(
            getattr(type(self), name) is getattr(Walker, name) for name in _MEMO_WALK)
        self._memo: dict[tuple, tuple] = {}
        self._rec: tuple[list, list] | None = None

        # architectural state
        self.cr0 = 0x8001_0011  # PG | WP | ET | PE
        self.cr3 = 0
        self.cr4 = 0x20  # PAE
        self.efer = 0xD00  # NXE | LMA | LME
        self.cpl = 0
        self.ept_enabled = ept
        self.eptp = 0
        self.vpid_enabled = vpid_enabled
        self.vpid = vpid
        self._derive()

    # ---------------------------------------------------------------------------------------
    # state
    # ---------------------------------------------------------------------------------------

    @property
    def pcid(self) -> int:
        """Current PCID: CR3[11:0] if CR4.PCIDE = 1, else 000H (SDM 4.10.1)."""
        return self.cr3 & 0xFFF if self.cr4 & (1 << 17) else 0

    @property
    def ep4ta(self) -> int:
        """Current EP4TA (EPTP bits 51:12), or NO_EPT when EPT is not in use (28.3.2)."""
        return L.eptp_ep4ta(self.eptp) if self.ept_enabled else NO_EPT

    @property
    def effective_vpid(self) -> int:
        """The VPID mappings are tagged with: 0000H when "enable VPID" is 0 (28.1)."""
        return self.vpid if self.vpid_enabled else 0

    def _derive(self) -> None:
        """Recompute everything derived from control state (tags, masks, permission table)."""
        self._derive_modes()
        self._derive_tags()

    def _derive_modes(self) -> None:
        """Masks and the permission table: after a change of CR0, CR4, EFER, EPTP or CPL."""
        self._epoch[0] += 1
        M = self.maxphyaddr
        self._phys = (1 << M) - 1
        self._paging = bool(self.cr0 & (1 << 31))
        self._wp = bool(self.cr0 & (1 << 16))
        self._pge = bool(self.cr4 & (1 << 7))
        self._smep = bool(self.cr4 & (1 << 20))
        self._nxe = bool(self.efer & (1 << 11))
        self._ept_ad = self.ept_enabled and bool(self.eptp & (1 << 6))
        self._user = self.cpl == 3
        self._kind = "combined" if self.ept_enabled else "linear"
        self._grsvd = {
            (lvl, ps): L.guest_reserved_mask(lvl, ps, M, self._nxe, self.guest_1g)
            for lvl in (1, 2, 3, 4) for ps in (False, True)
        }
        self._ersvd = {
            (lvl, lg): L.ept_reserved_mask(lvl, lg, M, self.ept_1g)
            for lvl in (1, 2, 3, 4) for lg in (False, True)
        }
        # permission table: okmask[access * 2 + user] has bit r set when rights r allow it
        ok = []
        for access in (READ, WRITE, FETCH):
            for user in (False, True):
                m = 0
                for r in range(128):
                    if (self._guest_allows(r, access, user)
                            and (r >> R_EPT_SHIFT) & (1 << access)
                            and (access != WRITE or r & R_DIRTY)):
                        m |= 1 << r
                ok.append(m)
        self._okmask = ok
        self._ok_cur = [ok[a * 2 + self._user] for a in (READ, WRITE, FETCH)]

    def _derive_tags(self) -> None:
        """Tags and fast-path handles: after a change of CR3, VPID or EPTP."""
        self._epoch[0] += 1
        self._cr3_base = self.cr3 & self._phys & ~0xFFF
        vpid = self.effective_vpid
        ep4ta = self.ep4ta
        self._ctag = (vpid, self.pcid, ep4ta)
        self._gtag = (vpid, GLOBAL_PCID, ep4ta)
        self._etag = ep4ta
        # fast-path handles on the current tag's 4 KiB tables
        hit = self.tlb.by_shift.get(SHIFT_4K)
        if hit is not None:
            self._t4 = hit[0].table(self._ctag)
            self._g4 = hit[0].table(self._gtag)
            self._c4 = hit[0] if hit[0].lru else None
        else:
            self._t4 = {}
            self._g4 = {}
            self._c4 = None
        self._tlb_hit_ev = f"tlb.{self._kind}.hit"
        self._last4 = -1
        # look-up tables of the slow path: each structure with the current tag's (live)
        # table, the structure itself when its LRU order must be updated on a hit, and the
        # event names (no per-look-up method call or string formatting)
        kind, gkind = self._kind, self._gpa_kind
        ctag, gtag, etag = self._ctag, self._gtag, ep4ta
        self._tlb_look = tuple(
            (c, m, s, c.table(ctag), c.table(gtag), c if c.lru else None)
            for s in self.tlb.shifts for c, m in (self.tlb.by_shift[s],))
        self._tlb_ev = (f"tlb.{kind}.hit", f"tlb.{kind}.miss", f"tlb.{kind}.dirty_assist")
        self._psc_look = tuple(
            (lvl, c, c.table(ctag), c if c.lru else None, _SHIFT[lvl],
             f"psc.{kind}.{name}.hit", f"psc.{kind}.{name}.miss")
            for lvl, c, name in self._psc_order)
        self._gtlb_look = tuple(
            (c, m, s, c.table(etag), c if c.lru else None)
            for s in self.gtlb.shifts for c, m in (self.gtlb.by_shift[s],))
        self._gtlb_ev = (f"tlb.{gkind}.hit", f"tlb.{gkind}.miss",
                         f"tlb.{gkind}.dirty_assist")
        self._epsc_look = tuple(
            (lvl, c, c.table(etag), c if c.lru else None, _SHIFT[lvl],
             f"psc.{gkind}.{name}.hit", f"psc.{gkind}.{name}.miss")
            for lvl, c, name in self._epsc_order)

    def _guest_allows(self, r: int, access: int, user: bool) -> bool:
        """SDM 4.6 access rights for rights bits ``r`` (RW, US AND; XD OR)."""
        if not self._paging:
            return True
        if user:
            if not r & R_US:
                return False
            if access == WRITE and not r & R_RW:
                return False
        else:
            if access == WRITE and not r & R_RW and self._wp:
                return False
            if access == FETCH and self._smep and r & R_US:
                return False
        if access == FETCH and r & R_XD and self._nxe:
            return False
        return True

    # ---------------------------------------------------------------------------------------
    # events
    # ---------------------------------------------------------------------------------------

    @property
    def events(self) -> Counter[str]:
        """Every event counted so far (names from fastmmio.sim.events)."""
        if self._fast_hits:
            self._counts[self._tlb_hit_ev] += self._fast_hits
            self._fast_hits = 0
        return self._counts

    @contextmanager
    def uncounted(self) -> Iterator[None]:
        """Translations made inside are a simulator's own look-ups (reading the bytes of an
        instruction it decodes, say), not memory references of the guest: their events go
        to a scratch counter and their references to no ``ref_log``. What they do to the
        caches stays (a look-up is a look-up)."""
        saved = self._counts, self._fast_hits, self.ref_log
        self._counts, self._fast_hits, self.ref_log = Counter(), 0, None
        try:
            yield
        finally:
            self._counts, self._fast_hits, self.ref_log = saved

    def reset_events(self) -> Counter[str]:
        """Return the events so far and start counting afresh."""
        ev = self.events
        self._counts = Counter()
        return ev

    def _ref(self, structure: str, level: int, hpa: int) -> None:
        """Count one paging-structure reference and where the walk data-cache found it."""
        c = self._counts
        c[_REF_KEYS.get((structure, level)) or _ref_key(structure, level)] += 1
        served = self.dcache.access(hpa) if self.dcache is not None else "mem"
        c[self._served_keys[served]] += 1
        if self.ref_log is not None:
            self.ref_log.append((structure, _LNAME[level], hpa, served))
        if self._rec is not None:
            self._rec[0].append((structure, level, hpa))

    # ---------------------------------------------------------------------------------------
    # translation: fast path
    # ---------------------------------------------------------------------------------------

    def translate(self, la: int, access: int = READ, cpl: int | None = None) -> int | Fault:
        """Translate linear address ``la`` for ``access`` (READ, WRITE, FETCH) at ``cpl``
        (default: the current CPL). Returns the host-physical address or a :class:`Fault`.

        The fast path is a look-up of the 4 KiB combined translation of the current tag (then
        the global one) and a permission check against a precomputed bit mask; for bounded
        LRU structures the recency update is skipped when the page is already the most
        recently used one (exact LRU: nothing else touched its set since)."""
        vpn = la >> 12
        ok = self._ok_cur[access] if cpl is None else self._okmask[access * 2 + (cpl == 3)]
        e = self._t4.get(vpn)
        if e is not None:
            if (ok >> e.rights) & 1:
                self._fast_hits += 1
                if self._c4 is not None and vpn != self._last4:
                    self._c4.touch(self._ctag, vpn)
                    self._last4 = vpn
                return e.base | (la & 0xFFF)
        else:
            e = self._g4.get(vpn)
            if e is not None and (ok >> e.rights) & 1:
                self._fast_hits += 1
                if self._c4 is not None:
                    self._c4.touch(self._gtag, vpn)
                    self._last4 = -1
                return e.base | (la & 0xFFF)
        return self._translate_slow(la, access, self._user if cpl is None else cpl == 3)

    # ---------------------------------------------------------------------------------------
    # translation: slow path (cached translation of another size, or a walk)
    # ---------------------------------------------------------------------------------------

    def _lookup_tlb(self, la: int) -> TlbEntry | None:
        for c, m, s, ctable, gtable, lru in self._tlb_look:
            key = (la >> s) | m
            e = ctable.get(key)
            if e is not None:
                tag = self._ctag
            else:
                e = gtable.get(key)
                if e is None:
                    continue
                tag = self._gtag
            if lru is not None:
                lru.touch(tag, key)
            if self._rec is not None:
                self._rec[1].append((c, tag, key))
            return e
        return None

    def _translate_slow(self, la: int, access: int, user: bool) -> int | Fault:
        """A translation that missed the fast path: answered from the walk memo when it
        holds (below), else :meth:`_translate_uncached`.

        The walk memo. SDM 28.3.2: no guest-physical or combined mapping is created from an
        EPT paging-structure entry that is misconfigured, so a walk that ends in an EPT
        misconfiguration caches nothing (and 28.3.3 gives such a walk nothing to
        invalidate): repeated, it fails again. Here the walk is a function of its inputs:
        the linear address, access and mode, the control state, the contents of the
        translation caches (not their replacement order, which only eviction reads) and the
        values of the paging-structure entries it reads. A walk that ended in
        ``ept_misconfig`` having written nothing (no A/D flag, no cache insertion) is
        recorded: the entries it read with their values, the cache hits (LRU updates), the
        data-cache accesses in order, the event increments and the Fault. The record holds
        while the processor-wide epoch is unchanged (every cache content change and every
        control-state change, :meth:`_derive_modes` / :meth:`_derive_tags`, bumps it) and
        the entries it read still hold those values (re-read on every use: guest code can
        write its tables behind the model's back). A replay re-reads those entries, applies
        the LRU updates, feeds the data-cache model the same references (their ``served``
        levels counted as they come out), adds the increments and returns the same Fault:
        exactly what the walk would have done, increments in the walk's order (a new event
        name enters the counter where the walk would have put it). A walk is recorded the
        second time it repeats at one epoch. The memo stands aside while something watches
        the walk as it runs: a ``ref_log``, an event counter other than a plain ``Counter``
        (one that logs increments), a listener (while recording). ``walk_memo=False`` turns
        it off (the reference)."""
        self._last4 = -1  # look-ups and insertions below change LRU order
        if (not self.walk_memo or self.ref_log is not None
                or self._counts.__class__ is not Counter):
            # (a reference log, or a counter that logs increments, sees the walk's order)
            return self._translate_uncached(la, access, user)
        # (only a canonical address that ended in a misconfiguration is in the memo)
        key = (la, access, user, self.set_ad_bits, self.execute_only, self.ept_enabled)
        epoch = self._epoch
        ep = epoch[0]
        m = self._memo.get(key)
        if m is not None and m[0] == ep:
            rec = m[1]
            if rec is None:
                return self._record(key, la, access, user)
            f = self._replay(rec)
            if f is not None:
                return f
        r = self._translate_uncached(la, access, user)
        if r.__class__ is Fault and r.kind == "ept_misconfig" and epoch[0] == ep:
            self._memo_store(key, ep, None)  # seen once: record it if it repeats
        return r

    def _memo_store(self, key: tuple, ep: int, rec: tuple | None) -> None:
        memo = self._memo
        if len(memo) >= 64 or (memo and next(iter(memo.values()))[0] != ep):
            memo.clear()  # records of another epoch are dead
        memo[key] = (ep, rec)

    def _record(self, key: tuple, la: int, access: int, user: bool) -> int | Fault:
        """Translate while recording what the walk does (see :meth:`_translate_slow`): the
        event increments in the order they happen (through :class:`_CountLog`), the
        paging-structure references (``_ref``) and the cache hits (``_rec``)."""
        counts = self._counts
        if self.listeners:  # a listener may read the events while the walk runs
            return self._translate_uncached(la, access, user)
        ep = self._epoch[0]
        refs: list[tuple[str, int, int]] = []
        hits: list[tuple[Cache, Any, int]] = []
        log = _CountLog(counts)
        self._rec = (refs, hits)
        self._counts = log  # type: ignore[assignment]
        try:
            r = self._translate_uncached(la, access, user)
        finally:
            self._rec = None
            self._counts = counts
        if r.__class__ is not Fault or r.kind != "ept_misconfig" or self._epoch[0] != ep:
            return r
        # the increments in order, cut at each reference's served level (counted on replay
        # as the data cache answers): segments[i] precede the i-th served count
        segments: list[tuple[str, ...]] = []
        seg: list[str] = []
        for k, n in log.log:
            if k.startswith("walk.ad."):
                return r  # it wrote an A/D flag: not a pure function of what it read
            if k.startswith("walk.served."):
                segments.append(tuple(seg))
                seg = []
            else:
                seg += [k] * n
        if len(segments) != len(refs):
            return r  # pragma: no cover - every reference counts one served level
        pages = self.memory.pages
        reads = tuple((hpa >> 12, hpa & 0xFFF,
                       _U64.unpack_from(pages[hpa >> 12], hpa & 0xFFF)[0])
                      for _, _, hpa in refs)
        touches = tuple((cache, tag, k) for cache, tag, k in hits if cache.lru)
        steps = tuple(zip(segments, (hpa for _, _, hpa in refs)))
        self._memo_store(key, ep, (reads, touches, steps, tuple(seg), r))
        return r

    def _replay(self, rec: tuple) -> Fault | None:
        """Replay a recorded walk (see :meth:`_translate_slow`), or None if an entry it read
        changed (then walk)."""
        reads, touches, steps, tail, f = rec
        pages = self.memory.pages
        unpack = _U64.unpack_from
        for pfn, off, value in reads:
            page = pages.get(pfn)
            if page is None or unpack(page, off)[0] != value:
                return None
        for cache, tag, key in touches:
            cache.touch(tag, key)
        dc = self.dcache
        names = self._served_keys
        keys: list[str] = []
        for seg, hpa in steps:
            keys += seg
            keys.append(names[dc.access(hpa) if dc is not None else "mem"])
        keys += tail
        # the C helper of Counter.update (one count per item, in order), without its checks
        _count_elements(self._counts, keys)
        return f  # (a Fault is never changed once made: the recorded one serves every replay)

    def _translate_uncached(self, la: int, access: int, user: bool) -> int | Fault:
        """A linear address that missed the fast path: #GP if it is not canonical, a cached
        translation of another size or tag, else the walk."""
        c = self._counts
        if self._paging and not (la >> 47 == 0 or la >> 47 == 0x1FFFF):
            c["fault.gp"] += 1
            return Fault("gp", linear=la)
        ev_hit, ev_miss, ev_assist = self._tlb_ev
        e = self._lookup_tlb(la)
        if e is not None:
            c[ev_hit] += 1
            r = e.rights
            if not self._guest_allows(r, access, user):
                # SDM 4.10.2.3: the cached rights may be used; the #PF then invalidates (4.10.4.1)
                ec = L.PFERR_P | self._pf_bits(access, user)
                return self._page_fault(la, ec, "tlb", 0)
            eperm = (r >> R_EPT_SHIFT) & 7
            if not eperm & (1 << access):
                # SDM 28.3.3.4: too little permission in a cached translation -> EPT violation
                gpa = e.gpa_base | (la & e.mask)
                q = self._qual(access, eperm, la, True)
                return self._ept_violation(la, gpa, q, "tlb", 0)
            if access == WRITE and not r & R_DIRTY:
                c[ev_assist] += 1  # walk again to set the dirty flag(s)
            else:
                return e.base | (la & e.mask)
        else:
            c[ev_miss] += 1
        return self._walk(la, access, user)

    def _pf_bits(self, access: int, user: bool) -> int:
        ec = 0
        if access == WRITE:
            ec |= L.PFERR_W
        if user:
            ec |= L.PFERR_U
        if access == FETCH and (self._nxe or self._smep):
            ec |= L.PFERR_ID  # SDM 4.7: I/D reported only with NXE or SMEP
        return ec

    # ---------------------------------------------------------------------------------------
    # the walk
    # ---------------------------------------------------------------------------------------

    def _walk(self, la: int, access: int, user: bool) -> int | Fault:
        """The full 2-D walk of SDM 28.2.3.3, starting from the longest paging-structure-cache
        match."""
        c = self._counts
        mem = self.memory
        ept = self.ept_enabled
        if not self._paging:
            # CR0.PG = 0: the linear address is the guest-physical address (28.2.1)
            r = self._ept_translate(la, access, la, True)
            if isinstance(r, Fault):
                return r
            hpa, perm, shift, edirty = r
            if ept:
                dirty = R_DIRTY if (edirty or not self._ept_ad) else 0
                self._insert_tlb(la, hpa, shift, R_RW | R_US | (perm << R_EPT_SHIFT) | dirty,
                                 la, False)
            return hpa

        tag = self._ctag
        table_gpa = self._cr3_base
        table_hpa = -1
        table_perm = 7
        rights = R_RW | R_US
        level = 4
        for lvl, cache, table, lru, shift, ev_hit, ev_miss in self._psc_look:
            key = (la & _LA_MASK) >> shift
            p = table.get(key)
            if p is not None:
                if lru is not None:
                    lru.touch(tag, key)
                if self._rec is not None:
                    self._rec[1].append((cache, tag, key))
                c[ev_hit] += 1
                table_gpa, table_hpa, table_perm = p.next_gpa, p.next_hpa, p.next_perm
                rights = p.rights
                level = lvl - 1
                break
            c[ev_miss] += 1

        ad = self.set_ad_bits
        ps_access = WRITE if self._ept_ad else READ  # 28.2.3.2: with EPT A/D, PS accesses write
        pending: tuple | None = None  # (level, key, gpa, rights) of a PSC entry to create
        while True:
            idx = ((la >> _SHIFT[level]) & 511) * 8
            entry_gpa = table_gpa + idx
            if table_hpa < 0:
                r = self._ept_translate(entry_gpa, ps_access, la, False)
                if isinstance(r, Fault):
                    return r
                entry_hpa, table_perm = r[0], r[1]
                table_hpa = entry_hpa - idx
                if pending is not None:
                    plvl, pkey, pgpa, prights = pending
                    pc = self.psc.get(plvl)
                    if pc is not None:
                        pc.put(tag, pkey, PscEntry(pgpa, table_hpa, table_perm, prights))
            else:
                entry_hpa = table_hpa + idx
                if ept and not table_perm & (1 << ps_access):
                    q = self._qual(ps_access, table_perm, la, False)
                    return self._ept_violation(la, entry_gpa, q, "guest", level)
            pending = None
            value = mem.read_u64(entry_hpa)
            self._ref("guest", level, entry_hpa)
            if not value & L.PTE_P:
                return self._page_fault(la, self._pf_bits(access, user), "guest", level)
            ps = level in (2, 3) and bool(value & L.PTE_PS)
            if value & self._grsvd[(level, ps)]:
                return self._page_fault(la, L.PFERR_P | L.PFERR_RSVD
                                        | self._pf_bits(access, user), "guest", level)
            leaf = level == 1 or ps
            # accessed flag (4.8): a write to the entry through EPT (28.2.3.2)
            new = value
            if ad and not value & L.PTE_A:
                new |= L.PTE_A
            rights &= ((value >> 1) & (R_RW | R_US)) | R_XD  # PTE bits 1 (R/W), 2 (U/S)
            if value & L.PTE_XD:
                rights |= R_XD
            if leaf:
                shift = _EPT_LEAF_SHIFT[level]
                if not self._guest_allows(rights, access, user):
                    return self._page_fault(la, L.PFERR_P | self._pf_bits(access, user),
                                            "guest", level)
                if new != value:
                    f = self._guest_ad_write(la, entry_gpa, entry_hpa, table_perm, new, level)
                    if f is not None:
                        return f
                gpa = (value & self._phys & ~((1 << shift) - 1)) | (la & ((1 << shift) - 1))
                r = self._ept_translate(gpa, access, la, True)
                if isinstance(r, Fault):
                    return r
                hpa, perm, eshift, edirty = r
                if ad and access == WRITE and not value & L.PTE_D:
                    # the dirty flag once the write is known to proceed (4.8: "whenever there
                    # is a write to a linear address"); a write refused by EPT sets none
                    new |= L.PTE_D
                    f = self._guest_ad_write(la, entry_gpa, entry_hpa, table_perm, new, level)
                    if f is not None:
                        return f
                gdirty = bool(new & L.PTE_D) or not ad
                dirty = R_DIRTY if gdirty and (edirty or not self._ept_ad) else 0
                glob = self._pge and bool(value & L.PTE_G)
                self._insert_tlb(la, hpa, min(shift, eshift),
                                 rights | (perm << R_EPT_SHIFT) | dirty, gpa, glob)
                return hpa
            if new != value:
                f = self._guest_ad_write(la, entry_gpa, entry_hpa, table_perm, new, level)
                if f is not None:
                    return f
            # non-leaf: a PSC entry for this level may be created once the next structure's
            # host-physical address is known (it needs a good EPT translation, 28.3.2)
            table_gpa = value & self._phys & ~0xFFF
            if self.psc[level] is not None and (ad or value & L.PTE_A):
                pending = (level, (la & _LA_MASK) >> _SHIFT[level], table_gpa, rights)
            table_hpa = -1
            level -= 1

    def _guest_ad_write(self, la: int, entry_gpa: int, entry_hpa: int, table_perm: int,
                        new: int, level: int) -> Fault | None:
        """Write a guest entry's A/D flags: a data write to its GPA (28.2.3.2)."""
        if self.ept_enabled and not table_perm & L.EPT_W:
            q = self._qual(WRITE, table_perm, la, False)
            return self._ept_violation(la, entry_gpa, q, "guest", level)
        self.memory.write_u64(entry_hpa, new)
        self._counts[f"walk.ad.guest.{_LNAME[level]}"] += 1
        return None

    def _qual(self, access: int, perm: int, la: int | None, translated: bool) -> int:
        """EPT-violation exit qualification, SDM 27.2.1 Table 27-7."""
        q = (1 << access) | (perm << 3)
        if not translated and self._ept_ad and la is not None:
            q |= L.QUAL_READ | L.QUAL_WRITE  # Table 27-7 note 1
        if la is not None:
            q |= L.QUAL_GLA_VALID
            if translated:
                q |= L.QUAL_TRANSLATED
        return q

    def _insert_tlb(self, la: int, hpa: int, shift: int, rights: int, gpa: int,
                    glob: bool) -> None:
        mask = (1 << shift) - 1
        tag = self._gtag if glob else self._ctag
        self.tlb.insert(tag, la, shift, TlbEntry(hpa & ~mask, mask, rights, gpa & ~mask))

    # ---------------------------------------------------------------------------------------
    # EPT
    # ---------------------------------------------------------------------------------------

    def translate_gpa(self, gpa: int, access: int = READ) -> int | Fault:
        """Translate a guest-physical address that is not the translation of a linear address
        (qualification bit 7 clear). Returns the host-physical address or a Fault."""
        r = self._ept_translate(gpa, access, None, False)
        return r if isinstance(r, Fault) else r[0]

    def _gpa_cached(self, gpa: int, access: int, la: int | None,
                    translated: bool) -> tuple[int, int, int, bool] | Fault | None:
        """Look ``gpa`` up among the cached guest-physical translations (the second
        dimension's TLB): the translation as :meth:`_ept_translate` returns it, a violation
        from the cached permissions (28.3.3.4), or None (a miss, or a write whose cached
        dirty flag is clear: walk again). Events are named by ``_gpa_kind``."""
        c = self._counts
        ev_hit, ev_miss, ev_assist = self._gtlb_ev
        for cache, m, s, table, lru in self._gtlb_look:
            key = (gpa >> s) | m
            e = table.get(key)
            if e is not None:
                if lru is not None:
                    lru.touch(self._etag, key)
                if self._rec is not None:
                    self._rec[1].append((cache, self._etag, key))
                c[ev_hit] += 1
                if not e.perm & (1 << access):
                    q = self._qual(access, e.perm, la, translated)
                    return self._ept_violation(la, gpa, q, "tlb", 0)
                if access == WRITE and self._ept_ad and not e.dirty:
                    c[ev_assist] += 1
                    return None
                return (e.base | (gpa & e.mask), e.perm, e.shift, e.dirty)
        if self._gtlb_look:
            c[ev_miss] += 1
        return None

    def _gpa_psc_start(self, gpa: int, root: int, perm: int) -> tuple[int, int, int]:
        """Where the second-dimension walk of ``gpa`` starts: the longest match in its
        paging-structure caches, else ``root`` at level 4 with ``perm``. Returns (table
        address, permissions so far, level)."""
        c = self._counts
        for lvl, cache, table, lru, shift, ev_hit, ev_miss in self._epsc_look:
            key = gpa >> shift
            p = table.get(key)
            if p is not None:
                if lru is not None:
                    lru.touch(self._etag, key)
                if self._rec is not None:
                    self._rec[1].append((cache, self._etag, key))
                c[ev_hit] += 1
                return p.next_hpa, p.perm, lvl - 1
            c[ev_miss] += 1
        return root, perm, 4

    def _ept_translate(self, gpa: int, access: int, la: int | None,
                       translated: bool) -> tuple[int, int, int, bool] | Fault:
        """Guest-physical -> host-physical through the guest-physical caches and the EPT
        walk. Returns (hpa, perm AND, leaf shift, EPT dirty known set) or a Fault."""
        if not self.ept_enabled:
            return (gpa, 7, SHIFT_1G, True)
        r = self._gpa_cached(gpa, access, la, translated)
        if r is not None:
            return r
        c = self._counts
        tag = self._etag
        gtlb = self.gtlb
        mem = self.memory
        ad = self._ept_ad
        table, perm, level = self._gpa_psc_start(gpa, self.eptp & self._phys & ~0xFFF, 7)
        while True:
            ea = table + ((gpa >> _SHIFT[level]) & 511) * 8
            value = mem.read_u64(ea)
            self._ref("ept", level, ea)
            rwx = value & 7
            if rwx == 0:
                # 28.2.3.3 1a: not present -> EPT violation; bits 5:3 are 0 (Table 27-7 note 2)
                q = self._qual(access, 0, la, translated)
                return self._ept_violation(la, gpa, q, "ept", level)
            large = level in (2, 3) and bool(value & L.EPT_LARGE)
            leaf = level == 1 or large
            if (L.ept_bits20_misconfigured(rwx, self.execute_only)
                    or value & self._ersvd[(level, large)]
                    or (leaf and (value >> 3) & 7 in L.EPT_RESERVED_MEMTYPES)):
                c["fault.ept_misconfig"] += 1
                return Fault("ept_misconfig", linear=la, gpa=gpa, structure="ept", level=level)
            perm &= rwx
            if ad and not value & L.EPT_A:
                value |= L.EPT_A
                mem.write_u64(ea, value)
                c[f"walk.ad.ept.{_LNAME[level]}"] += 1
            if leaf:
                break
            table = value & self._phys & ~0xFFF
            pc = self.epsc.get(level)
            if pc is not None:
                pc.put(tag, gpa >> _SHIFT[level], EptPscEntry(table, perm))
            level -= 1
        shift = _EPT_LEAF_SHIFT[level]
        mask = (1 << shift) - 1
        base = value & self._phys & ~mask
        if not perm & (1 << access):
            q = self._qual(access, perm, la, translated)
            return self._ept_violation(la, gpa, q, "ept", level)
        dirty = bool(value & L.EPT_D)
        if ad and access == WRITE and not dirty:
            mem.write_u64(ea, value | L.EPT_D)
            c[f"walk.ad.ept.{_LNAME[level]}"] += 1
            dirty = True
        gtlb.insert(tag, gpa, shift, GpaEntry(base, mask, perm, shift, dirty))
        return (base | (gpa & mask), perm, shift, dirty)

    # ---------------------------------------------------------------------------------------
    # faults and the invalidations they cause
    # ---------------------------------------------------------------------------------------

    def _page_fault(self, la: int, ec: int, structure: str, level: int) -> Fault:
        """A guest #PF; it invalidates the TLB and paging-structure-cache entries for the
        linear address (SDM 4.10.4.1)."""
        self._counts["fault.page_fault"] += 1
        self._invalidate_la_current(la)
        self._notify("page_fault")
        return Fault("page_fault", linear=la, error_code=ec, structure=structure, level=level)

    def _ept_violation(self, la: int | None, gpa: int, q: int, structure: str,
                       level: int) -> Fault:
        """An EPT violation; invalidates the guest-physical mappings for the GPA and, when
        the access came from a linear address, the combined mappings for it (28.3.3.1)."""
        self._counts["inv.ept_violation"] += 1
        self._invalidate_gpa_fault(la, gpa)
        self._notify("ept_violation")
        return Fault("ept_violation", linear=la, gpa=gpa, qualification=q,
                     structure=structure, level=level)

    def _invalidate_gpa_fault(self, la: int | None, gpa: int) -> None:
        """The guest-physical mappings for ``gpa`` (current tag) and, when the access came
        from a linear address, the combined mappings for it."""
        tag = self._etag
        self.gtlb.discard_addr(gpa, lambda t: t == tag)
        for lvl, cache, _ in self._epsc_order:
            cache.discard(tag, gpa >> _SHIFT[lvl])
        if la is not None:
            self._invalidate_la_current(la)

    def _invalidate_la_current(self, la: int) -> None:
        """TLB entries (current tag and global) and PSC entries (current tag) for ``la``."""
        ctag, gtag = self._ctag, self._gtag
        self.tlb.discard_addr(la, lambda t: t == ctag or t == gtag)
        for lvl, cache, _ in self._psc_order:
            cache.discard(ctag, (la & _LA_MASK) >> _SHIFT[lvl])

    def _notify(self, kind: str) -> None:
        for fn in self.listeners:
            fn(kind)
