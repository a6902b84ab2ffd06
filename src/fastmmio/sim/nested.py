"""The L0 hypervisor under a nested KVM: KVM (the :mod:`fastmmio.sim.kvm` model) is L1, the
guest is L2, and L0 is a named model (:data:`L0_MODELS`) that sits between the processor and
L1 as the :class:`fastmmio.sim.cpu.ExitHandler` the CPU calls.

What L0 does, after arch/x86/kvm/vmx/nested.c and arch/x86/kvm/mmu/paging_tmpl.h (compiled
with ``PTTYPE == PTTYPE_EPT``), Linux 6.x:

* **Shadow EPT (EPT02).** The processor walks EPT02 as its EPT (and caches from it by the SDM,
  as for any EPT). L0 builds EPT02 lazily from L1's EPT12 (the SPTEs the KVM model writes for
  its guest) composed with its own EPT01 (L1's memory; identity here: L1's host-physical
  addresses are the model's host-physical addresses). An L2 access whose EPT02 entry is
  missing is an EPT violation *seen by L0*: ``kvm_mmu_page_fault`` on the nested MMU, whose
  ``FNAME(walk_addr_generic)`` walks EPT12 in software, one guest-table read per level
  (each counted as ``nested.ept12.ref``). A present leaf with the access's permission:
  ``FNAME(fetch)`` installs the EPT02 entry and L2 resumes (``nested.ept02.fix``); L1 sees
  nothing. A not-present entry or a missing permission: ``nested_ept_inject_page_fault``
  synthesizes an EPT violation for L1 (qualification: the access bits, bits 5:3 from EPT12's
  leaf). A misconfigured entry (``is_rsvd_bits_set``: the same SDM 28.2.3.1 rules the
  processor applies, so KVM's own MMIO SPTEs, W+X without R, land here): the error code
  carries ``PFERR_RSVD_MASK`` and ``nested_ept_inject_page_fault`` synthesizes an *EPT
  misconfiguration* (qualification 0). Either way ``vmcs12->guest_physical_address`` is the
  faulting GPA. Nothing is cached in EPT02 from a misconfigured EPT12 entry, so every access
  to an L1 MMIO SPTE takes this path.
* **Reflection.** Other exits L1 asked for (``nested_vmx_reflect_vmexit`` ->
  ``nested_vmx_l1_wants_exit``: CPUID always, I/O under L1's unconditional I/O exiting, HLT
  and VMCALL under KVM's controls) are reflected without the EPT12 walk. ``nested_vmx_vmexit``
  -> ``prepare_vmcs12`` fills VMCS12's exit reason, qualification, GPA and the VM-exit
  instruction length, which KVM copies from vmcs02's field (``exit_insn_len``, read by
  ``nested_vmx_vmexit`` since fbd1e0f19546): the value the processor wrote for L2's exit.
  Real processors write it even where SDM 27.2.4 leaves it undefined (EPT violations and
  misconfigurations; see the comment in vmx.c ``skip_emulated_instruction``), so under KVM
  as L0, L1 gets a usable length. Hyper-V does not fill it for those exits (d391f1207067:
  "Intel's SDM doesn't mandate the VMCS field be set ... practically this is what happens
  under Hyper-V"): the ``hyperv`` model leaves it undefined (None) where the SDM does.
  Counted as ``nested.reflect.<l0>``.
* **L1's handler** is the KVM model's, unchanged; it runs with ``X86_FEATURE_HYPERVISOR``
  set (:class:`~fastmmio.sim.kvm.handlers.KvmVcpu` ``nested``). Its VMREADs/VMWRITEs of the
  exit fields and RIP do not trap: KVM as L0 shadows them (``enable_shadow_vmcs``, the fields
  of vmcs_shadow_fields.h), Hyper-V offers the Enlightened VMCS (plain memory).
* **VMRESUME.** L1's VMRESUME exits to L0 (``handle_vmresume`` -> ``nested_vmx_run``;
  ``nested.vmresume.<l0>``), which enters L2 again (``nested_vmx_enter_non_root_mode`` ->
  ``prepare_vmcs02``; ``nested.enter_l2.<l0>``; the hardware entry itself is the second half
  of the exit's round trip, priced on ``exit.<REASON>``).
* **L1's INVEPT** and EPTP loads (the KVM model's MMU requests) trap to L0 (``handle_invept``
  frees the shadow roots of that EPTP): EPT02 is dropped and rebuilt lazily
  (``nested.invept``).

Models count events; :mod:`fastmmio.costs` prices them (``nested.*`` in the profiles).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from fastmmio.errors import UsageError
from fastmmio.sim.vmx import layouts as L
from fastmmio.sim.vmx.exits import EXIT_EPT_MISCONFIG, EXIT_EPT_VIOLATION, ExitInfo
from fastmmio.sim.vmx.memory import HostMemory, PageAllocator
from fastmmio.sim.vmx.tables import PageTableBuilder

NESTED_OFF = "off"
#: what plain ``--nested`` means
NESTED_DEFAULT = "kvm"
_SHIFT = {4: 39, 3: 30, 2: 21, 1: 12}
_ACCESS_QUAL = (L.QUAL_READ, L.QUAL_WRITE, L.QUAL_FETCH)
_EPT02_BASE = 0x3F00_0000_0000  # L0's own pages: far above the KVM model's allocations


@dataclass(frozen=True)
class L0Model:
    """A named L0 hypervisor. ``fills_length_on_ept``: whether VMCS12's VM-exit instruction
    length is valid when L0 reflects an EPT violation or misconfiguration (SDM 27.2.4 leaves
    it undefined for both). ``vmcs_access``: how L1's VMREAD/VMWRITE avoid trapping."""

    name: str
    summary: str
    fills_length_on_ept: bool
    vmcs_access: str
    source: str

    def length_rule(self) -> str:
        if self.fills_length_on_ept:
            return ("VM-exit instruction length on EPT violations/misconfigurations: copied from "
                    "the processor's exit (prepare_vmcs12), defined in practice")
        return ("VM-exit instruction length on EPT violations/misconfigurations: undefined "
                "(SDM 27.2.4)")


