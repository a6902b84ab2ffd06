"""Guest-side paging operations common to every processor model with a second level of
translation: loading guest control registers, the guest's own invalidating instructions
(MOV to CR3/CR4/CR0, INVLPG), memory accesses through translation, and introspection.

:class:`GuestPaging` sits between :class:`~fastmmio.sim.vmx.walker.Walker` and the
vendor-specific processors: :class:`fastmmio.sim.vmx.processor.Processor` (VMX with EPT:
VPID-tagged, SDM Vol. 3 4.10.4.1 and 28.3.3.1) and
:class:`fastmmio.sim.svm.processor.SvmProcessor` (SVM with nested paging: ASID-tagged, AMD
APM vol. 2 15.16.1, whose "TLB flush operations function identically whether or not SVM is
enabled" and affect "only the TLB entries belonging to the current ASID"). Mappings are
tagged ``(tag, pcid, second-level tag)`` where the first element is the VPID or the ASID
(``effective_vpid``); every operation here acts on that first element only.
"""

from __future__ import annotations

from typing import Any

from fastmmio.sim.vmx.errors import VmxError
from fastmmio.sim.vmx.walker import FETCH, GLOBAL_PCID, READ, WRITE, Fault, Walker

_CR0_PG = 1 << 31
_CR4_PGE = 1 << 7
_CR4_PCIDE = 1 << 17
_CR4_SMEP = 1 << 20


