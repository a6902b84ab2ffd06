"""The simulated logical processor (the vCPU view): translation through its caches, VM exits
and entries, and the instructions and events that invalidate cached translation information.

This is what the simulator CPU and the KVM model call. It knows nothing of KVM: it only
implements what the SDM says a VMX processor with EPT does.

Invalidations (SDM Vol. 3, 2016: 4.10.4.1 and 28.3.3.1):

=====================================  ========================================================
operation                              invalidates
=====================================  ========================================================
VM exit / VM entry, "enable VPID" = 0  linear and combined mappings of VPID 0000H, all PCIDs,
                                       all EP4TAs (28.3.3.1); nothing when "enable VPID" = 1
                                       (28.3.3.2)
INVEPT single-context (type 1)         guest-physical mappings of the EP4TA, combined mappings
                                       of the EP4TA for all VPIDs and PCIDs
INVEPT all-context (type 2)            all guest-physical and combined mappings
INVVPID individual address (type 0)    linear and combined mappings of the VPID that would
                                       translate the address, all PCIDs, all EP4TAs
INVVPID single context (type 1)        linear and combined mappings of the VPID
INVVPID all contexts (type 2)          linear and combined mappings of every VPID but 0000H
INVVPID single context, retaining      as type 1 except global translations
globals (type 3)
MOV to CR3                             TLB entries of the current VPID and the PCID being
                                       established (000H without CR4.PCIDE), except global
                                       ones, and all its paging-structure-cache entries; none
                                       when CR4.PCIDE = 1 and source bit 63 = 1 (4.10.4.1)
INVLPG                                 TLB entries for the page (current VPID and PCID, global
                                       ones for any PCID) and all paging-structure-cache
                                       entries of the current PCID (4.10.4.1); all EP4TAs
                                       (28.3.3.1)
MOV to CR4 changing PGE, or PCIDE 1->0 all TLB and PSC entries of the current VPID (4.10.4.1)
MOV to CR0 changing PG 1->0            the same
=====================================  ========================================================

None of these touches guest-physical mappings except INVEPT and EPT violations (28.3.3.2).
"""

from __future__ import annotations

from typing import Any

from fastmmio.sim.vmx.errors import VmxError
from fastmmio.sim.vmx.exits import (
    EXIT_EPT_MISCONFIG,
    EXIT_EPT_VIOLATION,
    EXIT_REASONS,
    ExitInfo,
)
from fastmmio.sim.vmx.layouts import EPTP, MT_UC, MT_WB, eptp_ep4ta
from fastmmio.sim.vmx.memory import HostMemory
from fastmmio.sim.vmx.guestops import GuestPaging
from fastmmio.sim.vmx.walker import (
    FETCH,
    GLOBAL_PCID,
    NO_EPT,
    READ,
    WRITE,
    Fault,
)

__all__ = ["Processor", "Fault", "ExitInfo", "READ", "WRITE", "FETCH",
           "INVEPT_SINGLE", "INVEPT_ALL", "INVVPID_ADDRESS", "INVVPID_SINGLE",
           "INVVPID_ALL", "INVVPID_SINGLE_RETAIN_GLOBALS"]

INVEPT_SINGLE, INVEPT_ALL = 1, 2
INVVPID_ADDRESS, INVVPID_SINGLE, INVVPID_ALL, INVVPID_SINGLE_RETAIN_GLOBALS = 0, 1, 2, 3
_INVVPID_NAMES = {0: "address", 1: "single", 2: "all", 3: "single_retain_globals"}
_EXIT_EVENTS = {reason: f"exit.{name}" for reason, name in EXIT_REASONS.items()}
_EXIT_INFO_MEMO = 4096  # distinct EPT exits kept by exit_info


