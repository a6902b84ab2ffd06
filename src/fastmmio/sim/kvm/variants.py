"""The KVM variants from the 2015 thread, as small strategies selected by name.

Each variant changes KVM in one or two places; everything else is the model of upstream KVM
(the RFC series of Aug 2015 and its review on the kvm list; 68c3b4d1, f848a5a8):

``upstream-2013``
    KVM before 68c3b4d1 and f848a5a8 (2014): no ``KVM_FAST_MMIO_BUS``, so
    ``handle_ept_misconfig`` goes straight to ``kvm_mmu_page_fault(gpa, PFERR_RSVD_MASK)`` and
    the emulator; no length-0 ioeventfds (``KVM_CAP_IOEVENTFD_NO_LENGTH`` did not exist:
    ``kvm_assign_ioeventfd`` accepted only 1, 2, 4, 8); the emulator walks the guest's page
    tables in software for its operand (no "GPA available" shortcut, see below).
``upstream``
    Today's KVM: ``handle_ept_misconfig`` first writes length 0 on ``KVM_FAST_MMIO_BUS`` and on
    a hit skips the instruction without decoding it (68c3b4d1); length-0 MMIO ioeventfds are
    on that bus too; the emulator takes its operand's GPA from the fault (``EMULTYPE_PF``).
``rfc-2015``
    [PATCH RFC 1/3] as posted: at the top of ``handle_ept_violation``, a length-0
    ``KVM_FAST_MMIO_BUS`` write for *every* EPT violation, read accesses included; on a hit
    skip the instruction and return, so no SPTE is ever installed for that page (objections 1,
    2 and 4); userspace may put the ioeventfd over a read-only memslot (patch 3/3 only
    advertises it: ``KVM_CAP_IOEVENTFD_PF``).
``rfc-2015-posted``
    ``rfc-2015`` with the RFC's skip exactly as posted: by the VM-exit instruction length on
    its EPT violations even when KVM runs nested (see "Skipping when KVM runs nested" below);
    ``rfc-2015`` itself carries the merged rule. The two differ only nested.
``rfc-2015-fixed``
    The RFC with objections 1 and 4 answered: the bus write is made for write accesses only,
    and the page is first mapped as a read fault would map it (read-only SPTE for a read-only
    memslot), so the processor can cache a translation for it.
``bad-page``
    Xiao Guangrong's first alternative: the bus write is made where the MMU turns a write to
    a read-only memslot into "emulate" (``kvm_handle_bad_page``, today
    ``kvm_handle_error_pfn`` with ``KVM_PFN_ERR_RO_FAULT``), i.e. after ``fast_page_fault``;
    on a hit the instruction is skipped.
``reserved-write-mostly``
    His second alternative: the MMU recognises a read-only page that carries a length-0
    ioeventfd (write-mostly) and gives it an MMIO-style (reserved, misconfigured) SPTE instead
    of a read-only one, so writes take the EPT-misconfiguration fast path. Consequences the
    model shows: a read of the doorbell address also hits the fast bus (signal + skip), and
    other reads of the page are emulated as MMIO (the per-vCPU MMIO info names the gfn).

KVM on SVM (``arch = "svm"``; the handlers are :class:`fastmmio.sim.kvm.svm.SvmVcpu`'s, the
variants :data:`SVM_VARIANTS`):

``svm-pre-7.0``
    Released kernels before Linux 7.0: every reserved-bit #NPF (an MMIO SPTE) goes to
    ``kvm_mmu_page_fault`` and the emulator (with the VMCB's instruction bytes), so even a
    length-0 doorbell is decoded and emulated; the emulator finds it on ``KVM_MMIO_BUS``.
``svm``
    With 01cde4eaaeca (Linux 7.0): ``npf_interception`` first writes length 0 on
    ``KVM_FAST_MMIO_BUS`` for a reserved-bit fault outside guest mode when ``nrips`` and the
    VMCB's next RIP is non-zero, and skips by next RIP on a hit.
``rfc-2015-svm``
    [PATCH RFC 2/3] "svm: allow ioeventfd for NPT page faults": its body was not recovered;
    modelled as the exact analogue of 1/3, a fast-bus write at the top of every #NPF.

ioeventfd registration (:attr:`Variant.ioeventfd_rules`) follows the kernel each variant is
modelled on: ``upstream-2013`` has no length 0 at all; the 2015 variants have Linux 4.2's
``kvm_assign_ioeventfd``, where length 0 was refused for PIO as for DATAMATCH (the any-length
PIO ioeventfd and the two-device registration on the MMIO buses came with Jason Wang's
changes in Linux 4.4) and a length-0 MMIO ioeventfd was one device on both MMIO buses; no
catalogue route registers a length-0 PIO ioeventfd, and one device on two buses is looked up
and signalled as two devices are, so their routes run as under today's rules.

The emulator's operand address (:attr:`Variant.emulator_gpa_available`): today's
``emulator_read_write_onepage`` uses the faulting GPA of a TDP fault when the page offset
matches and walks the guest's page tables otherwise. That shortcut did not exist in 2013 or in
Aug 2015: it came with Tom Lendacky's "kvm: svm: Use the hardware provided GPA instead of page
walk", first posted on 22 Aug 2016 (patch 03/28 of the AMD SEV RFC, Message-ID
<147190824754.9523.13923968456167130181.stgit@brijesh-build-machine>), which introduced
``vcpu->arch.gpa_available``, for SVM NPF only; VMX set it later and it moved into
``x86_emulate_ctxt`` (today ``EMULTYPE_PF``). Before it, ``vcpu_mmio_gva_to_gpa`` always
translated the operand: its per-vCPU MMIO gva cache is filled with gva 0 under TDP
(``handle_mmio_page_fault`` sets ``addr = 0`` when ``direct``), so it never matches and the
guest's tables are walked in software. ``upstream-2013`` and the four 2015 variants (written
against Linux 4.2, Aug 2015) therefore walk; only ``upstream`` (today) uses the GPA.

Every variant is registered through :func:`register_variant` (a unique name, a one-line
summary, its ``arch``) in :data:`ALL_VARIANTS` and in :data:`VARIANTS` (VMX) or
:data:`SVM_VARIANTS`: the bundled ones below, and in the same way a user's ``--variant-file``
or an installed ``fastmmio.variants`` plug-in (:mod:`.plugins`; the API is described in
docs/variants.md).

Skipping when KVM runs nested (:meth:`Variant.decodes_when_nested`): today's
``skip_emulated_instruction`` skips an EPT misconfiguration by decoding when
``X86_FEATURE_HYPERVISOR`` is set (d391f1207067: "Intel's SDM doesn't mandate the VMCS field
be set" for that exit; Hyper-V as L0 leaves it unset) and uses the VM-exit instruction length
everywhere else. The skips of the RFC-style variants happen on EPT-*violation* exits, for which
SDM 27.2.4 leaves the length just as undefined. ``rfc-2015-posted`` is the RFC exactly as
posted: it keeps the length there, so under an L0 that does not fill it (``hyperv``) the skip
is impossible and the model reports an internal error (the review flags it, SDM 27.2.4). The
other 2015 variants carry the rule merging them would have required: d391f1207067's reasoning
applied to every exit whose length SDM 27.2.4 leaves undefined (skip by decoding when nested),
so under every L0 they skip by the same rule as upstream.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Protocol

from fastmmio.errors import UsageError, did_you_mean
from fastmmio.sim.kvm.iobus import KVM_FAST_MMIO_BUS
from fastmmio.sim.vmx.exits import EXIT_EPT_MISCONFIG, ExitInfo
from fastmmio.sim.vmx.layouts import QUAL_WRITE

if TYPE_CHECKING:  # pragma: no cover
    from fastmmio.sim.kvm.handlers import KvmVcpu
    from fastmmio.sim.kvm.iobus import KvmIoBuses
    from fastmmio.sim.kvm.mmu import TdpMmu


class VariantVm(Protocol):
    """What a variant's hooks use of :class:`fastmmio.sim.kvm.vm.KvmVm` (a protocol: the VM
    module imports this one, not the other way round)."""

    buses: KvmIoBuses
    mmu: TdpMmu
    running_vcpu: Any  # KvmVcpu | None


#: what ``handle_ept_violation`` runs before an RFC-style early return: the VMREADs of the exit
#: qualification and the guest-physical address, the NMI-unblocking check and the return (the
#: bus write is priced as ``kvm.bus.*``, the skip as ``kvm.skip.*``). The error code and the
#: MMU work that ``kvm.handler.ept_violation`` stands for are not done, so it is not charged.
PRELUDE_EVENT = "kvm.handler.ept_violation.prelude"


class Variant:
    """Upstream KVM; subclasses override the hooks they change."""

    name = "upstream"
    arch = "vmx"  # the processor whose exit handlers the variant changes
    summary = "today's KVM: KVM_FAST_MMIO_BUS on EPT misconfiguration (68c3b4d1)"
    fast_mmio_on_misconfig = True
    fast_mmio_on_npf = False  # SVM: 01cde4eaaeca's fast path in npf_interception
    ioeventfd_no_length = True  # KVM_CAP_IOEVENTFD_NO_LENGTH (f848a5a8)
    ioeventfd_pf_cap = False  # KVM_CAP_IOEVENTFD_PF (RFC patch 3/3)
    #: the emulator uses the faulting GPA for its operand instead of walking the guest's
    #: tables (``gpa_available``, first posted Aug 2016: not in the 2013 or 2015 kernels)
    emulator_gpa_available = True
    ioeventfd_pio_no_length = True  # length-0 PIO ioeventfds (Linux 4.4)
    kernel = "today's Linux"  # the kernel the variant is modelled on
    ioeventfd_rules = ("Linux 4.4 onward: lengths 0, 1, 2, 4, 8; length 0 with DATAMATCH "
                       "EINVAL; a length-0 MMIO ioeventfd on KVM_MMIO_BUS and "
                       "KVM_FAST_MMIO_BUS, a length-0 PIO one on KVM_PIO_BUS only")
    #: event names the variant counts beyond the models' own (``vcpu.events[name] += 1`` in a
    #: hook): part of :func:`fastmmio.sim.events.vocabulary`, so a profile that does not price
    #: them is refused before a run, not in the middle of one
    events: tuple[str, ...] = ()

    #: which exits are skipped by decoding when KVM runs as a guest: "upstream" (EPT
    #: misconfigurations only, d391f1207067) or "merged" (every exit whose VM-exit instruction
    #: length SDM 27.2.4 leaves undefined)
    nested_skip_rule = "upstream"

    def decodes_when_nested(self, info: ExitInfo) -> bool:
        """Whether ``skip_emulated_instruction`` decodes instead of using the VM-exit
        instruction length for ``info`` when ``X86_FEATURE_HYPERVISOR`` is set."""
        if self.nested_skip_rule == "merged":
            return not info.instruction_length_defined
        return info.reason == EXIT_EPT_MISCONFIG

    def nested_skip_text(self) -> str:
        """The rule in words, for reports."""
        if self.nested_skip_rule == "merged":
            return ("nested skip: decode every exit whose length SDM 27.2.4 leaves undefined "
                    "(d391f1207067 applied to EPT violations: the merged rule)")
        return ("nested skip: decode EPT misconfigurations (d391f1207067); the VM-exit "
                "instruction length elsewhere" + (", EPT violations included (as posted)"
                                                   if self.ioeventfd_pf_cap else ""))

    def rules(self) -> str:
        """One line for reports: the kernel modelled, its ioeventfd rules, its emulator's
        operand address."""
        operand = ("the faulting GPA" if self.emulator_gpa_available
                   else "a software walk of the guest's tables (no gpa_available)")
        return (f"KVM model {self.name}: {self.kernel}; ioeventfd rules: {self.ioeventfd_rules}; "
                f"emulator operand address: {operand}; {self.nested_skip_text()}")

    def configure(self, vm: "VariantVm") -> None:
        """Install MMU hooks on a new VM."""

    def ept_violation_prelude(self, vcpu: "KvmVcpu", info: ExitInfo) -> bool | None:
        """Run at the top of ``handle_ept_violation``; a bool ends the handler with that
        result (the hook counts :data:`PRELUDE_EVENT` for the part of the handler that ran),
        None goes on to the whole handler and ``kvm_mmu_page_fault``."""
        return None

    def npf_prelude(self, vcpu: "KvmVcpu", info: Any) -> bool | None:
        """SVM: run at the top of ``npf_interception``, as :meth:`ept_violation_prelude`."""
        return None

    def __repr__(self) -> str:
        return f"<variant {self.name}>"


class Upstream2013(Variant):
    name = "upstream-2013"
    summary = "KVM before the fast MMIO bus: EPT misconfiguration always emulates"
    fast_mmio_on_misconfig = False
    ioeventfd_no_length = False
    emulator_gpa_available = False
    ioeventfd_pio_no_length = False
    kernel = "Linux 3.x (2013), before 68c3b4d1 and f848a5a8"
    ioeventfd_rules = "before f848a5a8 (2014): lengths 1, 2, 4, 8 only; length 0 is EINVAL"


class Variant2015(Variant):
    """The base of the 2015 thread's proposals: Linux 4.2 (Aug 2015), i.e. today's model less
    the emulator's faulting-GPA shortcut (posted a year later) and with 4.2's ioeventfd
    registration rules (length-0 PIO refused; see the module docstring)."""

    emulator_gpa_available = False
    kernel = "Linux 4.2 (Aug 2015)"
    ioeventfd_pf_cap = True
    # virt/kvm/eventfd.c from f848a5a8 (2014) to Linux 4.3: length 0 refused with PIO as with DATAMATCH
    ioeventfd_pio_no_length = False
    nested_skip_rule = "merged"
    ioeventfd_rules = ("Linux 4.2 (f848a5a8 to 4.3): lengths 0, 1, 2, 4, 8; length 0 with "
                       "DATAMATCH or with PIO EINVAL; a length-0 MMIO ioeventfd is one device "
                       "on KVM_MMIO_BUS and KVM_FAST_MMIO_BUS (today: two devices, the same "
                       "look-ups and signals); no route registers a length-0 PIO one, so the "
                       "routes' results are those of today's rules")


class Rfc2015(Variant2015):
    name = "rfc-2015"
    summary = "RFC 1/3 as posted: fast-bus write at the top of every EPT violation"

    def ept_violation_prelude(self, vcpu: "KvmVcpu", info: ExitInfo) -> bool | None:
        gpa = info.guest_physical_address or 0
        vcpu.step("rfc-2015:fast_mmio_bus")
        if vcpu.vm.buses.write(KVM_FAST_MMIO_BUS, gpa, 0, None):
            vcpu.events[PRELUDE_EVENT] += 1
            return vcpu.skip_emulated_instruction(info)
        return None


class Rfc2015Posted(Rfc2015):
    """The RFC exactly as posted: its EPT-violation skip uses the VM-exit instruction length
    also when KVM runs nested (only misconfigurations are decoded, as upstream)."""

    name = "rfc-2015-posted"
    summary = ("RFC 1/3 as posted, skip rule included: the VM-exit instruction length on EPT "
               "violations, even nested")
    nested_skip_rule = "upstream"


class Rfc2015Fixed(Variant2015):
    name = "rfc-2015-fixed"
    summary = "RFC with a read-only SPTE installed and the bus write for writes only"

    def ept_violation_prelude(self, vcpu: "KvmVcpu", info: ExitInfo) -> bool | None:
        if not info.qualification & QUAL_WRITE:
            return None
        gpa = info.guest_physical_address or 0
        vcpu.step("rfc-2015-fixed:fast_mmio_bus")
        if not vcpu.vm.buses.write(KVM_FAST_MMIO_BUS, gpa, 0, None):
            return None
        vcpu.events[PRELUDE_EVENT] += 1
        r = vcpu.vm.mmu.map_readonly_page(gpa)
        vcpu.step(f"rfc-2015-fixed:map_readonly:{r.name}")
        return vcpu.skip_emulated_instruction(info)


class BadPage(Variant2015):
    name = "bad-page"
    summary = "fast-bus write in the read-only-write (bad page) path, after fast_page_fault"

    def configure(self, vm: "VariantVm") -> None:
        vm.mmu.ro_write_fault_hook = lambda gpa: self._hook(vm, gpa)

    @staticmethod
    def _hook(vm: "VariantVm", gpa: int) -> bool:
        vcpu = vm.running_vcpu
        if vcpu is None:
            return False
        vcpu.step("bad-page:fast_mmio_bus")
        if not vm.buses.write(KVM_FAST_MMIO_BUS, gpa, 0, None):
            return False
        vcpu.skip_emulated_instruction(vcpu.current_exit)
        return True


class ReservedWriteMostly(Variant2015):
    name = "reserved-write-mostly"
    summary = "MMIO-style (misconfigured) SPTE for a read-only page carrying a length-0 ioeventfd"

    def configure(self, vm: "VariantVm") -> None:
        def write_mostly(gfn: int) -> bool:
            base = gfn << 12
            return any(base <= r.addr < base + 0x1000 and r.len == 0
                       for r in vm.buses[KVM_FAST_MMIO_BUS].range)

        vm.mmu.mmio_spte_for_readonly_hook = write_mostly


VARIANTS: dict[str, type[Variant]] = {}
"""The VMX variants by name: the bundled ones, then those registered later (plug-ins,
``--variant-file``), all through :func:`register_variant` (as are :data:`SVM_VARIANTS`;
:data:`ALL_VARIANTS` holds both)."""
SVM_VARIANTS: dict[str, type[Variant]] = {}
ALL_VARIANTS: dict[str, type[Variant]] = {}
ARCHES = ("vmx", "svm")
_BY_ARCH = {"vmx": VARIANTS, "svm": SVM_VARIANTS}

_ORIGINS: dict[str, str] = {}  # name -> where the variant came from, for messages

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_EVENT_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


def register_variant(cls: type[Variant], origin: str = "fastmmio") -> type[Variant]:
    """Add ``cls`` to :data:`VARIANTS` under its ``name`` (usable as a class decorator).

    ``cls`` must be a :class:`Variant` subclass that sets its own ``name`` (lower-case
    letters, digits, ``.``, ``_``, ``-``) and a one-line ``summary``; a name another class
    already has is refused (a :class:`UsageError` naming both origins). Registering the same
    class twice is harmless."""
    if not (isinstance(cls, type) and issubclass(cls, Variant)):
        raise UsageError(f"{origin}: {cls!r} is not a subclass of fastmmio.sim.kvm.variants.Variant")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise UsageError(f"{origin}: variant class {cls.__name__} needs its own name: a "
                         "class attribute name = '...' of lower-case letters, digits, "
                         f"'.', '_', '-' (got {name!r})")
    if not isinstance(cls.summary, str) or not cls.summary.strip() or "\n" in cls.summary:
        raise UsageError(f"{origin}: variant {name}: summary must be one non-empty line")
    events = cls.events
    if (not isinstance(events, tuple)
            or not all(isinstance(e, str) and _EVENT_RE.match(e) for e in events)):
        raise UsageError(f"{origin}: variant {name}: events must be a tuple of event names "
                         "(letters, digits, _ separated by single dots)")
    if cls.arch not in _BY_ARCH:
        raise UsageError(f"{origin}: variant {name}: arch must be one of {', '.join(ARCHES)}, "
                         f"not {cls.arch!r}")
    if ALL_VARIANTS.get(name) is cls:
        return cls
    if name in ALL_VARIANTS:
        raise UsageError(f"{origin}: variant name {name!r} ({cls.__name__}) is already taken "
                         f"by {_ORIGINS[name]} ({ALL_VARIANTS[name].__name__}): choose another name")
    ALL_VARIANTS[name] = cls
    _BY_ARCH[cls.arch][name] = cls
    _ORIGINS[name] = origin
    return cls


def variant_origin(name: str) -> str:
    """Where the variant called ``name`` came from: ``fastmmio``, a plug-in, a file."""
    return _ORIGINS[name]


def snapshot_variants() -> tuple[dict[str, type[Variant]], dict[str, str]]:
    """The registry as it is now (for :func:`restore_variants`)."""
    return dict(ALL_VARIANTS), dict(_ORIGINS)


def restore_variants(saved: tuple[dict[str, type[Variant]], dict[str, str]]) -> None:
    """Put the registry back as :func:`snapshot_variants` saw it (variants loaded for one
    command do not outlive it)."""
    for table in (ALL_VARIANTS, *_BY_ARCH.values()):
        table.clear()
    for name, cls in saved[0].items():
        ALL_VARIANTS[name] = cls
        _BY_ARCH[cls.arch][name] = cls
    _ORIGINS.clear()
    _ORIGINS.update(saved[1])


for _cls in (Upstream2013, Variant, Rfc2015, Rfc2015Posted, Rfc2015Fixed, BadPage,
             ReservedWriteMostly):
    register_variant(_cls)


# --------------------------------------------------------------------------------------------
# KVM on SVM (the handlers are fastmmio.sim.kvm.svm.SvmVcpu's)
# --------------------------------------------------------------------------------------------


class SvmPre70(Variant):
    """KVM on SVM as released before Linux 7.0: ``npf_interception`` hands every #NPF to
    ``kvm_mmu_page_fault`` with the VMCB's instruction bytes, so a reserved-bit (MMIO) fault
    is always decoded and emulated; a length-0 MMIO ioeventfd is found on ``KVM_MMIO_BUS``
    by the emulator's ``vcpu_mmio_write`` (it is registered on both MMIO buses), so the
    doorbell stays in the kernel, but decoded and emulated."""

    name = "svm-pre-7.0"
    arch = "svm"
    summary = "KVM on SVM before 01cde4eaaeca: every MMIO #NPF decoded and emulated"
    kernel = "Linux 6.x on SVM, before 7.0 (01cde4eaaeca)"
    fast_mmio_on_misconfig = False
    fast_mmio_on_npf = False


class Svm(SvmPre70):
    """KVM on SVM with 01cde4eaaeca "KVM: SVM: Add support for expedited writes to the fast
    MMIO bus" (Sean Christopherson, posted Nov 2025, Linux 7.0): in ``npf_interception``, a
    fault with the RSVD error-code bit outside guest mode first passes
    ``svm_check_emulate_instruction(EMULTYPE_PF | EMULTYPE_NO_DECODE)``; then, if ``nrips``
    and the VMCB's next RIP is non-zero, a length-0 write on ``KVM_FAST_MMIO_BUS``, and on a
    hit ``kvm_skip_emulated_instruction`` (by next RIP). Otherwise the old path."""

    name = "svm"
    summary = "KVM on SVM with 01cde4eaaeca: fast MMIO bus on reserved-bit #NPF when next RIP is known"
    kernel = "Linux 7.0 on SVM (01cde4eaaeca)"
    fast_mmio_on_npf = True


class Rfc2015Svm(Variant2015):
    """[PATCH RFC 2/3] "svm: allow ioeventfd for NPT page faults" (Aug 2015). Its body was
    not recovered (the cover letter calls it untested and it is about five lines of svm.c):
    it is modelled as the exact analogue of 1/3 (:class:`Rfc2015`): at the top of
    ``npf_interception``, a length-0 ``KVM_FAST_MMIO_BUS`` write for *every* #NPF, reads
    included; on a hit skip the instruction (next RIP when the processor saved one, else
    decode: 4.2's ``skip_emulated_instruction``) and return, so no SPTE is ever installed for
    the page. Everything else is Linux 4.2 on SVM (no fast path on reserved-bit faults)."""

    name = "rfc-2015-svm"
    arch = "svm"
    summary = "RFC 2/3 (body not recovered; modelled as 1/3's analogue): fast-bus write at the top of every #NPF"
    kernel = "Linux 4.2 (Aug 2015) on SVM, with RFC 2/3 as the analogue of 1/3"
    fast_mmio_on_misconfig = False
    fast_mmio_on_npf = False

    def npf_prelude(self, vcpu: "KvmVcpu", info: Any) -> bool | None:
        gpa = info.exitinfo2
        vcpu.step("rfc-2015-svm:fast_mmio_bus")
        if vcpu.vm.buses.write(KVM_FAST_MMIO_BUS, gpa, 0, None):
            vcpu.events[NPF_PRELUDE_EVENT] += 1
            return vcpu.skip_emulated_instruction(info)
        return None


#: what ``npf_interception`` runs before the RFC's early return (EXITINFO1/2 read from the
#: VMCB; no error code handling, no MMU)
NPF_PRELUDE_EVENT = "kvm.handler.npf.prelude"

for _cls in (SvmPre70, Svm, Rfc2015Svm):
    register_variant(_cls)


def variants_for(arch: str) -> dict[str, type[Variant]]:
    """The variants of one processor architecture (``vmx``: the 2015 thread's EPT variants;
    ``svm``: KVM on SVM before and after 01cde4eaaeca, and the RFC's 2/3)."""
    if arch == "vmx":
        return VARIANTS
    if arch == "svm":
        return SVM_VARIANTS
    raise UsageError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHES)}")


def get_variant(name: "str | Variant") -> Variant:
    """The variant called ``name`` (a :class:`UsageError` naming the choices otherwise)."""
    if isinstance(name, Variant):
        return name
    try:
        return ALL_VARIANTS[name]()
    except KeyError:
        raise UsageError(f"unknown KVM variant {name!r}{did_you_mean(name, ALL_VARIANTS)}; choose one of: {', '.join(ALL_VARIANTS)}") from None
