"""KVM's TDP MMU: the SPTEs written here *are* the EPT or nested page tables the processor
model walks.

Models arch/x86/kvm/mmu/{mmu.c, tdp_mmu.c, spte.c, spte.h} (Linux 6.16; 68c3b4d1 for the fast MMIO bus). The SPTE format is
data (:class:`fastmmio.sim.kvm.spte.SpteFormat`): the same MMU writes EPT entries under VMX
and NPT entries under SVM (``make_spte``, ``make_nonleaf_spte`` and ``make_mmio_spte`` build
from the format's masks, as spte.c does from its ``shadow_*_mask`` variables). On NPT an MMIO
SPTE is reserved bit 51 plus present (plus W and U), which the processor reports as a #NPF
with the RSV bit, the same reserved-bit fault KVM sees as an EPT misconfiguration on VMX; at
MAXPHYADDR 52 there is no MMIO caching (see :mod:`fastmmio.sim.kvm.spte`).

SPTE encoding on EPT (``kvm_mmu_set_ept_masks``, ``make_spte``, ``make_nonleaf_spte``,
``make_mmio_spte``):

* a non-present SPTE is ``SHADOW_NONPRESENT_VALUE`` (bit 63, "suppress #VE"), bits 2:0 = 0;
* a present SPTE has ``SPTE_MMU_PRESENT_MASK`` (bit 11), R and X, memory type WB with
  ignore-PAT, and W plus the MMU-writable bit (58) only when the memslot is writable; with EPT
  A/D enabled the accessed bit is set at creation and the dirty bit on writable SPTEs,
  without it the SPTE is marked ``SPTE_TDP_AD_DISABLED`` (bits 53:52 = 01b);
* non-leaf SPTEs are R|W|X plus the present bit and (with A/D) the accessed bit;
* an MMIO SPTE is W|X with R clear (110b: the processor reports an EPT misconfiguration),
  the gfn in bits 51:12, and the low 19 bits of the memslot generation split into bits 10:3
  (8 bits) and 62:52 (11 bits); it is recognised by ``(spte & (RWX|SVE)) == 110b``.

Fault handling (``kvm_mmu_page_fault``):

* a reserved-bit fault (EPT misconfiguration, ``PFERR_RSVD_MASK``) goes to
  ``handle_mmio_page_fault``: the per-vCPU MMIO info first (``mmio_info_in_cache``), then a
  lockless walk to the SPTE; an MMIO SPTE of the current generation means "emulate"; a stale
  generation (or an update in progress) sends the fault down the page-fault path; anything
  else (the SPTE was zapped) retries;
* ``fast_page_fault`` (``page_fault_can_be_fast``): never for reserved-bit faults;
  not-present faults only when KVM's A/D bits are off (access tracking); otherwise write
  faults only. It fixes in place a spurious fault, an access-tracked SPTE, or a write to an
  MMU-writable SPTE;
* the slow path: the memslot (looked up first, ``kvm_mmu_do_page_fault``); no memslot ->
  ``kvm_handle_noslot_fault`` (MMIO info cached; emulate at once when ``mmio_caching`` is
  off, else install an MMIO SPTE and emulate); a write to a read-only memslot ->
  ``KVM_PFN_ERR_RO_FAULT`` -> ``kvm_handle_error_pfn`` returns "emulate" without caching
  anything as MMIO (the "bad page" path); otherwise ``kvm_tdp_mmu_map`` installs a 4 KiB SPTE
  (read-only for a read-only memslot).

Memslot changes (``kvm_arch_memslots_updated`` -> ``kvm_mmu_invalidate_mmio_sptes``: zap all
when the MMIO generation wraps; ``kvm_arch_flush_shadow_memslot`` for DELETE/MOVE:
``kvm_mmu_zap_all_fast`` under the default ``KVM_X86_QUIRK_SLOT_ZAP_ALL``, else the slot's
range). A fast zap makes a new root: the vCPU must load the new EPTP and flush it
(``kvm_mmu_load`` -> ``flush_tlb_current``); zapping present SPTEs needs a remote TLB flush.
Those are *requests* (:attr:`TdpMmu.requests`) the vCPU services before the next VM entry
(:meth:`TdpMmu.service_requests`).

Only 4 KiB mappings are made (KVM would use huge pages where the host backing is huge);
dirty logging and the shadow MMU are not modelled.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Callable

from fastmmio.sim.kvm.emulator import EMULTYPE_ALLOW_RETRY_PF, EMULTYPE_PF, VcpuMmioInfo
from fastmmio.sim.kvm.guestmem import (
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_WRITE_MASK,
)
from fastmmio.sim.kvm.memslots import (
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KvmMemorySlot,
    KvmMemslots,
)
from fastmmio.sim.kvm.spte import (
    ACC_ALL,
    PT_PRESENT_MASK,
    PT_WRITABLE_MASK,
    SHADOW_NONPRESENT_VALUE,
    SPTE_MMU_PRESENT_MASK,
    SpteFormat,
    ept_format,
)
from fastmmio.sim.vmx.layouts import EPT_RWX, EPT_SVE, EPT_W, EPT_X
from fastmmio.sim.vmx.layouts import make_eptp
from fastmmio.sim.vmx.memory import HostMemory, PageAllocator

PFERR_GUEST_FINAL_MASK = 1 << 32
PFERR_GUEST_PAGE_MASK = 1 << 33

SPTE_TDP_AD_SHIFT = 52
SPTE_TDP_AD_MASK = 3 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_ENABLED = 0
SPTE_TDP_AD_DISABLED = 1 << SPTE_TDP_AD_SHIFT
SHADOW_ACC_TRACK_SAVED_BITS_SHIFT = 54
_EPT = ept_format()
SHADOW_ACC_TRACK_SAVED_BITS_MASK = _EPT.acc_track_saved_mask
EPT_SPTE_HOST_WRITABLE = _EPT.host_writable_mask
EPT_SPTE_MMU_WRITABLE = _EPT.mmu_writable_mask
SPTE_BASE_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF

VMX_EPT_MISCONFIG_WX_VALUE = EPT_W | EPT_X
SHADOW_MMIO_MASK = EPT_RWX | EPT_SVE
SHADOW_MMIO_VALUE = VMX_EPT_MISCONFIG_WX_VALUE

MMIO_SPTE_GEN_LOW_START, MMIO_SPTE_GEN_LOW_END = 3, 10
MMIO_SPTE_GEN_HIGH_START, MMIO_SPTE_GEN_HIGH_END = 52, 62
MMIO_SPTE_GEN_LOW_BITS = MMIO_SPTE_GEN_LOW_END - MMIO_SPTE_GEN_LOW_START + 1  # 8
MMIO_SPTE_GEN_HIGH_BITS = MMIO_SPTE_GEN_HIGH_END - MMIO_SPTE_GEN_HIGH_START + 1  # 11
MMIO_SPTE_GEN_MASK = (1 << (MMIO_SPTE_GEN_LOW_BITS + MMIO_SPTE_GEN_HIGH_BITS)) - 1  # 19 bits
_GEN_LOW_MASK = ((1 << MMIO_SPTE_GEN_LOW_BITS) - 1) << MMIO_SPTE_GEN_LOW_START
_GEN_HIGH_MASK = ((1 << MMIO_SPTE_GEN_HIGH_BITS) - 1) << MMIO_SPTE_GEN_HIGH_START

ROOT_LEVEL = 4
PT_ENTRIES = 512


class RetPf(IntEnum):
    """``enum`` RET_PF_* (arch/x86/kvm/mmu/mmu_internal.h)."""

    CONTINUE = 0
    RETRY = 1
    EMULATE = 2
    WRITE_PROTECTED = 3
    INVALID = 4
    FIXED = 5
    SPURIOUS = 6


# --------------------------------------------------------------------------------------------
# SPTE helpers (spte.h)
# --------------------------------------------------------------------------------------------


def generation_mmio_spte_mask(gen: int) -> int:
    """Spread the low 19 bits of a memslot generation over SPTE bits 10:3 and 62:52."""
    gen &= MMIO_SPTE_GEN_MASK
    low = gen & ((1 << MMIO_SPTE_GEN_LOW_BITS) - 1)
    high = gen >> MMIO_SPTE_GEN_LOW_BITS
    return (low << MMIO_SPTE_GEN_LOW_START) | (high << MMIO_SPTE_GEN_HIGH_START)


def get_mmio_spte_generation(spte: int) -> int:
    low = (spte & _GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_START
    high = (spte & _GEN_HIGH_MASK) >> MMIO_SPTE_GEN_HIGH_START
    return low | (high << MMIO_SPTE_GEN_LOW_BITS)


def make_mmio_spte(gfn: int, generation: int, fmt: SpteFormat = _EPT, access: int = ACC_ALL) -> int:
    """``make_mmio_spte``: the format's MMIO value, the access bits it keeps
    (``shadow_mmio_access_mask``: none on EPT, W and U on NPT), the gfn and the generation."""
    return (generation_mmio_spte_mask(generation) | fmt.mmio_value
            | (access & fmt.mmio_access_mask) | (gfn << 12))


def get_mmio_spte_gfn(spte: int, fmt: SpteFormat = _EPT) -> int:
    """The gfn of an MMIO SPTE (the generation's high bits and the MMIO mask stripped)."""
    return (spte & SPTE_BASE_ADDR_MASK & ~_GEN_HIGH_MASK & ~fmt.mmio_mask) >> 12


def is_shadow_present_pte(spte: int) -> bool:
    return bool(spte & SPTE_MMU_PRESENT_MASK)


def spte_ad_enabled(spte: int) -> bool:
    return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_DISABLED


def is_access_track_spte(spte: int, fmt: SpteFormat = _EPT) -> bool:
    """An access-tracked SPTE: A/D disabled and R/W/X all clear (``shadow_acc_track_mask``;
    only formats whose A/D bits are optional have one)."""
    return fmt.ad_optional and not spte_ad_enabled(spte) and (spte & EPT_RWX) == 0


def is_writable_pte(spte: int) -> bool:
    return bool(spte & PT_WRITABLE_MASK)


def is_mmu_writable_spte(spte: int, fmt: SpteFormat = _EPT) -> bool:
    return bool(spte & fmt.mmu_writable_mask)


def is_executable_pte(spte: int, fmt: SpteFormat = _EPT) -> bool:
    """``is_executable_pte``: the X bit set (EPT) or the NX bit clear (NPT)."""
    return (spte & (fmt.x_mask | fmt.nx_mask)) == fmt.x_mask


def spte_to_pfn(spte: int) -> int:
    return (spte & SPTE_BASE_ADDR_MASK) >> 12


@dataclass(frozen=True)
class KvmPageFault:
    """``struct kvm_page_fault`` (the parts the TDP MMU uses)."""

    addr: int
    error_code: int
    exec: bool
    write: bool
    present: bool
    rsvd: bool
    gfn: int

    @classmethod
    def from_error_code(cls, gpa: int, error_code: int) -> "KvmPageFault":
        return cls(gpa, error_code, bool(error_code & PFERR_FETCH_MASK),
                   bool(error_code & PFERR_WRITE_MASK), bool(error_code & PFERR_PRESENT_MASK),
                   bool(error_code & PFERR_RSVD_MASK), gpa >> 12)


def is_access_allowed(fault: KvmPageFault, spte: int, fmt: SpteFormat = _EPT) -> bool:
    """``is_access_allowed``: exec needs an executable SPTE, write needs W, read needs bit 0
    (``PT_PRESENT_MASK``: EPT's R, NPT's P)."""
    if fault.exec:
        return is_executable_pte(spte, fmt)
    if fault.write:
        return bool(spte & PT_WRITABLE_MASK)
    return bool(spte & PT_PRESENT_MASK)


@dataclass(frozen=True)
class PageFaultResult:
    """What ``kvm_mmu_page_fault`` decided, before it would call the emulator.

    ``ret``: the RET_PF_* value; ``emulation_type``: the EMULTYPE_* flags it would pass to
    ``x86_emulate_instruction`` when ``ret`` is EMULATE; ``path``: which way the fault went
    (``mmio_info``, ``mmio_spte``, ``mmio_spte_stale``, ``mmio_spte_zapped``, ``fast``,
    ``spurious``, ``noslot_mmio_spte``, ``noslot_no_caching``, ``ro_write``, ``map``,
    ``guest_page_write``, ``invalid_slot``, ``hook``)."""

    ret: RetPf
    emulation_type: int = 0
    path: str = ""


# --------------------------------------------------------------------------------------------
# the MMU
# --------------------------------------------------------------------------------------------


class TdpMmu:
    """The TDP MMU of one VM (one root; one vCPU's MMIO info).

    ``memory``/``alloc``: host memory and the allocator for SPTE tables. ``memslots``: the
    memslot set (its hooks are registered here). Options: ``mmio_caching``
    (``kvm.mmio_caching``; forced off when the format has no MMIO value, as
    ``kvm_mmu_set_mmio_spte_mask`` does), ``ad_enabled`` (``kvm_intel.eptad``: EPT A/D bits;
    NPT always has them), ``spte_format``: ``"ept"`` (default) or an
    :class:`~fastmmio.sim.kvm.spte.SpteFormat` (``npt_format(phys_bits)`` under SVM),
    ``slot_zap_all`` (``KVM_X86_QUIRK_SLOT_ZAP_ALL``), ``maxphyaddr`` (host, for
    ``kvm_mmu_max_gfn``).

    Variant hooks (``None`` upstream):

    * ``ro_write_fault_hook(gpa) -> bool``: called where a write to a read-only memslot is
      turned into "emulate" (``kvm_handle_error_pfn`` with ``KVM_PFN_ERR_RO_FAULT``); True
      means the hook handled the access (and skipped the instruction): the fault returns
      RETRY;
    * ``mmio_spte_for_readonly_hook(gfn) -> bool``: called before a read-only memslot page is
      mapped; True installs an MMIO SPTE instead of a read-only one.
    """

    def __init__(self, memory: HostMemory, alloc: PageAllocator, memslots: KvmMemslots,
                 events: Counter | None = None, *, mmio_caching: bool = True,
                 ad_enabled: bool = True, slot_zap_all: bool = True, maxphyaddr: int = 46,
                 mmio_info: VcpuMmioInfo | None = None, spte_format: "SpteFormat | str" = "ept"):
        self.memory = memory
        self.alloc = alloc
        self.memslots = memslots
        self.events: Counter = events if events is not None else memslots.events
        if isinstance(spte_format, str):
            if spte_format != "ept":
                raise ValueError(f"spte_format: 'ept' or an SpteFormat, got {spte_format!r}")
            spte_format = ept_format(ad_enabled)
        self.fmt: SpteFormat = spte_format
        self.mmio_caching = mmio_caching and spte_format.mmio_value != 0
        self.ad_enabled = spte_format.ad_enabled
        self.slot_zap_all = slot_zap_all
        self.maxphyaddr = maxphyaddr
        self.mmio_info = mmio_info if mmio_info is not None else VcpuMmioInfo(lambda: memslots.generation)
        self.requests: set[str] = set()
        self.stats: Counter = Counter()  # KVM's own vCPU stats (pf_taken, pf_fixed, ...)
        self.tables: set[int] = set()
        self.ro_write_fault_hook: Callable[[int], bool] | None = None
        self.mmio_spte_for_readonly_hook: Callable[[int], bool] | None = None
        self.root_hpa = self._alloc_table()
        memslots.flush_hooks.append(self.flush_shadow_memslot)
        memslots.updated_hooks.append(self.invalidate_mmio_sptes)

    # -- tables -----------------------------------------------------------------------------

    @property
    def eptp(self) -> int:
        """The EPTP of the current root (``construct_eptp``: WB, 4 levels, A/D if enabled)."""
        if self.fmt.name != "ept":
            raise ValueError("an NPT MMU has no EPTP (its root goes to nCR3: root_hpa)")
        return make_eptp(self.root_hpa, ad=self.ad_enabled)

    def _alloc_table(self) -> int:
        hpa = self.alloc.alloc_page()
        self.memory.write_bytes(hpa, SHADOW_NONPRESENT_VALUE.to_bytes(8, "little") * PT_ENTRIES)
        self.tables.add(hpa)
        self.events["kvm.mmu.table_alloc"] += 1
        return hpa

    @staticmethod
    def _index(gfn: int, level: int) -> int:
        return (gfn >> (9 * (level - 1))) & (PT_ENTRIES - 1)

    def _nonleaf(self, child: int) -> int:
        """``make_nonleaf_spte``: present, writable, user and executable (the child's
        entries decide)."""
        f = self.fmt
        spte = (child | SPTE_MMU_PRESENT_MASK | f.present_mask | PT_WRITABLE_MASK | f.user_mask
                | f.x_mask)
        spte |= f.accessed_mask if self.ad_enabled else SPTE_TDP_AD_DISABLED
        return spte

    def walk(self, gfn: int) -> list[tuple[int, int, int]]:
        """The lockless walk (``kvm_tdp_mmu_get_walk``): ``(level, sptep, spte)`` from the root
        down to the last level reached (stops below a non-present or leaf SPTE)."""
        out = []
        table = self.root_hpa
        for level in range(ROOT_LEVEL, 0, -1):
            sptep = table + 8 * self._index(gfn, level)
            spte = self.memory.read_u64(sptep)
            out.append((level, sptep, spte))
            if level == 1 or not is_shadow_present_pte(spte):
                break
            table = spte & SPTE_BASE_ADDR_MASK
        return out

    def get_spte(self, gpa: int) -> int:
        """The last SPTE on the walk for ``gpa`` (the leaf when the path is present)."""
        return self.walk(gpa >> 12)[-1][2]

    # -- SPTE construction ------------------------------------------------------------------

    def make_spte(self, slot: KvmMemorySlot, gfn: int, old_spte: int, prefetch: bool = False) -> int:
        """``make_spte`` for a 4 KiB leaf with ACC_ALL, host-writable unless the slot is
        read-only: present, executable (``shadow_x_mask``, or no ``shadow_nx_mask``), user,
        the format's memory type, accessed unless prefetched; W, the MMU-writable bit and
        dirty for a writable slot."""
        f = self.fmt
        spte = SPTE_MMU_PRESENT_MASK | f.present_mask | f.x_mask | f.user_mask | f.memtype_mask
        spte |= SPTE_TDP_AD_ENABLED if self.ad_enabled else SPTE_TDP_AD_DISABLED
        if not prefetch and self.ad_enabled:
            spte |= f.accessed_mask
        spte |= slot.gfn_to_hpa(gfn)
        if not slot.readonly:
            spte |= f.host_writable_mask | PT_WRITABLE_MASK | f.mmu_writable_mask
            if self.ad_enabled:
                spte |= f.dirty_mask
        return spte

    def is_mmio_spte(self, spte: int) -> bool:
        """``is_mmio_spte``: the MMIO value under the MMIO mask, and caching enabled."""
        return (spte & self.fmt.mmio_mask) == self.fmt.mmio_value and self.mmio_caching

    def check_mmio_spte(self, spte: int) -> bool:
        """``check_mmio_spte``: no memslot update in progress and the generations agree."""
        gen = self.memslots.generation
        if gen & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
            return False
        return (gen & MMIO_SPTE_GEN_MASK) == get_mmio_spte_generation(spte)

    # -- kvm_mmu_page_fault -----------------------------------------------------------------

    def page_fault(self, gpa: int, error_code: int) -> PageFaultResult:
        """``kvm_mmu_page_fault(vcpu, gpa, error_code)`` up to the call to the emulator."""
        self.events["kvm.mmu.page_fault"] += 1
        r = RetPf.INVALID
        path = ""
        if error_code & PFERR_RSVD_MASK:
            r, path = self.handle_mmio_page_fault(gpa)
            if r == RetPf.EMULATE:
                return PageFaultResult(r, EMULTYPE_PF, path)
        if r == RetPf.INVALID:
            self.stats["pf_taken"] += 1
            r, p = self._do_page_fault(KvmPageFault.from_error_code(gpa, error_code))
            path = f"{path}+{p}" if path else p
        if r in (RetPf.FIXED, RetPf.EMULATE, RetPf.SPURIOUS):
            self.stats[f"pf_{r.name.lower()}"] += 1
        if r == RetPf.EMULATE:
            mask = PFERR_GUEST_PAGE_MASK | PFERR_WRITE_MASK | PFERR_PRESENT_MASK
            if (error_code & mask) == mask:
                # is_write_to_guest_page_table: unprotect (nothing to unprotect on a TDP-only
                # VM) and resume the guest
                return PageFaultResult(RetPf.RETRY, 0, path + "+guest_page_write")
            etype = EMULTYPE_PF
            if not self.mmio_info.match_gpa(gpa):
                etype |= EMULTYPE_ALLOW_RETRY_PF
            return PageFaultResult(r, etype, path)
        return PageFaultResult(r, 0, path)

    def handle_mmio_page_fault(self, addr: int) -> tuple[RetPf, str]:
        """``handle_mmio_page_fault`` (direct MMU)."""
        if self.mmio_info.match_gpa(addr):
            self.events["kvm.mmu.mmio_info_hit"] += 1
            return RetPf.EMULATE, "mmio_info"
        self.events["kvm.mmu.spte_walk"] += 1
        spte = self.get_spte(addr)
        if self.is_mmio_spte(spte):
            if not self.check_mmio_spte(spte):
                self.events["kvm.mmu.mmio_spte_stale"] += 1
                return RetPf.INVALID, "mmio_spte_stale"
            self.mmio_info.cache(0, get_mmio_spte_gfn(spte, self.fmt), 0)
            return RetPf.EMULATE, "mmio_spte"
        self.events["kvm.mmu.retry"] += 1
        return RetPf.RETRY, "mmio_spte_zapped"

    def _do_page_fault(self, fault: KvmPageFault) -> tuple[RetPf, str]:
        """``kvm_mmu_do_page_fault`` -> ``kvm_tdp_page_fault`` -> ``kvm_tdp_mmu_page_fault``."""
        slot = self.memslots.gfn_to_memslot(fault.gfn)
        if self.page_fault_can_be_fast(fault):
            r = self.fast_page_fault(fault)
            if r != RetPf.INVALID:
                self.stats["pf_fast"] += 1
                return r, "fast" if r == RetPf.FIXED else "spurious"
        self.events["kvm.mmu.slow_path"] += 1
        # kvm_mmu_faultin_pfn
        if slot is None:
            r = self.handle_noslot_fault(fault)
            if r != RetPf.CONTINUE:
                return r, "noslot_no_caching"
            r = self.tdp_mmu_map(fault, None, mmio=True)
            return r, "noslot_mmio_spte" if r == RetPf.EMULATE else "spurious"
        if (slot.readonly and self.mmio_caching and self.mmio_spte_for_readonly_hook is not None
                and self.mmio_spte_for_readonly_hook(fault.gfn)):
            r = self.tdp_mmu_map(fault, slot, mmio=True)
            return r, "mmio_spte_for_readonly" if r == RetPf.EMULATE else "spurious"
        if slot.readonly and fault.write:
            # __kvm_faultin_pfn -> KVM_PFN_ERR_RO_FAULT -> kvm_handle_error_pfn
            self.events["kvm.mmu.bad_page"] += 1
            if self.ro_write_fault_hook is not None and self.ro_write_fault_hook(fault.addr):
                return RetPf.RETRY, "hook"
            return RetPf.EMULATE, "ro_write"
        r = self.tdp_mmu_map(fault, slot)
        return r, "spurious" if r == RetPf.SPURIOUS else "map"

    def page_fault_can_be_fast(self, fault: KvmPageFault) -> bool:
        """``page_fault_can_be_fast``."""
        if fault.rsvd:
            return False
        if not fault.present:
            return not self.ad_enabled
        return fault.write

    def fast_page_fault(self, fault: KvmPageFault) -> RetPf:
        """``fast_page_fault`` (lockless fix-up of an existing leaf SPTE)."""
        self.events["kvm.mmu.fast_page_fault"] += 1
        self.events["kvm.mmu.spte_walk"] += 1
        level, sptep, spte = self.walk(fault.gfn)[-1]
        if not is_shadow_present_pte(spte) or level != 1:
            return RetPf.INVALID
        fmt = self.fmt
        if is_access_allowed(fault, spte, fmt):
            self.events["kvm.mmu.spurious"] += 1
            return RetPf.SPURIOUS
        new = spte
        if is_access_track_spte(spte, fmt):
            saved = (spte >> SHADOW_ACC_TRACK_SAVED_BITS_SHIFT) & SHADOW_ACC_TRACK_SAVED_BITS_MASK
            new &= ~(SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)
            new |= saved
        if fault.write and is_mmu_writable_spte(spte, fmt):
            new |= PT_WRITABLE_MASK
        if not is_access_allowed(fault, new, fmt):
            return RetPf.INVALID
        self.memory.write_u64(sptep, new)
        self.events["kvm.mmu.fast_page_fault.fixed"] += 1
        return RetPf.FIXED

    def handle_noslot_fault(self, fault: KvmPageFault) -> RetPf:
        """``kvm_handle_noslot_fault``."""
        self.mmio_info.cache(0, fault.gfn, 0)
        if not self.mmio_caching:
            return RetPf.EMULATE
        if fault.gfn > (1 << (self.maxphyaddr - 12)) - 1:
            return RetPf.EMULATE
        return RetPf.CONTINUE

    def tdp_mmu_map(self, fault: KvmPageFault, slot: KvmMemorySlot | None, mmio: bool = False) -> RetPf:
        """``kvm_tdp_mmu_map`` + ``tdp_mmu_map_handle_target_level`` for a 4 KiB leaf: an MMIO
        SPTE when ``mmio`` (no memslot: ``fault->slot`` NULL), else ``make_spte``."""
        table = self.root_hpa
        for level in range(ROOT_LEVEL, 1, -1):
            sptep = table + 8 * self._index(fault.gfn, level)
            spte = self.memory.read_u64(sptep)
            if not is_shadow_present_pte(spte):
                child = self._alloc_table()
                self.memory.write_u64(sptep, self._nonleaf(child))
                table = child
            else:
                table = spte & SPTE_BASE_ADDR_MASK
        sptep = table + 8 * self._index(fault.gfn, 1)
        old = self.memory.read_u64(sptep)
        if is_shadow_present_pte(old) and is_access_allowed(fault, old, self.fmt):
            self.events["kvm.mmu.spurious"] += 1
            return RetPf.SPURIOUS
        if mmio or slot is None:
            new = make_mmio_spte(fault.gfn, self.memslots.generation, self.fmt)
        else:
            assert slot is not None
            new = self.make_spte(slot, fault.gfn, old)
        if new == old:
            self.events["kvm.mmu.spurious"] += 1
            return RetPf.SPURIOUS
        self.memory.write_u64(sptep, new)
        if is_shadow_present_pte(old):
            # a present leaf replaced: only a loss of permissions needs a flush
            if (old & PT_WRITABLE_MASK and not new & PT_WRITABLE_MASK) or spte_to_pfn(old) != spte_to_pfn(new):
                self.requests.add("tlb_flush")
        if self.is_mmio_spte(new):
            self.events["kvm.mmu.spte_install.mmio"] += 1
            self.stats["pf_mmio_spte_created"] += 1
            return RetPf.EMULATE
        self.events["kvm.mmu.spte_install"] += 1
        return RetPf.FIXED

    def map_readonly_page(self, gpa: int) -> RetPf:
        """Install the SPTE a *read* fault on ``gpa`` would install (used by the RFC variant
        that maps the doorbell page read-only on a write). Returns the map result, or
        RETRY/EMULATE when there is nothing to map (no memslot)."""
        fault = KvmPageFault.from_error_code(gpa, 0)
        slot = self.memslots.gfn_to_memslot(fault.gfn)
        if slot is None:
            return RetPf.EMULATE
        return self.tdp_mmu_map(fault, slot)

    # -- invalidation -----------------------------------------------------------------------

    def invalidate_mmio_sptes(self, gen: int) -> None:
        """``kvm_mmu_invalidate_mmio_sptes`` (from ``kvm_arch_memslots_updated``): zap all when
        the MMIO generation (address-space bits stripped) wraps to 0."""
        gen &= MMIO_SPTE_GEN_MASK
        gen &= ~(self.memslots.nr_address_spaces - 1)
        if gen == 0:
            self.zap_all_fast()

    def flush_shadow_memslot(self, slot: KvmMemorySlot) -> None:
        """``kvm_arch_flush_shadow_memslot`` for a slot being deleted or moved."""
        if self.slot_zap_all:
            self.zap_all_fast()
        else:
            self.zap_gfn_range(slot.base_gfn, slot.end_gfn)

    def zap_gfn_range(self, start: int, end: int) -> int:
        """Zap leaf SPTEs (present or MMIO) for gfns in ``[start, end)``; a remote TLB flush
        is requested when a present one went. Returns how many were zapped."""
        zapped = 0
        flush = False
        for gfn, sptep, spte in list(self._leaves()):
            if start <= gfn < end and spte != SHADOW_NONPRESENT_VALUE:
                flush |= is_shadow_present_pte(spte)
                self.memory.write_u64(sptep, SHADOW_NONPRESENT_VALUE)
                zapped += 1
        self.events["kvm.mmu.zap"] += zapped
        if flush:
            self.requests.add("tlb_flush")
        return zapped

    def zap_all_fast(self) -> None:
        """``kvm_mmu_zap_all_fast``: the root is invalidated and freed; a new one is made and
        the vCPU must reload it (``KVM_REQ_MMU_FREE_OBSOLETE_ROOTS`` / ``kvm_mmu_load``)."""
        self.events["kvm.mmu.zap_all_fast"] += 1
        self.events["kvm.mmu.zap"] += sum(1 for _, _, s in self._leaves() if s != SHADOW_NONPRESENT_VALUE)
        old_tables, self.tables = self.tables, set()
        self.root_hpa = self._alloc_table()  # before freeing: the new root gets a new page
        for t in old_tables:
            self.alloc.free_pages(t)
        self.requests.add("mmu_reload")

    def _leaves(self, table: int | None = None, level: int = ROOT_LEVEL, gfn_base: int = 0):
        table = self.root_hpa if table is None else table
        for i in range(PT_ENTRIES):
            sptep = table + 8 * i
            spte = self.memory.read_u64(sptep)
            gfn = gfn_base | (i << (9 * (level - 1)))
            if level == 1:
                yield gfn, sptep, spte
            elif is_shadow_present_pte(spte):
                yield from self._leaves(spte & SPTE_BASE_ADDR_MASK, level - 1, gfn)

    def age_gfn(self, gfn: int) -> bool:
        """``kvm_age_gfn`` on one page: with A/D, clear the accessed bit (no flush); without,
        ``mark_spte_for_access_track`` (R/X saved in bits 56:54, RWX cleared) and request a
        TLB flush (``clear_flush_young``). Returns whether the page was young."""
        level, sptep, spte = self.walk(gfn)[-1]
        if level != 1 or not is_shadow_present_pte(spte):
            return False
        acc = self.fmt.accessed_mask
        if spte_ad_enabled(spte) and acc:
            young = bool(spte & acc)
            self.memory.write_u64(sptep, spte & ~acc)
            return young
        if is_access_track_spte(spte, self.fmt):
            return False
        new = spte | ((spte & SHADOW_ACC_TRACK_SAVED_BITS_MASK) << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)
        new &= ~EPT_RWX
        self.memory.write_u64(sptep, new)
        self.requests.add("tlb_flush")
        return True

    # -- requests ---------------------------------------------------------------------------

    def take_requests(self) -> list[str]:
        """The pending requests, cleared, in the order a vCPU services them before VM entry:
        ``mmu_reload`` (a new root to load and flush; it subsumes a TLB flush) or
        ``tlb_flush``. The vendor code applies them (:meth:`service_requests` on VMX; the
        SVM vCPU loads nCR3 and sets TLB_CONTROL)."""
        done = []
        if "mmu_reload" in self.requests:
            done.append("mmu_reload")
        elif "tlb_flush" in self.requests:
            done.append("tlb_flush")
        self.requests.clear()
        return done

    def service_requests(self, processor: Any) -> list[str]:
        """Perform pending requests on the VMX processor model before VM entry: a reload
        loads the new root's EPTP and flushes it (``kvm_mmu_load`` -> ``flush_tlb_current`` =
        INVEPT single-context); a TLB flush is INVEPT single-context on the current EPTP
        (``vmx_flush_tlb_all`` with EPT). Returns what was done."""
        done = self.take_requests()
        if "mmu_reload" in done:
            processor.set_eptp(self.eptp)
        if done:
            processor.invept(1, self.eptp)
        return done