class GuestPaging(Walker):
    """The guest's view of one logical processor: what the guest's own instructions do to
    the translation state, whichever virtualization extension runs it."""

    # ---------------------------------------------------------------------------------------
    # state loading (VM entry loads guest state; the VMM sets controls)
    # ---------------------------------------------------------------------------------------

    def load_guest_state(self, *, cr0: int | None = None, cr3: int | None = None,
                         cr4: int | None = None, efer: int | None = None,
                         cpl: int | None = None) -> None:
        """Load guest control registers without any invalidation (as VM entry loads them
        from the guest-state area, SDM 26.3.2.1; VM entry's own invalidation is in
        :meth:`vmentry`)."""
        if cr0 is not None:
            self.cr0 = cr0
        if cr3 is not None:
            self.cr3 = cr3 & ~(1 << 63)
        if cr4 is not None:
            self.cr4 = cr4
        if efer is not None:
            self.efer = efer
        if cpl is not None:
            if cpl not in (0, 1, 2, 3):
                raise VmxError(f"CPL must be 0..3, got {cpl}")
            self.cpl = cpl
        self._derive()

    def set_cpl(self, cpl: int) -> None:
        if cpl not in (0, 1, 2, 3):
            raise VmxError(f"CPL must be 0..3, got {cpl}")
        self.cpl = cpl
        self._user = cpl == 3
        self._ok_cur = [self._okmask[a * 2 + self._user] for a in (READ, WRITE, FETCH)]


    # ---------------------------------------------------------------------------------------
    # invalidating instructions of the guest
    # ---------------------------------------------------------------------------------------

    def mov_cr3(self, value: int) -> None:
        """Guest MOV to CR3 (SDM 4.10.4.1; for combined mappings all EP4TAs, 28.3.3.1)."""
        pcide = bool(self.cr4 & _CR4_PCIDE)
        noflush = pcide and bool(value >> 63 & 1)
        if not noflush:
            vpid = self.effective_vpid
            pcid = value & 0xFFF if pcide else 0
            self.tlb.drop_tags(lambda t: t[0] == vpid and t[1] == pcid)
            for _, cache, _ in self._psc_order:
                cache.drop_tags(lambda t: t[0] == vpid and t[1] == pcid)
            self._counts["inv.mov_cr3"] += 1
            self._notify("mov_cr3")
        self.cr3 = value & ~(1 << 63)
        self._derive_tags()

    def invlpg(self, la: int) -> None:
        """Guest INVLPG (SDM 4.10.4.1; all EP4TAs, 28.3.3.1). A non-canonical operand is a
        no-op (INVLPG of a non-canonical address does not fault)."""
        vpid, pcid = self.effective_vpid, self.pcid
        self.tlb.discard_addr(la, lambda t: t[0] == vpid and t[1] in (pcid, GLOBAL_PCID))
        for _, cache, _ in self._psc_order:
            cache.drop_tags(lambda t: t[0] == vpid and t[1] == pcid)
        self._counts["inv.invlpg"] += 1
        self._notify("invlpg")

    def mov_cr4(self, value: int) -> None:
        """Guest MOV to CR4: changing PGE, or clearing PCIDE, invalidates all TLB (global
        included) and PSC entries of the current VPID (4.10.4.1); changing SMEP from 0 to 1
        (or PAE) those of the current PCID."""
        old = self.cr4
        vpid = self.effective_vpid
        if (old ^ value) & _CR4_PGE or (old & _CR4_PCIDE and not value & _CR4_PCIDE):
            self._drop_linear_combined(lambda t: t[0] == vpid, "mov_cr4")
        elif (value & ~old & _CR4_SMEP) or ((old ^ value) & 0x20):
            pcid = self.pcid
            self._drop_linear_combined(
                lambda t: t[0] == vpid and t[1] in (pcid, GLOBAL_PCID), "mov_cr4")
        self.cr4 = value
        self._derive()

    def mov_cr0(self, value: int) -> None:
        """Guest MOV to CR0: clearing PG invalidates all TLB and PSC entries (4.10.4.1)."""
        if self.cr0 & _CR0_PG and not value & _CR0_PG:
            vpid = self.effective_vpid
            self._drop_linear_combined(lambda t: t[0] == vpid, "mov_cr0")
        self.cr0 = value
        self._derive()

    def _drop_linear_combined(self, pred: Any, cause: str | None) -> None:
        self.tlb.drop_tags(pred)
        for _, cache, _ in self._psc_order:
            cache.drop_tags(pred)
        if cause is not None:
            self._counts[f"inv.{cause}"] += 1
            self._notify(cause)

    # ---------------------------------------------------------------------------------------
    # memory accesses through translation (for the emulator and tests)
    # ---------------------------------------------------------------------------------------

    def read_linear(self, la: int, size: int, access: int = READ) -> int | Fault:
        """Read ``size`` bytes at linear ``la`` (split at a page boundary); a Fault if a
        translation fails."""
        return self._linear_io(la, size, access, None)

    def write_linear(self, la: int, size: int, value: int) -> Fault | None:
        """Write ``size`` bytes at linear ``la``; a Fault (nothing written) if a translation
        fails, else None."""
        r = self._linear_io(la, size, WRITE, value)
        return r if isinstance(r, Fault) else None

    def _linear_io(self, la: int, size: int, access: int, value: int | None) -> int | Fault:
        if size not in (1, 2, 4, 8):
            raise VmxError(f"access size must be 1, 2, 4 or 8, got {size}")
        first = min(size, 0x1000 - (la & 0xFFF))
        h1 = self.translate(la, access)
        if isinstance(h1, Fault):
            return h1
        h2 = None
        if first < size:
            h2 = self.translate(la + first, access)
            if isinstance(h2, Fault):
                return h2
        mem = self.memory
        if value is None:
            data = mem.read_bytes(h1, first)
            if h2 is not None:
                data += mem.read_bytes(h2, size - first)
            return int.from_bytes(data, "little")
        raw = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        mem.write_bytes(h1, raw[:first])
        if h2 is not None:
            mem.write_bytes(h2, raw[first:])
        return 0

    # ---------------------------------------------------------------------------------------
    # introspection
    # ---------------------------------------------------------------------------------------

    def cached_counts(self) -> dict[str, int]:
        """How many entries each structure holds now (for reports and tests)."""
        out = {"tlb.combined": len(self.tlb), f"tlb.{self._gpa_kind}": len(self.gtlb)}
        for lvl, cache, name in self._psc_order:
            out[f"psc.combined.{name}"] = len(cache)
        for lvl, cache, name in self._epsc_order:
            out[f"psc.{self._gpa_kind}.{name}"] = len(cache)
        return out

    def has_translation(self, la: int) -> bool:
        """Whether a combined (or linear) translation for ``la`` is cached for the current
        tags (does not count as a look-up)."""
        tlb = self.tlb
        for s in tlb.shifts:
            c, m = tlb.by_shift[s]
            key = (la >> s) | m
            for tag in (self._ctag, self._gtag):
                t = c.tables.get(tag)
                if t is not None and key in t:
                    return True
        return False

    def has_gpa_translation(self, gpa: int) -> bool:
        """Whether a guest-physical translation for ``gpa`` is cached for the current EP4TA."""
        g = self.gtlb
        for s in g.shifts:
            c, m = g.by_shift[s]
            t = c.tables.get(self._etag)
            if t is not None and ((gpa >> s) | m) in t:
                return True
        return False

    def has_psc(self, structure: str, level: str, addr: int) -> bool:
        """Whether a paging-structure-cache entry is cached for the current tags:
        ``structure`` is ``combined`` (``addr`` linear) or the second dimension's name,
        ``guest_physical`` on VMX or ``nested`` on SVM (``addr`` a GPA);
        ``level`` is ``pml4e``, ``pdpte`` or ``pde``."""
        lvl = {"pde": 2, "pdpte": 3, "pml4e": 4}[level]
        shift = {2: 21, 3: 30, 4: 39}[lvl]
        if structure == "combined":
            c = self.psc.get(lvl)
            tag: Any = self._ctag
            key = (addr & ((1 << 48) - 1)) >> shift
        elif structure == self._gpa_kind:
            c = self.epsc.get(lvl)
            tag = self._etag
            key = addr >> shift
        else:
            raise VmxError(f"structure must be combined or {self._gpa_kind}, "
                           f"got {structure!r}")
        if c is None:
            return False
        t = c.tables.get(tag)
        return t is not None and key in t