L0_MODELS: dict[str, L0Model] = {m.name: m for m in (
    L0Model("kvm", "KVM as L0: shadow EPT from EPT12, shadow VMCS, exits reflected by "
            "nested_vmx_vmexit", True, "shadow VMCS (enable_shadow_vmcs)",
            "arch/x86/kvm/vmx/nested.c prepare_vmcs12, nested_ept_inject_page_fault; "
            "mmu/paging_tmpl.h (PTTYPE_EPT)"),
    L0Model("hyperv", "Hyper-V as L0 with the Enlightened VMCS: fewer traps; the VM-exit "
            "instruction length left undefined where the SDM does", False,
            "Enlightened VMCS (memory, clean fields)",
            "Linux d391f1207067 (Hyper-V does not set the length on EPT misconfigurations); "
            "the Enlightened VMCS as KVM uses it (arch/x86/kvm/vmx/hyperv_evmcs.h)"),
)}


def nested_setting(value: Any) -> str:
    """Normalise a nested setting: ``off``, an L0 model name, or a bool (True: the default L0,
    :data:`NESTED_DEFAULT`). A :class:`UsageError` names the choices otherwise."""
    if value is True:
        return NESTED_DEFAULT
    if value is False or value is None:
        return NESTED_OFF
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("off", "no", "none", "0"):
            return NESTED_OFF
        if v in ("on", "yes", "1"):
            return NESTED_DEFAULT
        if v in L0_MODELS:
            return v
    raise UsageError(f"unknown nested setting {value!r}; choose from off, "
                     f"{', '.join(L0_MODELS)}")


def get_l0(name: str) -> L0Model:
    return L0_MODELS[nested_setting(name)]


@dataclass(frozen=True)
class Ept12Walk:
    """L0's software walk of EPT12 for one GPA (``FNAME(walk_addr_generic)``, EPT)."""

    refs: int  # EPT12 entries read
    outcome: str  # "present", "not_present", "permission" or "misconfig"
    level: int  # level of the last entry read
    entry: int  # that entry
    rwx: int  # permissions accumulated down the walk (bits 2:0)


