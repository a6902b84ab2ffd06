"""One notification, step by step, with what each step costs (``fastmmio explain ROUTE``).

The route runs on the simulator (:class:`~fastmmio.sim.backend.SimSession`): a warm-up batch
first (first-touch EPT violations, SPTEs installed, translation caches filled), then a batch
of three notifications whose *middle* one is recorded: from just after the loop's ``JNZ`` of
the first iteration to the ``JNZ`` of the second, so what is recorded is one iteration of the
kvm-unit-tests loop (the access, ``DEC``, ``JNZ``), with steady-state notifications on both
sides of it.

What is recorded, in the order it happens:

* every event the models count (names from :mod:`fastmmio.sim.events`): the machine's one
  event counter is switched to an :class:`EventTrace`, a ``Counter`` that also appends
  ``(name, delta)`` to a log while tracing; the processor's fast-path TLB hits, which the
  walker adds up and flushes in bulk, are flushed after every translation so they appear
  where they happen;
* each paging-structure reference of a walk, with its host-physical address and where the
  walk data-cache model found it (``Processor.ref_log``);
* each VM exit with its exit information (reason, qualification, GPA, GLA, instruction
  length: SDM 27.2.1);
* each step of KVM's handling (``KvmVcpu.steps``: ``fast_mmio_bus``, ``mmu:...``,
  ``emulate:...``, ``skip:...``);
* each guest instruction executed natively, disassembled;
* nested (``--nested L0``): L0's steps (:mod:`fastmmio.sim.nested`) and the exit L0
  synthesizes for KVM in L1, with the VMCS12 fields it fills (an instruction length SDM 27.2.4
  leaves undefined and the L0 does not fill shows as "undefined (SDM 27.2.4)").
  :func:`l0_steps` groups the rows into L0's stages, in order: the L2 exit, L0's EPT12 walk,
  the synthesized exit, L1's handler, the VMRESUME trap, the entry to L2 (and the guest's own
  part), adding up to the same total.

Every event row is priced with the cost profile (:class:`~fastmmio.costs.CostModel`): count
times the unit price of the most specific profile key. The rows add up to the cost model's
own total for the notification's event vector (``CostModel.price(events, 1).cycles``), which
:func:`explain` checks.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from iced_x86 import Decoder, Formatter, FormatterSyntax, Mnemonic
from unicorn import UC_HOOK_CODE
from unicorn import x86_const as X

from fastmmio.costs import CostModel, Pricing, Profile
from fastmmio.errors import FastmmioError, IoEventFdError, UsageError
from fastmmio.routes import Route, build_machine, get_route
from fastmmio.sim.backend import SimBackend, SimOptions, SimSession
from fastmmio.sim.kvm.variants import get_variant
from fastmmio.sim.nested import get_l0
from fastmmio.sim.svm.exits import SvmExit
from fastmmio.sim.vmx.exits import EXIT_EPT_MISCONFIG, EXIT_EPT_VIOLATION, ExitInfo

DEFAULT_PROFILE = "skylake-sp"
#: the profile each architecture is priced with unless one is given
ARCH_PROFILES = {"vmx": DEFAULT_PROFILE, "svm": "zen4"}
DEFAULT_CPL = 0  # the simulator models VMX, where kvm-unit-tests runs its loop at CPL0
DEFAULT_WARMUP = 8
TRACED_BATCH = 3  # the recorded notification is the middle one of these
LENGTH_UNDEFINED = "undefined (SDM 27.2.4)"


class ExplainError(FastmmioError):
    """The recording could not be made (the route has no doorbell loop, or the trace and the
    machine's counters disagree: a bug, reported rather than shown wrong)."""


# ------------------------------------------------------------------------------------------
# the ordered event log
# ------------------------------------------------------------------------------------------


class EventTrace(Counter):
    """A ``Counter`` that, while :attr:`log` is a list, also appends ``("event", name,
    delta)`` for every change of a count, in order.

    :meth:`install` turns the machine's existing shared counter into one in place (the
    processor, the MMU, the buses, the emulator and the vCPU all hold that same object, so
    replacing it would need the machine rebuilt). ``clear()`` followed by ``update(snapshot)``
    (how sim/cpu puts back counts it decided not to keep) logs the net change only, taking back
    the latest matching entries.
    """

    log: list[tuple] | None
    _cleared: dict[str, int] | None

    @classmethod
    def install(cls, counter: Counter) -> "EventTrace":
        if not isinstance(counter, cls):
            counter.__class__ = cls
        counter.log = None
        counter._cleared = None
        return counter  # type: ignore[return-value]

    def __setitem__(self, key: str, value: int) -> None:
        log = self.__dict__.get("log")
        if log is not None:
            delta = value - dict.get(self, key, 0)
            if delta:
                self._record(key, delta)
        super().__setitem__(key, value)

    def clear(self) -> None:
        if self.__dict__.get("log") is not None and self._cleared is None:
            self._cleared = dict(self)
        dict.clear(self)

    def update(self, iterable: Any = None, /, **kwds: int) -> None:
        log = self.__dict__.get("log")
        if log is None:
            super().update(iterable, **kwds)
            return
        before = self._cleared if self._cleared is not None else dict(self)
        self._cleared = None
        self.log = None
        try:
            super().update(iterable, **kwds)
        finally:
            self.log = log
        for key in list(before) + [k for k in self if k not in before]:
            delta = dict.get(self, key, 0) - before.get(key, 0)
            if delta:
                self._record(key, delta)

    def _record(self, key: str, delta: int) -> None:
        log = self.log
        assert log is not None
        if delta > 0:
            log.append(("event", key, delta))
            return
        # a count taken back: remove it from the latest entries that added it
        need = -delta
        for i in range(len(log) - 1, -1, -1):
            e = log[i]
            if e[0] == "event" and e[1] == key and e[2] > 0:
                take = min(need, e[2])
                log[i] = ("event", key, e[2] - take)
                need -= take
                if need == 0:
                    break
        log[:] = [e for e in log if not (e[0] == "event" and e[2] == 0)]
        if need:
            log.append(("event", key, -need))


class _RefLog(list):
    """``Processor.ref_log`` that also puts each walk reference into the event log."""

    def __init__(self, log: list[tuple]):
        super().__init__()
        self._log = log

    def append(self, item: tuple) -> None:  # (structure, level, hpa, served)
        super().append(item)
        self._log.append(("ref",) + tuple(item))


# ------------------------------------------------------------------------------------------
# what the events mean
# ------------------------------------------------------------------------------------------

_LEVEL = {"pml4e": "PML4E", "pdpte": "PDPTE", "pde": "PDE", "pte": "PTE"}
_SERVED = {"l1": "L1D", "l2": "L2", "llc": "LLC", "mem": "memory"}
_HANDLER = {"ept_misconfig": "handle_ept_misconfig", "ept_violation": "handle_ept_violation",
            "npf": "npf_interception",
            "io": "handle_io (kvm_fast_pio)", "cpuid": "handle_cpuid (kvm_emulate_cpuid)",
            "hlt": "handle_halt", "vmcall": "kvm_emulate_hypercall"}
_TEXT = {
    "vmentry": "VM entry: back into the guest",
    "kvm.handler.ept_violation.prelude": "KVM: handle_ept_violation up to the RFC's early return",
    "kvm.handler.npf.prelude": "KVM: npf_interception up to the RFC 2/3 early return",
    "kvm.skip.next_rip": "skip: RIP = the VMCB's next RIP",
    "kvm.emulate.insn_bytes": "x86 emulator: instruction bytes from the VMCB (decode assists), no fetch",
    "kvm.bus.probe": "  bus: one bsearch step or device tried",
    "kvm.eventfd.signal": "ioeventfd matched: eventfd_signal",
    "kvm.emulate": "x86 emulator: x86_emulate_insn executes it",
    "kvm.emulate.fetch": "x86 emulator: instruction bytes fetched",
    "kvm.emulate.decode": "x86 emulator: instruction decoded",
    "kvm.emulate.walk": "x86 emulator: software walk of the guest's tables (gva_to_gpa)",
    "kvm.emulate.walk.ref": "  software walk: one guest entry read",
    "kvm.emulate.exception": "x86 emulator: exception queued for the guest",
    "kvm.emulate.failure": "x86 emulator: emulation failed",
    "kvm.skip.vmcs_length": "skip: RIP += VM-exit instruction length",
    "kvm.skip.decode": "skip: RIP advanced by decoding (EMULTYPE_SKIP)",
    "kvm.coalesced.append": "appended to the coalesced ring (no exit)",
    "kvm.mmu.page_fault": "MMU: kvm_mmu_page_fault",
    "kvm.mmu.fast_page_fault": "MMU: fast_page_fault attempted",
    "kvm.mmu.slow_path": "MMU: slow path (memslot, pfn, map)",
    "kvm.mmu.memslot_lookup": "MMU: memslot look-up",
    "kvm.mmu.spte_install": "MMU: SPTE installed",
    "kvm.mmu.spte_install.mmio": "MMU: MMIO SPTE installed",
    "kvm.mmu.mmio_spte_stale": "MMU: stale MMIO SPTE (old generation)",
    "kvm.mmu.bad_page": "MMU: bad page / read-only memslot write: emulate",
    "kvm.mmu.mmio_info_hit": "MMU: answered from the vCPU's MMIO info",
    "kvm.mmu.spte_walk": "MMU: lockless SPTE walk",
    "kvm.mmu.spurious": "MMU: spurious fault (SPTE already allows it)",
    "nested.ept12.ref": "L0: software walk of EPT12, one entry read (FNAME(walk_addr_generic))",
    "nested.ept02.fix": "L0: EPT02 entry installed from EPT12 (FNAME(fetch)); L2 resumes",
    "nested.invept": "L0: L1's INVEPT trapped, EPT02 dropped",
    "kvm.mmu.retry": "MMU: no MMIO SPTE: retry",
    "guest.insn": "guest instruction",
}


_NESTED_STEP = {
    "reflect": "exit synthesized for L1 (nested_vmx_vmexit: prepare_vmcs12, enter L1)",
    "vmresume": "L1's VMRESUME trapped (handle_vmresume -> nested_vmx_run)",
    "enter_l2": "L2 entered again (prepare_vmcs02)",
}


def describe_event(name: str) -> str:
    """A line of text for an event name (the vocabulary of :mod:`fastmmio.sim.events`)."""
    if name in _TEXT:
        return _TEXT[name]
    parts = name.split(".")
    head = parts[0]
    if head == "walk" and len(parts) == 4 and parts[1] == "ref":
        what = {"guest": "guest", "nested": "nested"}.get(parts[2], "EPT")
        return f"walk: {what} {_LEVEL.get(parts[3], parts[3])} read"
    if head == "walk" and len(parts) == 3 and parts[1] == "served":
        return f"  found in {_SERVED.get(parts[2], parts[2])}"
    if head == "walk" and len(parts) == 4 and parts[1] == "ad":
        return f"walk: {parts[2]} {_LEVEL.get(parts[3], parts[3])} accessed/dirty flags written"
    if head == "tlb" and len(parts) == 3:
        kind = parts[1].replace("_", "-")
        return f"{kind} TLB {parts[2].replace('_', ' ')}"
    if head == "psc" and len(parts) == 4:
        kind = parts[1].replace("_", "-")
        level = _LEVEL.get(parts[2], parts[2])
        if parts[1] == "guest_physical":
            level = f"EPT {level}"
        return f"{kind} paging-structure cache ({level}) {parts[3]}"
    if head == "fault" and len(parts) == 2:
        return f"translation refused: {parts[1].replace('_', ' ')}"
    if head == "inv" and len(parts) == 2:
        return f"invalidation: {parts[1].replace('_', ' ')}"
    if head == "exit" and len(parts) == 2:
        return f"VM exit: {parts[1]}"
    if head == "nested" and len(parts) == 3 and parts[1] in _NESTED_STEP:
        return f"L0 ({parts[2]}): {_NESTED_STEP[parts[1]]}"
    if name.startswith("kvm.handler.") and len(parts) == 3:
        return f"KVM: {_HANDLER.get(parts[2], parts[2])}"
    if name.startswith("kvm.bus.lookup.") and len(parts) == 4:
        return f"kvm_io_bus on {parts[3]}"
    if name.startswith("kvm.user_exit.") and len(parts) == 3:
        kind = parts[2].upper()
        return f"KVM_RUN returns to userspace: KVM_EXIT_{kind} (handled, next KVM_RUN)"
    return name


def describe_exit(info: ExitInfo | SvmExit) -> str:
    """Exit information as KVM's tracepoint would show it (SDM 27.2.1; an SVM #VMEXIT's
    EXITCODE, EXITINFO1/2, next RIP and instruction bytes, APM 15.6-15.8)."""
    if isinstance(info, SvmExit):
        return info.describe()
    parts = [f"reason {info.reason}"]
    if info.reason in (EXIT_EPT_VIOLATION, EXIT_EPT_MISCONFIG) or info.qualification:
        parts.append(f"qual {info.qualification:#x}")
    if info.guest_physical_address is not None:
        parts.append(f"GPA {info.guest_physical_address:#x}")
    if info.guest_linear_address is not None:
        parts.append(f"GLA {info.guest_linear_address:#x}")
    if info.instruction_length is not None:
        parts.append(f"len {info.instruction_length}"
                     + ("" if info.instruction_length_defined else " (architecturally undefined)"))
    elif not info.instruction_length_defined:
        parts.append(f"len {LENGTH_UNDEFINED}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One row: an event (priced) or a KVM handler step (``event`` None, no cycles of its own:
    what it does is priced by the events around it)."""

    index: int
    what: str
    event: str | None = None
    count: int = 0
    unit_cycles: float = 0.0
    cycles: float = 0.0
    component: str | None = None
    detail: str = ""

    @property
    def is_event(self) -> bool:
        return self.event is not None


@dataclass
class Explanation:
    route: str
    description: str
    sim: str  # SimOptions.describe()
    profile: str
    nested: bool
    cpl: int
    steps: list[Step]
    events: dict[str, int]  # the notification's event vector
    pricing: Pricing
    l1_exits: list = field(default_factory=list)  # exits KVM (L1) handled, as it saw them
    kvm_rules: str = ""  # the variant's kernel, ioeventfd rules and emulator operand address
    l0: str = "off"  # the L0 model (nested) or "off"
    l0_rules: str = ""  # what that L0 fills (the instruction length rule)

    @property
    def total_cycles(self) -> float:
        return self.pricing.cycles

    @property
    def event_names(self) -> list[str]:
        """Every event of the notification in order, one entry per row."""
        return [s.event for s in self.steps if s.event is not None]

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "description": self.description,
            "sim": self.sim,
            "profile": self.profile,
            "nested": self.nested,
            "cpl": self.cpl,
            "total_cycles": self.total_cycles,
            "breakdown": dict(self.pricing.breakdown),
            "events": dict(self.events),
            "steps": [asdict(s) for s in self.steps],
            "kvm_rules": self.kvm_rules,
            "l0": self.l0,
            "l0_rules": self.l0_rules,
            "l0_steps": [{"stage": n, "cycles": c, "events": ev} for n, c, ev in l0_steps(self)]
            if self.l0 != "off" else [],
            "l1_exits": [{"reason": x.name, "qualification": x.qualification,
                          "guest_physical_address": x.guest_physical_address,
                          "instruction_length": (x.instruction_length
                                                 if x.instruction_length is not None
                                                 else (None if x.instruction_length_defined
                                                       else LENGTH_UNDEFINED)),
                          "instruction_length_defined": x.instruction_length_defined}
                         for x in self.l1_exits],
        }


@dataclass(frozen=True)
class ExplainOptions:
    """The simulated machine (see :class:`SimOptions`), the profile, the guest's CPL and the
    warm-up batch's length."""

    sim: SimOptions = field(default_factory=SimOptions)
    profile: "str | Path | Profile" = DEFAULT_PROFILE  # a name, a file, or a loaded profile
    cpl: int = DEFAULT_CPL
    warmup: int = DEFAULT_WARMUP

    def __post_init__(self) -> None:
        if self.cpl not in (0, 3):
            raise UsageError(f"the guest CPL must be 0 or 3, not {self.cpl}")
        if not 1 <= self.warmup <= 1 << 20:
            raise UsageError("the warm-up batch must have between 1 and 2^20 iterations")


# ------------------------------------------------------------------------------------------
# recording
# ------------------------------------------------------------------------------------------


def _loop_branch(session: SimSession) -> int:
    """Guest address of the doorbell loop's backward ``JNZ`` (guest/program.doorbell_loop)."""
    image = session.machine.image
    code = next((r.data for r in image.regions if r.gpa == image.code_gpa), b"")
    for insn in Decoder(64, code[: image.code_size], ip=image.code_gpa):
        if insn.mnemonic == Mnemonic.JNE and insn.near_branch_target < insn.ip:
            return insn.ip
    raise ExplainError(f"guest program {image.program!r} has no doorbell loop to record")


class _Recorder:
    """Hooks on one simulated machine that record the middle notification of a batch."""

    def __init__(self, session: SimSession):
        self.session = session
        self.log: list[tuple] = []
        self.counter = EventTrace.install(session.events)
        self.start: dict[str, int] | None = None
        self.end: dict[str, int] | None = None
        self._jnz = _loop_branch(session)
        self._armed = False
        self._starting = False
        self._stopping = False
        self._fmt = Formatter(FormatterSyntax.NASM)
        self._fmt.hex_prefix, self._fmt.hex_suffix = "0x", ""
        self._fmt.uppercase_hex = False
        self._fmt.branch_leading_zeros = False
        self._fmt.show_branch_size = False
        proc, vcpu = session.processor, session.vcpu

        translate = proc.translate

        def traced_translate(*a: Any, **kw: Any):
            r = translate(*a, **kw)
            if self.counter.log is not None:
                proc.events  # flush the fast path's bulk TLB-hit count where it happened
            return r

        proc.translate = traced_translate
        proc.ref_log = _RefLog(self.log)

        self.l1_exits: list[ExitInfo] = []
        l0 = session.l0
        for name in ("ept_exit", "io_exit", "cpuid_exit", "vmcall_exit"):
            if l0 is None:
                setattr(vcpu, name, self._exit_wrapper(getattr(vcpu, name)))
            else:  # the hardware exit reaches L0; L1 gets the one L0 synthesizes
                setattr(l0, name, self._exit_wrapper(getattr(l0, name)))
                setattr(vcpu, name, self._exit_wrapper(getattr(vcpu, name), "l1exit"))
        if l0 is not None:
            self._trace_steps(l0, "l0")
        self._trace_steps(vcpu, "kvm")
        # After SimSession's own code hook (unicorn runs hooks in the order they were added):
        # its guest.insn count for an instruction is logged just before this hook's marker.
        session.cpu.uc.hook_add(UC_HOOK_CODE, self._on_insn, None, self._jnz, self._jnz)
        session.cpu.uc.hook_add(UC_HOOK_CODE, self._on_any_insn, None,
                                session.machine.image.code_gpa,
                                session.machine.image.code_gpa + session.machine.image.code_size - 1)
        self._code = code_bytes(session)

    def _trace_steps(self, who: Any, kind: str) -> None:
        """Log each ``who.step(what)`` (KVM's or L0's) as ``(kind, what)`` while tracing."""
        step = who.step

        def traced_step(what: str) -> None:
            step(what)
            if self.counter.log is not None:
                self.log.append((kind, what))

        who.step = traced_step

    def _exit_wrapper(self, handler, kind: str = "exit"):
        svm_exit = getattr(self.session.vcpu, "_svm_exit", None)

        def wrapped(info: ExitInfo, regs: dict[str, int], *rest: Any) -> bool:
            if self.counter.log is not None:
                # (on SVM the #VMEXIT the handler reads, not the CPU's VMX-shaped record)
                self.log.append((kind, svm_exit(info) if svm_exit is not None else info))
                if svm_exit is None and (kind == "l1exit" or self.session.l0 is None):
                    self.l1_exits.append(info)  # VMX exits as KVM saw them (VMCS fields)
            return handler(info, regs, *rest)
        return wrapped

    def _on_insn(self, uc, address: int, size: int, _user) -> None:
        """At the loop's JNZ: R15 (the loop counter, already decremented) says which
        iteration ends here. Start after the first (R15 = 2 of 3), stop after the second."""
        if not self._armed:
            return
        r15 = uc.reg_read(X.UC_X86_REG_R15)
        if r15 == TRACED_BATCH - 1 and self.counter.log is None:
            self.session.processor.events  # flush pending bulk counts before the window
            self.start = dict(self.counter)
            self._starting = True
        elif r15 == TRACED_BATCH - 2 and self.counter.log is not None:
            self._stopping = True

    def _on_any_insn(self, uc, address: int, size: int, _user) -> None:
        if self._starting:
            self._starting = False
            self.counter.log = self.log
            return
        if self.counter.log is None:
            return
        self.log.append(("insn", address, size))
        if self._stopping:
            self._stopping = False
            self.session.processor.events
            self.counter.log = None
            self.end = dict(self.counter)
            self._armed = False

    def disassemble(self, address: int, size: int) -> str:
        base = self.session.machine.image.code_gpa
        data = self._code[address - base: address - base + size]
        insn = Decoder(64, data, ip=address).decode()
        return self._fmt.format(insn)

    def record(self, warmup: int) -> tuple[list[tuple], Counter]:
        s = self.session
        s.run_batch(warmup)
        self._armed = True
        s.run_batch(TRACED_BATCH)
        if self.start is None or self.end is None:
            raise ExplainError("the middle notification of the batch was not seen: the guest "
                               "did not run the doorbell loop as expected")
        delta = Counter({k: v - self.start.get(k, 0) for k, v in self.end.items()})
        return self.log, +delta


def code_bytes(session: SimSession) -> bytes:
    image = session.machine.image
    return next((r.data for r in image.regions if r.gpa == image.code_gpa), b"")


def _rows(log: Iterable[tuple], model: CostModel, recorder: _Recorder) -> list[Step]:
    """Turn the log into rows; markers (instruction, exit information, walk reference) become
    the detail of the event row they belong to."""
    rows: list[dict[str, Any]] = []
    last_event: dict[str, Any] | None = None
    last_ref_row: dict[str, Any] | None = None
    for entry in log:
        kind = entry[0]
        if kind == "event":
            _, name, delta = entry
            r = model.resolve(name)
            row = {"what": describe_event(name), "event": name, "count": delta,
                   "unit_cycles": r.unit_cycles, "cycles": delta * r.unit_cycles,
                   "component": r.component, "detail": ""}
            rows.append(row)
            last_event = row
            if name.startswith("walk.ref."):
                last_ref_row = row
        elif kind == "insn":
            _, address, size = entry
            if last_event is None or last_event["event"] != "guest.insn" or last_event["detail"]:
                raise ExplainError("guest instruction markers and guest.insn counts are out of "
                                   "step (unicorn hook order changed?)")
            last_event["what"] = f"guest: {recorder.disassemble(address, size)}"
            last_event["detail"] = f"RIP {address:#x}"
        elif kind == "exit":
            info: ExitInfo = entry[1]
            target = next((r for r in reversed(rows) if r["event"] == f"exit.{info.name}"), None)
            if target is not None and not target["detail"]:
                target["detail"] = describe_exit(info)
        elif kind == "ref":
            _, structure, level, hpa, served = entry
            if last_ref_row is not None and not last_ref_row["detail"]:
                last_ref_row["detail"] = f"HPA {hpa:#x}"
        elif kind == "l1exit":
            info = entry[1]
            target = next((r for r in reversed(rows)
                           if r["event"] and r["event"].startswith("nested.reflect.")), None)
            if target is not None and not target["detail"]:
                target["detail"] = f"VMCS12 for L1: {info.name}, " + describe_exit(info)
        elif kind in ("kvm", "l0"):
            who = "KVM step" if kind == "kvm" else "L0 step"
            rows.append({"what": f"{who}: {entry[1]}", "event": None, "count": 0,
                         "unit_cycles": 0.0, "cycles": 0.0, "component": None, "detail": ""})
    return [Step(index=i + 1, **row) for i, row in enumerate(rows)]


def explain(route: Route | str, options: ExplainOptions = ExplainOptions()) -> Explanation:
    """Record one steady-state notification of ``route`` and price every step of it."""
    if isinstance(route, str):
        route = get_route(route)
    if route.variant is not None and route.variant != options.sim.variant:
        raise UsageError(f"route {route.name} needs the KVM variant {route.variant!r}; "
                         f"use --variant {route.variant}")
    model = CostModel(options.profile, nested=options.sim.is_nested)
    machine = build_machine(route, options.cpl)
    try:
        # the reference path: explain logs guest.insn per instruction beside its own hooks
        # and every exit as a stop (fast exits count the same events, in blocks)
        session = SimBackend(replace(options.sim, fast_exits=False)).open(machine)
    except IoEventFdError as exc:
        raise UsageError(f"route {route.name} cannot run under the {options.sim.variant} KVM "
                         f"variant: {exc}") from None
    with session:
        rec = _Recorder(session)
        log, events = rec.record(options.warmup)
        model.check(events)
        steps = _rows(log, model, rec)
    # The rows are the log; the log must be exactly the counter's change over the window.
    from_rows: Counter[str] = Counter()
    for s in steps:
        if s.event is not None:
            from_rows[s.event] += s.count
    if +from_rows != events:
        raise ExplainError(f"the recorded steps and the machine's counters disagree: "
                           f"{dict(+from_rows - events)} vs {dict(events - from_rows)}")
    pricing = model.price(events, 1)
    total = math.fsum(s.cycles for s in steps)
    if not math.isclose(total, pricing.cycles, rel_tol=1e-9, abs_tol=1e-9):
        raise ExplainError(f"the steps add up to {total} cycles, the cost model says "
                           f"{pricing.cycles}")
    return Explanation(
        route=route.name,
        description=route.description,
        sim=options.sim.describe(),
        profile=model.profile.name,
        nested=model.nested,
        cpl=options.cpl,
        steps=steps,
        events=dict(events),
        pricing=pricing,
        l1_exits=list(rec.l1_exits),
        kvm_rules=get_variant(options.sim.variant).rules(),
        l0=options.sim.nested,
        l0_rules=get_l0(options.sim.nested).length_rule() if options.sim.is_nested else "",
    )


#: the stages of a nested notification, in order (see :func:`l0_steps`)
L0_STAGES = ("L2 guest", "L2 exit to L0", "L0's EPT12 walk", "exit synthesized for L1",
             "L1's handler (KVM)", "L1's VMRESUME trapped by L0", "entry to L2")


def l0_steps(e: Explanation) -> list[tuple[str, float, dict[str, int]]]:
    """The priced rows of a nested notification grouped by stage (:data:`L0_STAGES`), in the
    order the stages happen: the L2 exit (``exit.*``), L0's software walk of EPT12
    (``nested.ept12.*``), the exit L0 synthesizes (``nested.reflect.*``), everything KVM (L1)
    does until its VMRESUME (``nested.vmresume.*``), and L0's entry into L2
    (``nested.enter_l2.*``, ``vmentry``); the rest (the guest's instructions and its
    translations) is the L2 guest. The stages add up to the notification's total."""
    out: dict[str, tuple[float, Counter]] = {s: (0.0, Counter()) for s in L0_STAGES}
    in_l1 = False
    for st in e.steps:
        if st.event is None:
            continue
        ev = st.event
        if ev.startswith("exit."):
            stage = "L2 exit to L0"
        elif ev.startswith("nested.ept12.") or ev.startswith("nested.ept02."):
            stage = "L0's EPT12 walk"
        elif ev.startswith("nested.reflect."):
            stage, in_l1 = "exit synthesized for L1", True
        elif ev.startswith("nested.vmresume."):
            stage, in_l1 = "L1's VMRESUME trapped by L0", False
        elif ev.startswith("nested.enter_l2.") or ev == "vmentry":
            stage = "entry to L2"
        elif in_l1:
            stage = "L1's handler (KVM)"
        else:
            stage = "L2 guest"
        cyc, cnt = out[stage]
        cnt[ev] += st.count
        out[stage] = (cyc + st.cycles, cnt)
    return [(s, out[s][0], dict(out[s][1])) for s in L0_STAGES]
