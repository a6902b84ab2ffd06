"""A user variant for fastmmio: the 2015 RFC with only the review's first objection answered.

[PATCH RFC 1/3] (Michael S. Tsirkin, Aug 2015) writes length 0 on ``KVM_FAST_MMIO_BUS`` at the
top of ``handle_ept_violation`` for *every* EPT violation, so a guest's *read* of the doorbell
page signals the eventfd too (objection 1), and on a hit it returns before the MMU installs
an SPTE, so the processor never caches a translation for the page (objection 4). The bundled
``rfc-2015-fixed`` answers both. This variant answers only the first: the bus write is made
for write accesses alone (bit 1 of the exit qualification, SDM Vol. 3 Table 27-7), and a
read goes on to the normal handler and ``kvm_mmu_page_fault``. Putting it next to
``rfc-2015`` and ``rfc-2015-fixed`` shows what each half of the review's fix does: the read
routes become correct here, while the doorbell's walk is what the RFC's was.

Use it with any command that takes a variant::

    fastmmio explain ro-write-eventfd --variant-file examples/variants/rfc_writes_only.py \
        --variant rfc-writes-only
    fastmmio compare --no-kvm --variant-file examples/variants/rfc_writes_only.py \
        --variants rfc-2015,rfc-writes-only,rfc-2015-fixed

docs/variants.md describes the API this file uses.
"""

from fastmmio.sim.kvm.iobus import KvmBus
from fastmmio.sim.kvm.variants import PRELUDE_EVENT, Variant2015
from fastmmio.sim.vmx.layouts import QUAL_WRITE


class RfcWritesOnly(Variant2015):
    """Linux 4.2 with RFC 1/3's early fast-bus write made for write accesses only."""

    name = "rfc-writes-only"
    summary = "RFC 1/3 with the bus write for writes only (objection 1), no SPTE installed"

    def ept_violation_prelude(self, vcpu, info):
        if not info.qualification & QUAL_WRITE:
            return None  # a read: the whole handler and kvm_mmu_page_fault, as upstream
        gpa = info.guest_physical_address or 0
        vcpu.step("rfc-writes-only:fast_mmio_bus")
        if not vcpu.vm.buses.write(KvmBus.KVM_FAST_MMIO_BUS, gpa, 0, None):
            return None
        vcpu.events[PRELUDE_EVENT] += 1  # the part of handle_ept_violation that ran
        return vcpu.skip_emulated_instruction(info)
