"""The simulated AMD processor with SVM and nested paging (the vCPU view).

It knows nothing of KVM: it implements what AMD64 APM vol. 2 chapter 15 says a processor
does, and names every choice the APM leaves open (:mod:`.caches`, ``ASSUMPTIONS``).

The guest side of the two-dimensional walk, its caches, its reference accounting
(``walk.ref.*``, ``walk.served.*``, ``walk.ad.*``, ``tlb.*``, ``psc.*``) and the guest's own
invalidating instructions are the shared :class:`~fastmmio.sim.vmx.walker.Walker` and
:class:`~fastmmio.sim.vmx.guestops.GuestPaging`; this class replaces the second dimension
(EPT) with nested paging and the VMX controls with SVM's.

Rules, with their APM sections:

* Nested walk (15.25.5): gCR3 and every guest page-table entry hold guest-physical
  addresses, each translated through the nested tables (x86 long-mode format, host
  MAXPHYADDR, host EFER.NXE: 15.25.3, 15.25.7) before it is read. Walks for guest page
  tables "are always treated as user writes at the nested page table level": the nested page
  must be writable by user, and accessed and dirty bits are set in the nested entries
  touched. The walk for the final guest-physical address is a user access, a data read, data
  write or code read as the guest's access. Read Only Guest Page Tables is not modelled.
* Fault order (15.25.6): nested faults on a guest table, guest #PF from guest entries, guest
  permissions, then the final nested translation. A nested fault is #VMEXIT(NPF):
  EXITINFO2 the faulting guest-physical address, EXITINFO1 P (0 = not present), RW, US
  (always: the MMU's nested accesses are user accesses), RSV, ID, and bit 32 (final GPA) or
  bit 33 (guest page-table walk).
* Rights (15.25.7): writable only if writable at both levels; executable only if executable
  at both (with host NXE clear every nested mapping is executable); the nested entries must
  be user for any guest access at all.
* TLB (15.16, 15.25.1): every cached translation is tagged by ASID (global pages are global
  only within their ASID); VMRUN and #VMEXIT do not flush; TLB_CONTROL (Table 15-9) at
  VMRUN: 00h nothing, 01h everything of every ASID, 03h everything of the current ASID, 07h
  the current ASID's non-global entries (03h and 07h need FlushByAsid); INVLPGA (15.16.2)
  the TLB mapping of one guest virtual page in one ASID, never a nested translation. A guest
  MOV CR3 / INVLPG / MOV CR4 acts on the current ASID only (15.16.1).
* #NPF and cached translations: a nested fault drops the cached nested translations of its
  guest-physical page and the TLB entries of its linear address. The APM does not say so;
  it follows from 15.16.1, under which raising permissions or setting a present bit needs no
  flush, so a translation cached with the old rights must not fault again.
* Next RIP (15.7.1): saved for instruction intercepts (15.9), MSR and IOIO intercepts and
  #BP/#OF/#BR raised by INT3/INTO/BOUND; "for all other intercepts, nRIP is reset to zero",
  #NPF included. ``next_rip_on_npf="yes"`` models hardware that fills it on #NPF anyway
  (KVM's fast MMIO path, 01cde4eaaeca, tests ``next_rip != 0``).
* Decode assists (15.8.4): on #NPF, up to 15 bytes read from guest CS:RIP, as many as could
  be fetched before a fault; only for data accesses ("Instruction-fetch page faults provide
  no additional information"); none for SEV-ES guests (their memory and state are
  encrypted; 15.35); erratum 1096 (family 17h models 00h-0Fh, described in KVM's
  ``svm_need_emulation_on_page_fault``): the microcode reads CS:RIP with CPL-0 data
  privileges, so with guest CR4.SMAP = 1 and a user code page it records 0 bytes.
* IOIO intercepts (15.10.2): EXITINFO1 port, size, direction (Figure 15-2); EXITINFO2 the
  RIP of the next instruction; nRIP as 15.7.1.
"""

from __future__ import annotations

from typing import Any