class Processor(GuestPaging):
    """One logical processor in VMX non-root operation with EPT (the guest's own
    instructions, memory accesses and introspection come from
    :class:`~fastmmio.sim.vmx.guestops.GuestPaging`).

    Construct with the host memory and a cache configuration name (``sdm-max``, ``none``,
    ``skylake-sp``, ``golden-cove``) or a :class:`~fastmmio.sim.vmx.caches.TranslationCacheConfig`.
    Then set the guest state (``load_guest_state`` or the setters) and the EPTP, and call
    :meth:`translate` for every guest memory access.

    Keyword arguments: ``maxphyaddr``; ``ept`` ("enable EPT"); ``execute_only`` (EPT
    execute-only translations supported, IA32_VMX_EPT_VPID_CAP bit 0); ``ept_1g`` / ``guest_1g``
    (1 GiB pages supported); ``vpid_enabled`` and ``vpid``; ``set_ad_bits`` (write guest
    accessed/dirty flags); ``seed`` (random replacement); ``walk_memo`` (default True: replay
    a walk that ended in an EPT misconfiguration while nothing it depends on changed; False:
    walk every time, the reference; the attribute may be flipped at any time).
    """

    def __init__(self, memory: HostMemory, config: Any = "sdm-max", **kw: Any):
        super().__init__(memory, config, **kw)
        self._exit_infos: dict[tuple, ExitInfo] = {}  # see exit_info
        self._last_exit: tuple = (None, None, None)  # (fault, length, its exit information)
        if self.vpid_enabled and not 1 <= self.vpid <= 0xFFFF:
            raise VmxError(f"VPID must be 1..65535 when enabled, got {self.vpid}")

    # ---------------------------------------------------------------------------------------
    # state loading (VM entry loads guest state; the VMM sets controls)
    # ---------------------------------------------------------------------------------------

    def set_eptp(self, eptp: int) -> None:
        """Set the EPTP VM-execution control (no invalidation: mappings are tagged by EP4TA).
        Only a 4-level walk and UC/WB paging-structure memory types are accepted (the
        checks VM entry makes, SDM 26.2.1.1)."""
        f = EPTP.decode(eptp)
        if f["walk_length_minus_1"] != 3:
            raise VmxError(f"EPTP {eptp:#x}: only a 4-level EPT walk is modelled")
        if f["memtype"] not in (MT_UC, MT_WB):
            raise VmxError(f"EPTP {eptp:#x}: memory type must be UC (0) or WB (6)")
        if f["rsvd11_7"] or eptp >> self.maxphyaddr:
            raise VmxError(f"EPTP {eptp:#x}: reserved bits set")
        self.eptp = eptp
        self._derive()

    def set_vpid(self, vpid: int, enabled: bool = True) -> None:
        """Set the "enable VPID" control and the VPID field (no invalidation by itself)."""
        if enabled and not 1 <= vpid <= 0xFFFF:
            raise VmxError(f"VPID must be 1..65535 when enabled, got {vpid}")
        self.vpid_enabled = enabled
        self.vpid = vpid
        self._derive_tags()

    # ---------------------------------------------------------------------------------------
    # VM exits and entries
    # ---------------------------------------------------------------------------------------

    def exit_info(self, fault: Fault, instruction_length: int | None = None) -> ExitInfo:
        """The exit information an EPT violation or misconfiguration leaves (27.2.1):
        qualification (0 for a misconfiguration), GPA, GLA when qualification bit 7 is set.
        ``instruction_length`` is what the processor writes although the architecture leaves
        it undefined for these exits (bare metal fills it; pass None to model a CPU that
        does not). The information is immutable: the same exit (a doorbell's, again and
        again) is built once and handed out again."""
        last = self._last_exit
        if last[0] is fault and last[1] == instruction_length:
            return last[2]  # (the same fault again: a replayed walk's, see Walker._replay)
        kind = fault.kind
        key = (kind, fault.qualification, fault.gpa, fault.linear, instruction_length)
        info = self._exit_infos.get(key)
        if info is not None:
            self._last_exit = (fault, instruction_length, info)
            return info
        if kind == "ept_violation":
            gla = fault.linear if fault.qualification & (1 << 7) else None
            info = ExitInfo(EXIT_EPT_VIOLATION, fault.qualification, fault.gpa, gla,
                            instruction_length)
        elif kind == "ept_misconfig":
            info = ExitInfo(EXIT_EPT_MISCONFIG, 0, fault.gpa, None, instruction_length)
        else:
            raise VmxError(f"{fault!r} is not a VM exit (a guest fault is delivered to the guest)")
        if len(self._exit_infos) >= _EXIT_INFO_MEMO:
            self._exit_infos.clear()  # (a fuzzer's many addresses: keep the memo small)
        self._exit_infos[key] = info
        self._last_exit = (fault, instruction_length, info)
        return info

    def vmexit(self, info: ExitInfo | int) -> ExitInfo:
        """A VM exit: counts ``exit.<REASON>``; with "enable VPID" = 0 it invalidates linear
        and combined mappings for VPID 0000H (all PCIDs, all EP4TAs; SDM 28.3.3.1).
        ``info`` may be a bare exit-reason number."""
        if isinstance(info, int):
            if info not in EXIT_REASONS:
                raise VmxError(f"unknown basic exit reason {info}")
            info = ExitInfo(info, instruction_length_defined=False)
        self._counts[_EXIT_EVENTS[info.reason]] += 1
        if not self.vpid_enabled:
            self._drop_linear_combined(lambda t: t[0] == 0, "vmexit_novpid")
        return info

    def vmentry(self) -> None:
        """A VM entry: counts ``vmentry``; with "enable VPID" = 0 it invalidates linear and
        combined mappings for VPID 0000H (SDM 28.3.3.1)."""
        self._counts["vmentry"] += 1
        if not self.vpid_enabled:
            self._drop_linear_combined(lambda t: t[0] == 0, "vmentry_novpid")

    # ---------------------------------------------------------------------------------------
    # invalidating instructions
    # ---------------------------------------------------------------------------------------

    def invept(self, inv_type: int, eptp: int | None = None) -> None:
        """INVEPT (SDM 28.3.3.1, Chapter 30): type 1 single-context for ``eptp``'s EP4TA,
        type 2 all-context."""
        if inv_type == INVEPT_SINGLE:
            if eptp is None:
                raise VmxError("INVEPT single-context needs an EPTP")
            ep4ta = eptp_ep4ta(eptp)
            self.gtlb.drop_tags(lambda t: t == ep4ta)
            for _, cache, _ in self._epsc_order:
                cache.drop_tags(lambda t: t == ep4ta)
            self._drop_linear_combined(lambda t: t[2] == ep4ta, None)
            self._counts["inv.invept_single"] += 1
            self._notify("invept_single")
        elif inv_type == INVEPT_ALL:
            self.gtlb.clear()
            for _, cache, _ in self._epsc_order:
                cache.clear()
            self._drop_linear_combined(lambda t: t[2] != NO_EPT, None)
            self._counts["inv.invept_all"] += 1
            self._notify("invept_all")
        else:
            raise VmxError(f"INVEPT type must be 1 or 2, got {inv_type}")

    def invvpid(self, inv_type: int, vpid: int, la: int = 0) -> None:
        """INVVPID (SDM 28.3.3.1, Chapter 30): type 0 individual address, 1 single context,
        2 all contexts (VPID ignored), 3 single context retaining globals. Types 0, 1 and 3
        with VPID 0 fail (VMfailValid), as does type 0 with a non-canonical address."""
        if inv_type not in _INVVPID_NAMES:
            raise VmxError(f"INVVPID type must be 0..3, got {inv_type}")
        if inv_type != INVVPID_ALL and vpid == 0:
            raise VmxError("INVVPID with VPID 0 fails (VMfailValid, SDM Chapter 30)")
        if inv_type == INVVPID_ADDRESS:
            if not (la >> 47 == 0 or la >> 47 == 0x1FFFF):
                raise VmxError(f"INVVPID address {la:#x} is not canonical (VMfailValid)")
            self.tlb.discard_addr(la, lambda t: t[0] == vpid)
            for lvl, cache, _ in self._psc_order:
                key = (la & ((1 << 48) - 1)) >> {2: 21, 3: 30, 4: 39}[lvl]
                cache.discard_key(key, lambda t: t[0] == vpid)
            self._counts["inv.invvpid_address"] += 1
            self._notify("invvpid_address")
        elif inv_type == INVVPID_SINGLE:
            self._drop_linear_combined(lambda t: t[0] == vpid, "invvpid_single")
        elif inv_type == INVVPID_ALL:
            self._drop_linear_combined(lambda t: t[0] != 0, "invvpid_all")
        else:
            self.tlb.drop_tags(lambda t: t[0] == vpid and t[1] != GLOBAL_PCID)
            for _, cache, _ in self._psc_order:
                cache.drop_tags(lambda t: t[0] == vpid)
            self._counts["inv.invvpid_single_retain_globals"] += 1
            self._notify("invvpid_single_retain_globals")