def walk_ept12(memory: HostMemory, eptp: int, gpa: int, access: int, *,
               execute_only: bool = True) -> Ept12Walk:
    """Walk EPT12 (root from L1's ``eptp``) for ``gpa`` and an access (0 read, 1 write,
    2 fetch) as ``FNAME(walk_addr_generic)`` does for EPT: one read per level; stop at a
    not-present entry (bits 2:0 = 0) or at a misconfigured one (``is_rsvd_bits_set``: bits
    2:0 = W or W+X without R, reserved bits, a reserved leaf memory type; SDM 28.2.3.1) or
    at the leaf; then the permission check against the accumulated R/W/X."""
    table = eptp & ~0xFFF & ((1 << memory.maxphyaddr) - 1)
    perm = 7
    refs = 0
    for level in (4, 3, 2, 1):
        entry = memory.read_u64(table + ((gpa >> _SHIFT[level]) & 511) * 8)
        refs += 1
        rwx = entry & 7
        if rwx == 0:
            return Ept12Walk(refs, "not_present", level, entry, perm)
        large = level in (2, 3) and bool(entry & L.EPT_LARGE)
        leaf = level == 1 or large
        if (L.ept_bits20_misconfigured(rwx, execute_only)
                or entry & L.ept_reserved_mask(level, large, memory.maxphyaddr)
                or (leaf and (entry >> 3) & 7 in L.EPT_RESERVED_MEMTYPES)):
            return Ept12Walk(refs, "misconfig", level, entry, perm)
        perm &= rwx
        if leaf:
            ok = bool(perm & (1 << access))
            return Ept12Walk(refs, "present" if ok else "permission", level, entry, perm)
        table = entry & ~0xFFF & ((1 << memory.maxphyaddr) - 1) & ~(0xFFF << 52)
    raise AssertionError("unreachable")  # pragma: no cover


class _L1Processor:
    """The processor as L1 (the KVM model) sees it: everything forwards to the real one,
    except the EPT pointer and INVEPT, which trap to L0 (L1 manages EPT12, L0 owns EPT02)."""

    def __init__(self, l0: "NestedL0"):
        object.__setattr__(self, "_l0", l0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._l0.processor, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._l0.processor, name, value)

    def set_eptp(self, eptp: int) -> None:
        self._l0.l1_set_eptp(eptp)

    def invept(self, inv_type: int, eptp: int | None = None) -> None:
        self._l0.l1_invept()