from fastmmio.sim.svm.caches import get_config, resolve_assumptions, without_nested_structures
from fastmmio.sim.svm.errors import SvmError
from fastmmio.sim.svm.exits import SvmExit
from fastmmio.sim.svm.layouts import (
    EXIT_INVALID,
    EXIT_IOIO,
    EXIT_NPF,
    NPF_FINAL_GPA,
    NPF_GUEST_WALK,
    NPF_ID,
    NPF_P,
    NPF_RSV,
    NPF_RW,
    NPF_US,
    NRIP_IF_BY_INSTRUCTION,
    NRIP_SAVED,
    TLB_CONTROL_FLUSH_ALL_ASID,
    TLB_CONTROL_FLUSH_ASID,
    TLB_CONTROL_FLUSH_ASID_LOCAL,
    TLB_CONTROL_NAMES,
    TLB_CONTROL_NEEDS_FLUSH_BY_ASID,
    exit_name,
    ioio_exitinfo1,
)
from fastmmio.sim.vmx.caches import SHIFT_1G, SHIFT_2M, SHIFT_4K, UNBOUNDED, Cache
from fastmmio.sim.vmx.guestops import GuestPaging
from fastmmio.sim.vmx.memory import HostMemory
from fastmmio.sim.vmx.walker import (
    FETCH,
    GLOBAL_PCID,
    NO_EPT,
    READ,
    WRITE,
    EptPscEntry,
    Fault,
    GpaEntry,
)
from fastmmio.x86 import paging as L

__all__ = ["SvmProcessor", "SvmExit", "Fault", "READ", "WRITE", "FETCH"]

# nested rights accumulated along a nested walk: bit 0 R (present), 1 W, 2 X (the EPT-style
# bits the shared guest walk tests), 3 U (user: required for every guest access, 15.25.7)
_N_R, _N_W, _N_X, _N_U = 1, 2, 4, 8
_N_ALL = _N_R | _N_W | _N_X | _N_U
_SHIFT = L.LEVEL_SHIFT
_LNAME = L.LEVEL_NAMES
_LEAF_SHIFT = {1: SHIFT_4K, 2: SHIFT_2M, 3: SHIFT_1G}
_CR4_SMAP = 1 << 21
_CR4_SMEP = 1 << 20


