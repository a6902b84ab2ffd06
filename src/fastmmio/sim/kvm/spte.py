"""The SPTE formats KVM's TDP MMU writes, as data: one MMU writes either EPT or NPT entries.

arch/x86/kvm/mmu/spte.c sets a handful of masks once, when the vendor module loads, and every
SPTE KVM builds is made of them (``make_spte``, ``make_nonleaf_spte``, ``make_mmio_spte``):

* EPT (``kvm_mmu_set_ept_masks``, called by vmx.c): present = R plus suppress-#VE (bit 63),
  user = R, X = bit 2, no NX, accessed/dirty bits 8/9 (0 without EPT A/D, ``kvm_intel.eptad``),
  host-/MMU-writable software bits 57/58, memory type WB with ignore-PAT in leaves
  (``vmx_get_mt_mask``), MMIO SPTE value W|X (110b: an EPT misconfiguration) under the mask
  RWX|SVE, no access bits in it (``shadow_mmio_access_mask`` 0);
* NPT (``kvm_mmu_reset_all_pte_masks``, the x86 defaults SVM keeps): present = P (bit 0),
  user = U (bit 2), no X bit but NX = bit 63, accessed/dirty 5/6 (always: nested paging
  maintains them, APM 15.25.5), host-/MMU-writable bits 9/10 (``DEFAULT_SPTE_*``), no
  memory type; the MMIO SPTE is reserved bit 51 plus P (value = mask), with W and U from the
  access (``ACC_WRITE_MASK | ACC_USER_MASK``), when the host's MAXPHYADDR is below 52, and
  no MMIO caching at all at 52. Under SME, ``svm_adjust_mmio_mask`` (arch/x86/kvm/svm/svm.c)
  uses bits phys_bits..51 of the reduced width instead (the mask itself is
  :func:`fastmmio.sim.svm.layouts.npt_mmio_spte_mask`, the processor model's home for it).

Common to both (spte.h): ``SPTE_MMU_PRESENT_MASK`` (bit 11, KVM's own "shadow present"
bit), the non-present value (bit 63: "for SVM NPT, for non-present spte (bit 0 = 0), other
bits are ignored"), W = bit 1 (``PT_WRITABLE_MASK``), "readable" = bit 0 (``PT_PRESENT_MASK``,
EPT's R), the A/D-disabled marker bits 53:52, and the MMIO generation in bits 10:3 and 62:52.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastmmio.sim.svm.layouts import npt_mmio_spte_mask
from fastmmio.sim.vmx.layouts import EPT_A, EPT_D, EPT_IPAT, EPT_R, EPT_RWX, EPT_SVE, EPT_W, EPT_X, MT_WB
from fastmmio.x86 import paging as X86

SHADOW_NONPRESENT_VALUE = 1 << 63
SPTE_MMU_PRESENT_MASK = 1 << 11
PT_PRESENT_MASK = 1 << 0
PT_WRITABLE_MASK = 1 << 1
ACC_EXEC_MASK, ACC_WRITE_MASK, ACC_USER_MASK = 1, PT_WRITABLE_MASK, X86.PTE_US
ACC_ALL = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK


@dataclass(frozen=True)
class SpteFormat:
    """The masks of one SPTE format (names as spte.c's ``shadow_*_mask``)."""

    name: str  # "ept" or "npt"
    present_mask: int
    user_mask: int
    x_mask: int
    nx_mask: int
    accessed_mask: int  # 0 when the format has no A/D bits (EPT without eptad)
    dirty_mask: int
    host_writable_mask: int
    mmu_writable_mask: int
    memtype_mask: int  # bits every leaf gets for its memory type (EPT WB + IPAT; 0 on NPT)
    mmio_mask: int
    mmio_value: int  # 0: MMIO caching impossible with this format (kvm_mmu_set_mmio_spte_mask)
    mmio_access_mask: int
    acc_track_saved_mask: int  # what access tracking saves (EPT R|X; 0 where A/D are always on)
    ad_optional: bool  # True when the A/D bits may be absent (EPT), so access tracking exists

    @property
    def ad_enabled(self) -> bool:
        return self.accessed_mask != 0

    @property
    def root_name(self) -> str:
        """What the processor calls the root of these tables."""
        return "EPTP" if self.name == "ept" else "nCR3"


def ept_format(ad_enabled: bool = True) -> SpteFormat:
    """``kvm_mmu_set_ept_masks(enable_ept_ad_bits, cpu_has_vmx_ept_execute_only())`` (no
    execute-only: the present mask carries R)."""
    return SpteFormat(
        name="ept", present_mask=EPT_R | EPT_SVE, user_mask=EPT_R, x_mask=EPT_X, nx_mask=0,
        accessed_mask=EPT_A if ad_enabled else 0, dirty_mask=EPT_D if ad_enabled else 0,
        host_writable_mask=1 << 57, mmu_writable_mask=1 << 58,
        memtype_mask=(MT_WB << 3) | EPT_IPAT, mmio_mask=EPT_RWX | EPT_SVE,
        mmio_value=EPT_W | EPT_X, mmio_access_mask=0, acc_track_saved_mask=EPT_R | EPT_X,
        ad_optional=True)


def npt_format(phys_bits: int, sme_c_bit: int | None = None) -> SpteFormat:
    """``kvm_mmu_reset_all_pte_masks`` on a host with MAXPHYADDR ``phys_bits`` (and
    ``svm_adjust_mmio_mask`` under SME with the C-bit at ``sme_c_bit``)."""
    mmio = npt_mmio_spte_mask(phys_bits, sme_c_bit)
    return SpteFormat(
        name="npt", present_mask=PT_PRESENT_MASK, user_mask=X86.PTE_US, x_mask=0,
        nx_mask=X86.PTE_XD, accessed_mask=X86.PTE_A, dirty_mask=X86.PTE_D,
        host_writable_mask=1 << 9, mmu_writable_mask=1 << 10, memtype_mask=0,
        mmio_mask=mmio, mmio_value=mmio,
        mmio_access_mask=(ACC_WRITE_MASK | ACC_USER_MASK) if mmio else 0,
        acc_track_saved_mask=0, ad_optional=False)