class NestedL0:
    """L0 between the processor and L1 (see the module docstring). ``l1`` is the KVM model's
    vCPU (an :class:`~fastmmio.sim.cpu.ExitHandler`); call :meth:`attach` with it once it
    exists (it is built with :attr:`l1_processor`)."""

    def __init__(self, model: str | L0Model, processor: Any, memory: HostMemory,
                 events: Counter):
        self.model = model if isinstance(model, L0Model) else get_l0(model)
        self.processor = processor
        self.memory = memory
        self.events = events
        self.alloc = PageAllocator(memory, base=_EPT02_BASE,
                                   limit=(1 << memory.maxphyaddr) - (1 << 32))
        self.l1: Any = None
        self.l1_processor = _L1Processor(self)
        self.eptp12: int | None = None
        self.ept02: PageTableBuilder | None = None
        self.eptp02: int | None = None
        self.steps: list[str] = []  # what L0 did at the last exit (for explain)
        self.last_reflected: ExitInfo | None = None
        self.last_ept_reflected: ExitInfo | None = None  # the last synthesized EPT exit

    def attach(self, l1: Any) -> None:
        self.l1 = l1

    def step(self, what: str) -> None:
        self.steps.append(what)

    # -- EPT02 -------------------------------------------------------------------------------

    def l1_set_eptp(self, eptp12: int) -> None:
        """L1 loads an EPTP into VMCS12 (a new root): at the next entry L0 uses a fresh,
        empty EPT02 for it (its INVEPT, which follows, is :meth:`l1_invept`)."""
        if eptp12 != self.eptp12:
            self.eptp12 = eptp12
            self._new_ept02()

    def l1_invept(self) -> None:
        """L1's INVEPT exits to L0 (handle_invept: the shadow roots of that EPTP are freed)."""
        self.events["nested.invept"] += 1
        self.step("l0:invept:drop_ept02")
        self._new_ept02()

    def _new_ept02(self) -> None:
        old = self.eptp02
        self.ept02 = PageTableBuilder.ept(self.memory, self.alloc)
        ad = bool(self.eptp12 is not None and self.eptp12 & (1 << 6))
        self.eptp02 = L.make_eptp(self.ept02.root, ad=ad)
        self.processor.set_eptp(self.eptp02)
        if old is not None:
            self.processor.invept(1, old)

    def _fix_ept02(self, gpa: int, walk: Ept12Walk) -> None:
        """``FNAME(fetch)``: the EPT02 leaf for ``gpa``: EPT12's leaf address through EPT01
        (identity), EPT12's permissions and memory type, at EPT12's page size."""
        assert self.ept02 is not None
        size = 1 << _SHIFT[walk.level]
        target = walk.entry & ~(size - 1) & ((1 << self.memory.maxphyaddr) - 1)
        memtype = (walk.entry >> 3) & 7
        self.ept02.map(gpa & ~(size - 1), target, size, r=bool(walk.rwx & 1),
                       w=bool(walk.rwx & 2), x=bool(walk.rwx & 4), memtype=memtype,
                       ipat=bool(walk.entry & L.EPT_IPAT))
        self.events["nested.ept02.fix"] += 1
        self.step(f"l0:ept02_fix:{walk.level}")

    # -- the ExitHandler protocol of fastmmio.sim.cpu ---------------------------------------

    def ept_exit(self, info: ExitInfo, regs: dict[str, int]) -> bool:
        """An EPT violation (or misconfiguration) in EPT02 reaches L0, which walks EPT12."""
        self.steps = []
        gpa = info.guest_physical_address or 0
        q = info.qualification
        access = 1 if q & L.QUAL_WRITE else 2 if q & L.QUAL_FETCH else 0
        assert self.eptp12 is not None, "L1 has not loaded an EPTP"
        w = walk_ept12(self.memory, self.eptp12, gpa, access,
                       execute_only=getattr(self.processor, "execute_only", True))
        self.events["nested.ept12.ref"] += w.refs
        self.step(f"l0:ept12_walk:{w.refs}:{w.outcome}")
        if w.outcome == "present":
            self._fix_ept02(gpa, w)
            return True
        length = info.instruction_length if self.model.fills_length_on_ept else None
        if w.outcome == "misconfig":
            # nested_ept_inject_page_fault: PFERR_RSVD_MASK -> EPT misconfiguration, qual 0
            synth = ExitInfo(EXIT_EPT_MISCONFIG, 0, gpa, None, length)
        else:
            # exit qualification: the access bits, bits 5:3 from EPT12's permissions, the
            # guest-linear bits as the processor reported them
            qual = (q & (L.QUAL_READ | L.QUAL_WRITE | L.QUAL_FETCH | L.QUAL_GLA_VALID
                         | L.QUAL_TRANSLATED | L.QUAL_NMI_UNBLOCKING))
            if w.outcome == "permission":
                qual |= (w.rwx & 7) << 3
            synth = ExitInfo(EXIT_EPT_VIOLATION, qual, gpa, info.guest_linear_address, length)
        self.last_ept_reflected = synth
        return self._reflect(synth, regs, lambda: self.l1.ept_exit(synth, regs))

    def io_exit(self, info: ExitInfo, regs: dict[str, int], port: int, size: int,
                is_in: bool, value: int) -> bool:
        self.steps = []
        return self._reflect(info, regs,
                             lambda: self.l1.io_exit(info, regs, port, size, is_in, value))

    def cpuid_exit(self, info: ExitInfo, regs: dict[str, int]) -> bool:
        self.steps = []
        return self._reflect(info, regs, lambda: self.l1.cpuid_exit(info, regs))

    def vmcall_exit(self, info: ExitInfo, regs: dict[str, int]) -> bool:
        self.steps = []
        return self._reflect(info, regs, lambda: self.l1.vmcall_exit(info, regs))

    def _reflect(self, synth: ExitInfo, regs: dict[str, int], handler: Any) -> bool:
        """``nested_vmx_vmexit`` (VMCS12 filled, L1 entered), L1's handler, then L1's VMRESUME
        trapping to L0 and L0 entering L2 again. When L1's KVM_RUN returns to its userspace
        instead, L1 resumes L2 only at its next KVM_RUN: :meth:`resume_l2` then."""
        name = self.model.name
        self.last_reflected = synth
        self.events[f"nested.reflect.{name}"] += 1
        self.step(f"l0:reflect:{synth.name}")
        go_on = handler()
        if go_on:
            self.resume_l2()
        return go_on

    def resume_l2(self) -> None:
        """L1's VMRESUME traps to L0 (``handle_vmresume`` -> ``nested_vmx_run``), which
        enters L2 (``prepare_vmcs02``)."""
        name = self.model.name
        self.events[f"nested.vmresume.{name}"] += 1
        self.events[f"nested.enter_l2.{name}"] += 1
        self.step("l0:vmresume:enter_l2")

    def __getattr__(self, name: str) -> Any:
        # everything else the CPU or a caller asks of the handler is L1's (last_exit, ...)
        if name == "l1" or self.__dict__.get("l1") is None:
            raise AttributeError(name)
        return getattr(self.l1, name)