class SvmProcessor(GuestPaging):
    """One logical processor running a guest under SVM with nested paging.

    Construct with the host memory and a configuration name (``apm-max``, ``none``,
    ``zen4``) or a :class:`~fastmmio.sim.vmx.caches.TranslationCacheConfig`. Set the nested
    table root with :meth:`set_ncr3`, the guest state with ``load_guest_state``, enter with
    :meth:`vmrun`, and call :meth:`translate` for every guest memory access.

    Keyword arguments (processor properties): ``asid`` (1..2^32-1; ASID 0 is the host's);
    ``maxphyaddr``; ``nested_paging`` (NP_ENABLE); ``host_nxe`` (host EFER.NXE: nested NX
    honoured, else reserved); ``npt_1g`` / ``guest_1g`` (1 GiB pages); ``set_ad_bits``
    (guest A/D updates); ``nrips`` (CPUID Fn8000_000A_EDX[NRIPS]); ``next_rip_on_npf``
    (``"no"``: nRIP is zero on #NPF as 15.7.1 says; ``"yes"``: the processor fills it);
    ``decode_assists`` (CPUID Fn8000_000A_EDX[DecodeAssists]); ``sev_es``; ``erratum_1096``;
    ``flush_by_asid`` (CPUID Fn8000_000A_EDX[FlushByAsid]); ``assumptions`` (a dict of
    :data:`fastmmio.sim.svm.caches.ASSUMPTIONS` values); ``seed``.
    """

    _gpa_kind = "nested"  # event name of the nested dimension's caches

    def __init__(self, memory: HostMemory, config: Any = "apm-max", *, asid: int = 1,
                 maxphyaddr: int | None = None, nested_paging: bool = True,
                 host_nxe: bool = True, npt_1g: bool = True, guest_1g: bool = True,
                 set_ad_bits: bool = True, nrips: bool = True, next_rip_on_npf: str = "no",
                 decode_assists: bool = True, sev_es: bool = False,
                 erratum_1096: bool = False, flush_by_asid: bool = True,
                 assumptions: dict[str, str] | None = None, seed: int = 0):
        if not 1 <= asid < 1 << 32:
            raise SvmError(f"guest ASID must be 1..2^32-1 (0 is the host's, APM 15.25.1), "
                           f"got {asid}")
        if next_rip_on_npf not in ("yes", "no"):
            raise SvmError(f"next_rip_on_npf must be yes or no, got {next_rip_on_npf!r}")
        self.assumptions = resolve_assumptions(assumptions)
        cfg = get_config(config)
        if self.assumptions["nested_walk_cache"] == "no":
            cfg = without_nested_structures(cfg)
        self.ncr3 = 0
        self.host_nxe = host_nxe
        self.npt_1g = npt_1g
        self.nrips = nrips
        self.next_rip_on_npf = next_rip_on_npf
        self.decode_assists = decode_assists
        self.sev_es = sev_es
        self.erratum_1096 = erratum_1096
        self.flush_by_asid = flush_by_asid
        super().__init__(memory, cfg, maxphyaddr=maxphyaddr, ept=nested_paging,
                         execute_only=True, ept_1g=npt_1g, guest_1g=guest_1g,
                         vpid_enabled=True, vpid=asid, set_ad_bits=set_ad_bits, seed=seed)
        self._npf_cache = (Cache("nested_fault", UNBOUNDED)
                           if self.assumptions["nested_fault_caching"] == "faulting" else None)

    # ---------------------------------------------------------------------------------------
    # tags and derived state
    # ---------------------------------------------------------------------------------------

    @property
    def asid(self) -> int:
        """The current guest's ASID (the first element of every cached mapping's tag)."""
        return self.vpid

    @property
    def ep4ta(self) -> Any:
        """Tag of nested translations and nested walk-cache entries: the ASID (APM 15.16:
        ASIDs distinguish "different guest physical address spaces when nested page tables
        are used"); nCR3 is not part of it, so changing nCR3 without a flush or a new ASID
        leaves stale entries usable, as the APM warns. NO_EPT without nested paging."""
        return self.vpid if self.ept_enabled else NO_EPT

    def _derive_modes(self) -> None:
        super()._derive_modes()
        # nested A/D flags are always maintained and guest-table walks are writes (15.25.5)
        self._ept_ad = self.ept_enabled
        M = self.maxphyaddr
        self._nrsvd = {(lvl, ps): L.guest_reserved_mask(lvl, ps, M, self.host_nxe, self.npt_1g)
                       for lvl in (1, 2, 3, 4) for ps in (False, True)}
        self._ncr3_base = self.ncr3 & self._phys & ~0xFFF

    def set_ncr3(self, ncr3: int) -> None:
        """Set N_CR3 (loaded by the next VMRUN, 15.25.4; no invalidation). Bits at or above
        MAXPHYADDR are MBZ: VMRUN would fail with VMEXIT_INVALID."""
        if ncr3 < 0 or ncr3 >> self.maxphyaddr:
            raise SvmError(f"nCR3 {ncr3:#x}: MBZ bits set (APM 15.25.4)")
        self.ncr3 = ncr3
        self._derive()

    # ---------------------------------------------------------------------------------------
    # the nested dimension of the walk
    # ---------------------------------------------------------------------------------------

    def _npf_code(self, access: int, present: bool, rsv: bool, la: int | None,
                  translated: bool) -> int:
        """EXITINFO1 of a #NPF (15.25.6)."""
        ec = NPF_US
        if present:
            ec |= NPF_P
        if rsv:
            ec |= NPF_RSV
        if access == WRITE:
            ec |= NPF_RW
        elif access == FETCH:
            ec |= NPF_ID
        return ec | (NPF_FINAL_GPA if translated or la is None else NPF_GUEST_WALK)

    def _qual(self, access: int, perm: int, la: int | None, translated: bool) -> int:
        """A #NPF from cached rights (the shared walker calls this): the nested page was
        present (cached entries come only from present ones), so P = 1."""
        return self._npf_code(access, perm != 0, False, la, translated)

    def _ept_violation(self, la: int | None, gpa: int, q: int, structure: str,
                       level: int) -> Fault:
        """A #NPF with EXITINFO1 ``q``: drops the cached nested mappings of ``gpa`` and the
        TLB entries of ``la`` (see the module docstring)."""
        self._counts["inv.npf"] += 1
        self._invalidate_gpa_fault(la, gpa)
        self._notify("npf")
        return Fault("npf", linear=la, gpa=gpa, error_code=q, structure=structure,
                     level=level)

    @staticmethod
    def _nested_allows(perm: int, access: int) -> bool:
        return bool(perm & _N_U) and bool(perm & (1 << access))

    def _nested_fault(self, la: int | None, gpa: int, access: int, translated: bool,
                      present: bool, rsv: bool, perm: int, level: int) -> Fault:
        if self._npf_cache is not None:
            self._npf_cache.put(self._etag, gpa >> 12, (present, rsv, perm))
        ec = self._npf_code(access, present, rsv, la, translated)
        return self._ept_violation(la, gpa, ec, "nested", level)

    def _ept_translate(self, gpa: int, access: int, la: int | None,
                       translated: bool) -> tuple[int, int, int, bool] | Fault:
        """Guest-physical -> system-physical through the nested caches and the nested walk
        (15.25.5). Returns (spa, rights R/W/X, leaf shift, nested dirty known set) or a
        #NPF Fault."""
        if not self.ept_enabled:
            return (gpa, 7, SHIFT_1G, True)
        neg = self._npf_cache
        if neg is not None:
            hit = neg.get(self._etag, gpa >> 12)
            if hit is not None:
                present, rsv, perm = hit
                if not present or rsv or not self._nested_allows(perm, access):
                    self._counts["tlb.nested_fault.hit"] += 1
                    return self._nested_fault(la, gpa, access, translated, present, rsv,
                                              perm, 0)
        r = self._gpa_cached(gpa, access, la, translated)
        if r is not None:
            return r
        c = self._counts
        tag = self._etag
        mem = self.memory
        nxe = self.host_nxe
        table, perm, level = self._gpa_psc_start(gpa, self._ncr3_base, _N_ALL)
        while True:
            ea = table + ((gpa >> _SHIFT[level]) & 511) * 8
            value = mem.read_u64(ea)
            self._ref("nested", level, ea)
            if not value & L.PTE_P:
                return self._nested_fault(la, gpa, access, translated, False, False, 0, level)
            ps = level in (2, 3) and bool(value & L.PTE_PS)
            if value & self._nrsvd[(level, ps)]:
                return self._nested_fault(la, gpa, access, translated, True, True, perm, level)
            perm &= (_N_R | (_N_W if value & L.PTE_RW else 0) | (_N_U if value & L.PTE_US else 0)
                     | (0 if nxe and value & L.PTE_XD else _N_X))
            if not value & L.PTE_A:
                value |= L.PTE_A
                mem.write_u64(ea, value)
                c[f"walk.ad.nested.{_LNAME[level]}"] += 1
            if level == 1 or ps:
                break
            table = value & self._phys & ~0xFFF
            pc = self.epsc.get(level)
            if pc is not None:
                pc.put(tag, gpa >> _SHIFT[level], EptPscEntry(table, perm))
            level -= 1
        if not self._nested_allows(perm, access):
            return self._nested_fault(la, gpa, access, translated, True, False, perm, level)
        shift = _LEAF_SHIFT[level]
        mask = (1 << shift) - 1
        base = value & self._phys & ~mask
        dirty = bool(value & L.PTE_D)
        if access == WRITE and not dirty:
            mem.write_u64(ea, value | L.PTE_D)
            c[f"walk.ad.nested.{_LNAME[level]}"] += 1
            dirty = True
        rights = perm & 7
        self.gtlb.insert(tag, gpa, shift, GpaEntry(base, mask, rights, shift, dirty))
        return (base | (gpa & mask), rights, shift, dirty)

    # ---------------------------------------------------------------------------------------
    # VMRUN, #VMEXIT, TLB control, INVLPGA
    # ---------------------------------------------------------------------------------------

    def vmrun(self, tlb_control: int = 0, asid: int | None = None) -> SvmExit | None:
        """VMRUN: load the guest's ASID, apply TLB_CONTROL (Table 15-9), count
        ``vmentry``. ASID 0 gives #VMEXIT(VMEXIT_INVALID) (15.25.1), returned. VMRUN
        itself flushes nothing else (15.16)."""
        if tlb_control not in TLB_CONTROL_NAMES:
            raise SvmError(f"TLB_CONTROL {tlb_control:#x} is a reserved encoding (APM "
                           "Table 15-9: 00h, 01h, 03h, 07h)")
        if tlb_control in TLB_CONTROL_NEEDS_FLUSH_BY_ASID and not self.flush_by_asid:
            raise SvmError(f"TLB_CONTROL {tlb_control:#x} needs FlushByAsid, which this "
                           "processor does not have (APM 15.16.1)")
        if asid is not None:
            if asid == 0:
                return self.vmexit(SvmExit(EXIT_INVALID))
            if not 1 <= asid < 1 << 32:
                raise SvmError(f"ASID must be 1..2^32-1, got {asid}")
            self.vpid = asid
            self._derive_tags()
        self._tlb_control(tlb_control)
        self._counts["vmentry"] += 1
        return None

    def _tlb_control(self, value: int) -> None:
        if value == 0:
            return
        asid = self.asid
        if value == TLB_CONTROL_FLUSH_ALL_ASID:
            self.tlb.clear()
            for _, cache, _ in self._psc_order:
                cache.clear()
            self.gtlb.clear()
            for _, cache, _ in self._epsc_order:
                cache.clear()
            if self._npf_cache is not None:
                self._npf_cache.clear()
        else:
            if value == TLB_CONTROL_FLUSH_ASID:
                self.tlb.drop_tags(lambda t: t[0] == asid)
            else:
                assert value == TLB_CONTROL_FLUSH_ASID_LOCAL
                # global only within the ASID and only from guest tables (15.16, 15.25.7)
                self.tlb.drop_tags(lambda t: t[0] == asid and t[1] != GLOBAL_PCID)
            for _, cache, _ in self._psc_order:
                cache.drop_tags(lambda t: t[0] == asid)
            # nested translations are never global (15.25.7: the nested entry is irrelevant
            # to globality), so both 03h and 07h drop them
            self.gtlb.drop_tags(lambda t: t == asid)
            for _, cache, _ in self._epsc_order:
                cache.drop_tags(lambda t: t == asid)
            if self._npf_cache is not None:
                self._npf_cache.drop_tags(lambda t: t == asid)
        name = TLB_CONTROL_NAMES[value]
        self._counts[f"inv.tlb_control.{name}"] += 1
        self._notify(f"tlb_control.{name}")

    def vmexit(self, info: SvmExit) -> SvmExit:
        """#VMEXIT: counts ``exit.<NAME>`` (``exit.NPF``, ``exit.IOIO``, ...). It flushes
        nothing (15.16: VMRUN and #VMEXIT "do not flush the TLB")."""
        self._counts[f"exit.{info.name}"] += 1
        return info

    def invlpga(self, la: int, asid: int) -> None:
        """INVLPGA (15.16.2): the TLB mapping of the guest virtual page ``la`` in ``asid``
        (every PCID, globals included) and the guest walk-cache entries of that ASID that
        would translate it; never a nested translation."""
        self.tlb.discard_addr(la, lambda t: t[0] == asid)
        for lvl, cache, _ in self._psc_order:
            cache.discard_key((la & ((1 << 48) - 1)) >> _SHIFT[lvl], lambda t: t[0] == asid)
        self._counts["inv.invlpga"] += 1
        self._notify("invlpga")

    # ---------------------------------------------------------------------------------------
    # exit information
    # ---------------------------------------------------------------------------------------

    def _next_rip(self, code: int, rip: int, insn_len: int | None,
                  by_instruction: bool = False) -> int:
        """nRIP as 15.7.1 (and the ``next_rip_on_npf`` property for #NPF)."""
        if not self.nrips:
            return 0
        saved = code in NRIP_SAVED or (code in NRIP_IF_BY_INSTRUCTION and by_instruction)
        if code == EXIT_NPF:
            saved = self.next_rip_on_npf == "yes"
        if not saved:
            return 0
        if insn_len is None or not 1 <= insn_len <= 15:
            raise SvmError(f"exit {exit_name(code)}: the processor saves nRIP, so the "
                           f"instruction length (1..15) is needed, got {insn_len}")
        return (rip + insn_len) & 0xFFFF_FFFF_FFFF_FFFF

    def guest_instruction_bytes(self, rip: int, fetch_fault: bool) -> bytes | None:
        """What DecodeAssists records on a #NPF at guest RIP ``rip`` (15.8.4): None without
        DecodeAssists, no bytes for an instruction-fetch fault, for SEV-ES, or under
        erratum 1096 with CR4.SMAP = 1 and a user code page; else up to 15 bytes, as many
        as translate. The processor's own reads are not counted as guest references."""
        if not self.decode_assists:
            return None
        if fetch_fault or self.sev_es:
            return b""
        out = bytearray()
        with self.uncounted():
            if self.erratum_1096 and self.cr4 & _CR4_SMAP:
                # the microcode reads CS:RIP as a CPL-0 data read: SMAP refuses a user page
                if not isinstance(self.translate(rip, READ, cpl=3), Fault):
                    return b""
            la = rip
            while len(out) < 15:
                spa = self.translate(la, FETCH)
                if isinstance(spa, Fault):
                    break
                n = min(15 - len(out), 0x1000 - (la & 0xFFF))
                out += self.memory.read_bytes(spa, n)
                la += n
        return bytes(out)

    def npf_exit(self, fault: Fault, rip: int, insn_len: int | None = None) -> SvmExit:
        """The #VMEXIT(NPF) of ``fault`` (15.25.6): EXITINFO1 its error code, EXITINFO2 its
        guest-physical address, nRIP zero unless ``next_rip_on_npf`` is yes (and zero for
        an instruction-fetch #NPF, and for one met while the instruction itself could not be
        fetched (``insn_len`` None: e.g. a guest-table walk for its fetch), either way: there
        is no length to add), guest instruction bytes from ``rip`` (15.8.4). Counted by
        :meth:`vmexit`."""
        if fault.kind != "npf":
            raise SvmError(f"{fault!r} is not a nested page fault")
        assert fault.gpa is not None
        fetch = bool(fault.error_code & NPF_ID)
        insn = self.guest_instruction_bytes(rip, fetch)
        nrip = 0 if fetch or insn_len is None else self._next_rip(EXIT_NPF, rip, insn_len)
        return self.vmexit(SvmExit(EXIT_NPF, fault.error_code, fault.gpa, nrip, insn))

    def intercept_exit(self, code: int, rip: int, insn_len: int | None = None,
                       exitinfo1: int = 0, exitinfo2: int = 0,
                       by_instruction: bool = False) -> SvmExit:
        """An intercept other than #NPF: nRIP as 15.7.1 (``by_instruction``: a #BP, #OF or
        #BR raised by INT3, INTO or BOUND); the instruction-bytes count cleared (15.8.4:
        "All other intercepts clear bits 7:0")."""
        if code == EXIT_NPF:
            raise SvmError("use npf_exit for a nested page fault")
        return self.vmexit(SvmExit(code, exitinfo1, exitinfo2,
                                   self._next_rip(code, rip, insn_len, by_instruction),
                                   b"" if self.decode_assists else None))

    def ioio_exit(self, port: int, size: int, is_in: bool, rip: int, insn_len: int,
                  string: bool = False, rep: bool = False) -> SvmExit:
        """An IOIO intercept (15.10.2): EXITINFO1 port/size/direction (Figure 15-2),
        EXITINFO2 the RIP of the next instruction, nRIP the same (15.7.1)."""
        if not 1 <= insn_len <= 15:
            raise SvmError(f"instruction length must be 1..15, got {insn_len}")
        info1 = ioio_exitinfo1(port, size, is_in, string, rep)
        return self.intercept_exit(EXIT_IOIO, rip, insn_len, info1,
                                   (rip + insn_len) & 0xFFFF_FFFF_FFFF_FFFF)

    # ---------------------------------------------------------------------------------------
    # introspection
    # ---------------------------------------------------------------------------------------

    def has_nested_translation(self, gpa: int) -> bool:
        """Whether a nested translation for ``gpa`` is cached for the current ASID."""
        return self.has_gpa_translation(gpa)

    def has_nested_fault_cached(self, gpa: int) -> bool:
        """Whether a faulting nested result for ``gpa``'s page is kept (assumption
        ``nested_fault_caching=faulting`` only)."""
        c = self._npf_cache
        if c is None:
            return False
        t = c.tables.get(self._etag)
        return t is not None and (gpa >> 12) in t
