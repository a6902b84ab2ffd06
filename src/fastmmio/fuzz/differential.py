"""Differential fuzzing: random programs on the simulator and on this host's KVM, compared.

DESIGN.md: "Whatever the real backend can run, the simulator runs too, and tests compare their
guest-visible results". ``tests/kvm/test_differential.py`` does that route by route; this
module does it for random programs (:mod:`fastmmio.fuzz.programs`). One case:

1. build the program's :class:`~fastmmio.machine.Machine` (same image, same spec);
2. run one batch on :class:`~fastmmio.real.backend.RealBackend` and on
   :class:`~fastmmio.sim.backend.SimBackend` (``upstream`` variant, ``nested`` as the host);
3. compare (:func:`compare`) what the guest can see and what the devices saw:

   * how the batch ended (both must reach the done port);
   * the general registers, RIP and RFLAGS;
   * memory: the RAM data area, the read-only slot, the mailbox, then the rest of the RAM slot
     (the page tables' accessed/dirty flags included);
   * every exit to userspace in order, ``(kind, address, width, direction, data, count)``,
     when both backends kept all of them (the simulator keeps the first
     :data:`fastmmio.sim.backend.EXIT_SAMPLE`); always the exact histogram
     (``RunLoop.exit_histogram`` / ``SimSession.exit_histogram``);
   * the number of userspace exits, of coalesced-ring entries (the simulator counts them
     without keeping them, so their order and data are not compared) and every ioeventfd's
     count.

Documented exclusions (the comparison hides nothing else):

* RFLAGS.IOPL under PVM (:func:`rflags_mask`), for the reason ``tests/kvm/test_differential.py``
  gives: PVM runs CPL3 code with the hardware IOPL at 0 and emulates IN/OUT after the #GP
  (checking the TSS I/O bitmap), so KVM_GET_REGS reports IOPL 0 after a run; the simulator
  keeps the architectural IOPL 3.
* Nothing RDTSC-derived: these programs execute no RDTSC, so the RDTSC registers and the
  mailbox's T0/T1 that the route differential test excludes are compared here.
* KVM's binary statistics are not compared: a single batch is all first-touch faults, which
  are the host MMU's own business (PVM shadow paging vs the modelled EPT), as the route test
  explains.

A disagreement comes back as a :class:`CaseResult` whose :meth:`~CaseResult.report` shows the
program (disassembly, machine, initial registers) and every differing field. :func:`shrink`
reduces a disagreeing program while it keeps disagreeing the same way, and
:func:`save_regression` keeps it as a JSON file that ``tests/kvm/test_fuzz_differential.py``
replays. :func:`main` is ``python -m fastmmio.fuzz diff``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastmmio import layout
from fastmmio.argtypes import positive_int, positive_seconds
from fastmmio.errors import FastmmioError, GuestError, UsageError
from fastmmio.fuzz.programs import DATA_SIZE, DiffProgram, MemRef, data_bytes, programs
from fastmmio.guest.build import MAILBOX_SIZE
from fastmmio.machine import Machine
from fastmmio.result import BatchResult, HostInfo

REGS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
RFLAGS_IOPL = 0x3000  # RFLAGS.IOPL, bits 13:12 (SDM Vol. 1 3.4.3.3)
REAL_EXIT_SAMPLE = 4096  # the real run loop keeps this many exits in order
DEFAULT_WATCHDOG_S = 5.0  # a program runs a few dozen instructions; real KVM takes milliseconds
MEMORY_AREAS = {
    "data": (layout.DATA_GPA, DATA_SIZE),
    "mailbox": (layout.MAILBOX_GPA, MAILBOX_SIZE),
    "ro": (layout.RO_BASE, layout.RO_SIZE),
}


MMIO_CACHING_PARAM = Path("/sys/module/kvm/parameters/mmio_caching")


def host_mmio_caching(param: Path = MMIO_CACHING_PARAM) -> bool:
    """``kvm.mmio_caching`` of this host (``Y``/``N``; True when the file is missing, the
    kernel's default). The simulator is run with the same setting: with it off KVM installs
    no MMIO SPTEs (``kvm_mmu_set_mmio_spte_mask`` / ``enable_mmio_caching``,
    arch/x86/kvm/mmu/spte.c), so no MMIO access ends in an EPT misconfiguration and
    ``KVM_FAST_MMIO_BUS`` is never consulted: every MMIO access is emulated and a read at a
    length-0 ioeventfd exits to userspace. With it on (VMX), such a read is taken by
    ``handle_ept_misconfig``'s fast path, which signals the eventfd and skips the load without
    decoding it (68c3b4d1). PVM here has it off (measured: no fast MMIO path); found by this fuzzer when the
    simulator ran with caching on."""
    try:
        text = param.read_text().strip()
    except OSError:
        return True
    return text[:1] in ("Y", "y", "1")


def rflags_mask(kvm_kind: str) -> int:
    """The RFLAGS bits compared: all, except IOPL under PVM (see the module docstring and
    ``tests/kvm/test_differential.py::rflags_mask``, whose reason this is)."""
    full = (1 << 64) - 1
    return full & ~RFLAGS_IOPL if kvm_kind == "pvm" else full


# ------------------------------------------------------------------------------------------
# One backend's view of one batch
# ------------------------------------------------------------------------------------------


@dataclass
class Observation:
    """What one backend did with one program's batch."""

    backend: str
    outcome: str = "done"  # "done", or "error:<kind>" when the batch did not reach the done port
    message: str = ""
    regs: dict[str, int] = field(default_factory=dict)
    memory: dict[str, bytes] = field(default_factory=dict)  # MEMORY_AREAS plus "ram" (whole slot)
    exits: list[tuple] = field(default_factory=list)  # in order: (kind, addr, size, write, data, count)
    exits_complete: bool = True  # ``exits`` holds every userspace exit of the batch
    histogram: dict[tuple, int] = field(default_factory=dict)
    eventfds: dict[str, int] = field(default_factory=dict)
    user_exits: int = 0
    coalesced: int = 0  # coalesced-ring entries drained during the batch
    seconds: float = 0.0


def _exit_tuple(rec: Any) -> tuple:
    return (rec.kind, rec.addr, rec.size, bool(rec.is_write), rec.data, rec.count)


def _observe(obs: Observation, session: Any, batch: BatchResult | None, histogram: dict) -> None:
    if batch is not None:
        obs.exits = [_exit_tuple(r) for r in batch.exits]
        obs.exits_complete = len(batch.exits) == batch.user_exits
        obs.eventfds = dict(batch.eventfd_signals)
        obs.user_exits = batch.user_exits
        obs.coalesced = batch.coalesced_entries
    obs.histogram = dict(histogram)
    try:
        obs.regs = {k: v for k, v in session.regs().items() if k in REGS}
    except (FastmmioError, OSError) as exc:
        obs.message += f"; registers unreadable: {exc}"
    for name, (gpa, size) in MEMORY_AREAS.items():
        obs.memory[name] = session.read_guest(gpa, size)
    obs.memory["ram"] = session.read_guest(layout.RAM_BASE, layout.RAM_SIZE)


def run_real(machine: Machine, device: str = "/dev/kvm",
             watchdog_s: float = DEFAULT_WATCHDOG_S) -> Observation:
    """One batch on this host's KVM (:class:`~fastmmio.real.backend.RealBackend`)."""
    from fastmmio.real.backend import RealBackend

    obs = Observation("kvm")
    t0 = time.perf_counter()
    with RealBackend(device=device, watchdog_s=watchdog_s,
                     exit_sample=REAL_EXIT_SAMPLE).open(machine) as s:
        batch = None
        try:
            batch = s.run_batch(1)
        except GuestError as exc:
            obs.outcome = f"error:{getattr(exc, 'kind', 'guest')}"
            obs.message = str(exc)
        assert s.loop is not None
        _observe(obs, s, batch, s.loop.exit_histogram)
    obs.seconds = time.perf_counter() - t0
    return obs


def run_sim(machine: Machine, options: Any = None) -> Observation:
    """One batch on the simulator (:class:`~fastmmio.sim.backend.SimBackend`)."""
    from fastmmio.sim.backend import SimBackend, SimOptions

    obs = Observation("sim")
    t0 = time.perf_counter()
    with SimBackend(options if options is not None else SimOptions()).open(machine) as s:
        batch = None
        try:
            batch = s.run_batch(1)
        except GuestError as exc:
            last = s.vcpu.last_exit
            obs.outcome = f"error:{last.kind if last is not None else 'guest'}"
            obs.message = str(exc)
        _observe(obs, s, batch, s.exit_histogram)
    obs.seconds = time.perf_counter() - t0
    return obs


# ------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """One differing field: ``where`` (``regs.rax``, ``memory.data``, ``exits``,
    ``histogram``, ``eventfd.mmio-0``, ``user_exits``, ``outcome``) and both sides' values."""

    where: str
    kvm: str
    sim: str

    @property
    def category(self) -> str:
        return self.where.split(".")[0] if not self.where.startswith("memory") else self.where


def _bytes_diff(a: bytes, b: bytes, base: int, limit: int = 8) -> tuple[str, str]:
    ka, kb = [], []
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            ka.append(f"{base + i:#x}={x:#04x}")
            kb.append(f"{base + i:#x}={y:#04x}")
            if len(ka) == limit:
                break
    return " ".join(ka), " ".join(kb)


def _fmt_exit(e: tuple | None) -> str:
    if e is None:
        return "(none)"
    kind, addr, size, write, data, count = e
    s = f"{kind} {'write' if write else 'read'} {size}@{addr:#x} data={data:#x}"
    return s + (f" x{count}" if count != 1 else "")


def compare(kvm: Observation, sim: Observation, kvm_kind: str = "pvm") -> list[Difference]:
    """Every field in which the two observations differ (see the module docstring for what is
    compared and what is excluded)."""
    out: list[Difference] = []
    if kvm.outcome != sim.outcome:
        out.append(Difference("outcome", f"{kvm.outcome} {kvm.message}".strip(),
                              f"{sim.outcome} {sim.message}".strip()))
    mask = rflags_mask(kvm_kind)
    for r in REGS:
        a, b = kvm.regs.get(r), sim.regs.get(r)
        if r == "rflags" and a is not None and b is not None:
            a, b = a & mask, b & mask
        if a != b:
            out.append(Difference(f"regs.{r}", _hex(a), _hex(b)))
    for name, (gpa, _) in MEMORY_AREAS.items():
        a, b = kvm.memory.get(name, b""), sim.memory.get(name, b"")
        if a != b:
            out.append(Difference(f"memory.{name}", *_bytes_diff(a, b, gpa)))
    a, b = _ram_rest(kvm.memory.get("ram", b"")), _ram_rest(sim.memory.get("ram", b""))
    if a != b:
        out.append(Difference("memory.ram", *_bytes_diff(a, b, layout.RAM_BASE)))
    if kvm.exits_complete and sim.exits_complete and kvm.exits != sim.exits:
        i = next((i for i, (x, y) in enumerate(zip(kvm.exits, sim.exits)) if x != y),
                 min(len(kvm.exits), len(sim.exits)))
        pick = lambda xs: xs[i] if i < len(xs) else None  # noqa: E731
        out.append(Difference("exits", f"{len(kvm.exits)} exits; #{i}: {_fmt_exit(pick(kvm.exits))}",
                              f"{len(sim.exits)} exits; #{i}: {_fmt_exit(pick(sim.exits))}"))
    if kvm.histogram != sim.histogram:
        keys = sorted(set(kvm.histogram) | set(sim.histogram), key=repr)
        ka = [f"{_fmt_exit((*k, 1))} x{kvm.histogram.get(k, 0)}" for k in keys
              if kvm.histogram.get(k, 0) != sim.histogram.get(k, 0)]
        kb = [f"{_fmt_exit((*k, 1))} x{sim.histogram.get(k, 0)}" for k in keys
              if kvm.histogram.get(k, 0) != sim.histogram.get(k, 0)]
        out.append(Difference("histogram", "; ".join(ka), "; ".join(kb)))
    if kvm.user_exits != sim.user_exits:
        out.append(Difference("user_exits", str(kvm.user_exits), str(sim.user_exits)))
    if kvm.coalesced != sim.coalesced:
        out.append(Difference("coalesced", str(kvm.coalesced), str(sim.coalesced)))
    for name in sorted(set(kvm.eventfds) | set(sim.eventfds)):
        if kvm.eventfds.get(name) != sim.eventfds.get(name):
            out.append(Difference(f"eventfd.{name}", str(kvm.eventfds.get(name)),
                                  str(sim.eventfds.get(name))))
    return out


def _hex(v: int | None) -> str:
    return "(none)" if v is None else f"{v:#x}"


def _ram_rest(ram: bytes) -> bytes:
    """The RAM slot without the areas compared by name (data area, mailbox)."""
    if not ram:
        return ram
    m = bytearray(ram)
    for name in ("data", "mailbox"):
        gpa, size = MEMORY_AREAS[name]
        m[gpa - layout.RAM_BASE : gpa - layout.RAM_BASE + size] = bytes(size)
    return bytes(m)


def fast_bus_only(program: DiffProgram) -> str | None:
    """Why ``program``'s outcome depends on ``kvm.mmio_caching`` (see
    :meth:`DiffRunner.excluded`): it accesses the exact address of a length-0 MMIO ioeventfd
    with a load, or with a store inside a coalesced MMIO zone; None otherwise."""
    fast = {e.addr for e in program.ioeventfds if not e.pio and e.length == 0
            and layout.MMIO_BASE <= e.addr < layout.MMIO_BASE + layout.MMIO_SIZE}
    zones = [z for z in program.coalesced if not z.pio]
    for op in program.ops:
        if op.kind == "load" and op.addr in fast:
            return (f"{op.describe()}: a read at a length-0 MMIO ioeventfd takes "
                    "KVM_FAST_MMIO_BUS with kvm.mmio_caching on, not on this host")
        if (op.kind == "store" and op.addr in fast
                and any(z.addr <= op.addr < z.addr + z.size for z in zones)):
            return (f"{op.describe()}: a write at a length-0 MMIO ioeventfd inside a "
                    "coalesced zone goes to the ioeventfd through KVM_FAST_MMIO_BUS with "
                    "kvm.mmio_caching on, to the zone on this host")
    return None


# What a regression may store of the simulator's own outcome with kvm.mmio_caching on (the VMX
# paths), so that a case the host cannot check (its caching is off) still replays against it.
SIM_CACHING_ON_EXPECTED = "expected_sim_mmio_caching_on"
EXPECTED_FIELDS = ("outcome", "regs", "exits", "user_exits", "eventfds", "coalesced")


def run_sim_caching_on(program: DiffProgram) -> Observation:
    """``program`` on the simulator alone, ``upstream`` variant with ``kvm.mmio_caching`` on
    (no /dev/kvm needed)."""
    from fastmmio.sim.backend import SimOptions

    return run_sim(program.machine(), SimOptions(variant="upstream", mmio_caching=True))


def differs_from_expected(obs: Observation, expected: dict) -> list[str]:
    """Each field of ``expected`` (a subset of :data:`EXPECTED_FIELDS`, as JSON: registers by
    name, exits as lists) that ``obs`` does not match, as ``field: expected | got``."""
    out = []
    for name, want in expected.items():
        if name not in EXPECTED_FIELDS:
            raise UsageError(f"an expected outcome has no field {name!r} "
                             f"(fields: {', '.join(EXPECTED_FIELDS)})")
        got: Any = getattr(obs, name)
        if name == "regs":
            got = {r: got.get(r) for r in want}
        elif name == "exits":
            got = [list(e) for e in got]
        if got != want:
            out.append(f"{name}: expected {want} | got {got}")
    return out


# ------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    program: DiffProgram
    kvm: Observation
    sim: Observation
    differences: list[Difference]

    @property
    def agree(self) -> bool:
        return not self.differences

    @property
    def signature(self) -> tuple[str, ...]:
        """What kind of disagreement this is (the differing categories), for grouping."""
        return tuple(sorted({d.category for d in self.differences}))

    def report(self) -> str:
        """The program and every difference, for a human."""
        p = self.program
        lines = [f"differential case {p.digest()}: "
                 + ("backends agree" if self.agree else f"{len(self.differences)} difference(s)")]
        lines += ["machine:"] + [f"  {s}" for s in p.describe_machine()]
        lines += ["steps:"] + [f"  {i}: {o.describe()}" for i, o in enumerate(p.ops)]
        lines += ["code:"] + [f"  {s}" for s in p.listing()]
        lines += [f"exits (kvm): {', '.join(_fmt_exit(e) for e in self.kvm.exits) or '(none)'}"]
        lines += [f"exits (sim): {', '.join(_fmt_exit(e) for e in self.sim.exits) or '(none)'}"]
        if self.differences:
            lines.append("differences (kvm | sim):")
            lines += [f"  {d.where}: {d.kvm} | {d.sim}" for d in self.differences]
        return "\n".join(lines)


class DiffRunner:
    """Runs programs on both backends of this host. ``info``: the host (detected when None).

    ``mmio_caching``: the simulator's ``kvm.mmio_caching``: ``"host"`` (default: this host's
    setting, :func:`host_mmio_caching`, so both sides take the same MMIO paths), ``"on"`` or
    ``"off"``. With the simulator's caching on where the host's is off (PVM here), the
    simulator takes the VMX paths a host with caching would take (MMIO SPTEs, EPT
    misconfigurations, ``KVM_FAST_MMIO_BUS``), which still agree with the host on everything
    the guest and the devices see except one documented case, :meth:`excluded`."""

    def __init__(self, device: str = "/dev/kvm", info: HostInfo | None = None,
                 watchdog_s: float = DEFAULT_WATCHDOG_S, mmio_caching: str = "host"):
        from fastmmio.real.host import detect_host
        from fastmmio.sim.backend import SimOptions

        if mmio_caching not in ("host", "on", "off"):
            raise UsageError(f"mmio_caching must be host, on or off, not {mmio_caching!r}")
        self.device = device
        self.info = info if info is not None else detect_host(device)
        self.watchdog_s = watchdog_s
        self.host_mmio_caching = host_mmio_caching()
        caching = self.host_mmio_caching if mmio_caching == "host" else mmio_caching == "on"
        self.sim_options = SimOptions(variant="upstream",
                                      nested=self.info.nested and self.info.kvm_kind == "vmx",
                                      mmio_caching=caching)
        self.cases = 0

    @property
    def cpl(self) -> int:
        return self.info.guest_cpl

    def excluded(self, program: DiffProgram) -> str | None:
        """Why ``program`` cannot be compared on this host in this configuration, or None.

        The simulator has ``kvm.mmio_caching`` on, the host off, and the program accesses
        the exact address of a length-0 ioeventfd in the MMIO hole in a way only
        ``KVM_FAST_MMIO_BUS`` decides. With caching (VMX), once the page has an MMIO SPTE,
        such an access is an EPT misconfiguration whose fast-bus write (length 0, no data:
        ``handle_ept_misconfig``, 68c3b4d1) matches the ioeventfd, signals it and skips the
        instruction; without caching it is emulated and goes through ``KVM_MMIO_BUS`` in
        address order (``kvm_io_bus_get_first_dev``):

        * a load: skipped with caching, an exit to userspace without
          (tests/kvm/regressions/read-at-length0-ioeventfd.json);
        * a store inside a coalesced MMIO zone: with caching the ioeventfd takes it (the fast
          bus holds no coalesced zone); without it, whichever of the two
          ``kvm_io_bus_get_first_dev`` reaches first on ``KVM_MMIO_BUS``, which depends on the
          registration order and on unrelated neighbours, ``kvm_io_bus_cmp`` being no total
          order (tests/kvm/regressions/length0-ioeventfd-in-coalesced-zone.json: the zone).
        """
        if not self.sim_options.mmio_caching or self.host_mmio_caching:
            return None
        return fast_bus_only(program)

    def run(self, program: DiffProgram) -> CaseResult:
        if program.cpl != self.cpl:
            program = dataclasses.replace(program, cpl=self.cpl)
        why = self.excluded(program)
        if why is not None:
            raise UsageError(f"program {program.digest()} is not comparable here: {why}")
        machine = program.machine()
        kvm = run_real(machine, self.device, self.watchdog_s)
        sim = run_sim(machine, self.sim_options)
        self.cases += 1
        return CaseResult(program, kvm, sim, compare(kvm, sim, self.info.kvm_kind))


# ------------------------------------------------------------------------------------------
# Shrinking and keeping regressions
# ------------------------------------------------------------------------------------------


def _simpler_ops(op: Any) -> list[Any]:
    """Simpler variants of one step: plain ``[base]`` addressing, no segment override, no
    32-bit addressing, no preset value."""
    out = []
    m = op.mem
    if m is not None and m.mode != "base" and m.mode != "moffs":
        base = m.base or "RSI"
        out.append(dataclasses.replace(op, mem=MemRef("base", base=base)))
    if m is not None and (m.segment or m.addr32):
        out.append(dataclasses.replace(op, mem=dataclasses.replace(m, segment="", addr32=False)))
    if op.kind in ("store", "out") and op.value not in (None, 0) and op.form != "mov_imm":
        out.append(dataclasses.replace(op, value=0))
    return out


def shrink(program: DiffProgram, still_fails: Callable[[DiffProgram], bool],
           max_runs: int = 300,
           excluded: Callable[[DiffProgram], str | None] | None = None) -> DiffProgram:
    """A smaller program for which ``still_fails`` holds: steps dropped (halves, then
    quarters, ... then single steps), ioeventfds dropped, initial registers zeroed, the data
    area zeroed, steps simplified. At most ``max_runs`` calls of ``still_fails``; candidates
    ``excluded`` names a reason for are not tried."""
    best = program
    runs = 0

    def attempt(cand: DiffProgram) -> bool:
        nonlocal best, runs
        if runs >= max_runs or cand == best:
            return False
        try:
            cand.validate()
        except UsageError:
            return False
        if excluded is not None and excluded(cand) is not None:
            return False
        runs += 1
        if still_fails(cand):
            best = cand
            return True
        return False

    progress = True
    while progress and runs < max_runs:
        progress = False
        chunk = max(1, len(best.ops) // 2)
        while chunk >= 1:
            i = 0
            while i < len(best.ops):
                if attempt(dataclasses.replace(best, ops=best.ops[:i] + best.ops[i + chunk:])):
                    progress = True
                else:
                    i += chunk
            chunk //= 2
        for z in list(best.coalesced):
            progress |= attempt(dataclasses.replace(
                best, coalesced=tuple(x for x in best.coalesced if x != z)))
        for ev in list(best.ioeventfds):
            progress |= attempt(dataclasses.replace(
                best, ioeventfds=tuple(e for e in best.ioeventfds if e != ev)))
        if best.gprs and not attempt(dataclasses.replace(best, gprs={})):
            for name in sorted(best.gprs):
                progress |= attempt(dataclasses.replace(
                    best, gprs={k: v for k, v in best.gprs.items() if k != name}))
        if best.data_seed:
            progress |= attempt(dataclasses.replace(best, data_seed=0))
        for i in range(len(best.ops)):
            for simpler in _simpler_ops(best.ops[i]):
                progress |= attempt(dataclasses.replace(
                    best, ops=best.ops[:i] + (simpler,) + best.ops[i + 1:]))
    return best


def save_regression(result: CaseResult, directory: Path, origin: str = "",
                    name: str | None = None) -> Path:
    """Write ``result``'s program (and, for the reader, its machine, listing and the
    differences found) as ``<directory>/<name>.json``; the replay test asserts the backends
    agree on it."""
    from fastmmio.outputs import write_text

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {directory}: {exc.strerror or exc}") from None
    p = result.program
    doc = {
        "program": p.to_json(),
        "origin": origin,
        "cause": "not yet explained",
        "found": [f"{d.where}: kvm {d.kvm} | sim {d.sim}" for d in result.differences],
        "machine": p.describe_machine(),
        "listing": p.listing(),
    }
    path = directory / f"{name or 'case-' + p.digest()}.json"
    write_text(path, json.dumps(doc, indent=1) + "\n")
    return path


def load_regression(path: Path) -> DiffProgram:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: not a readable regression file: {exc}") from None
    if not isinstance(doc, dict) or "program" not in doc:
        raise UsageError(f"{path}: no 'program' in the regression file")
    return DiffProgram.from_json(doc["program"])


# ------------------------------------------------------------------------------------------
# python -m fastmmio.fuzz diff
# ------------------------------------------------------------------------------------------


class _TimeUp(Exception):
    """Raised inside the hypothesis loop to end generation when the time bound passes."""


@dataclass
class Summary:
    cases: int = 0
    excluded: int = 0  # generated programs not comparable in this configuration (not run)
    disagreements: int = 0
    by_signature: Counter = field(default_factory=Counter)
    first: dict[tuple[str, ...], CaseResult] = field(default_factory=dict)
    seconds: float = 0.0


def fuzz(runner: DiffRunner, examples: int, seconds: float, seed: int, max_ops: int = 24,
         on_case: Callable[[CaseResult], None] | None = None) -> Summary:
    """Run up to ``examples`` generated programs, for at most ``seconds``, without stopping
    at a disagreement (each kind of disagreement keeps its first case, unshrunk)."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hseed

    summary = Summary()
    deadline = time.monotonic() + seconds
    t0 = time.perf_counter()

    @hseed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
    @given(programs(max_ops=max_ops, cpl=runner.cpl))
    def one(program: DiffProgram) -> None:
        if time.monotonic() > deadline:
            raise _TimeUp()
        if runner.excluded(program) is not None:
            summary.excluded += 1
            return
        result = runner.run(program)
        summary.cases += 1
        if not result.agree:
            summary.disagreements += 1
            summary.by_signature[result.signature] += 1
            summary.first.setdefault(result.signature, result)
        if on_case is not None:
            on_case(result)

    try:
        one()
    except _TimeUp:
        pass
    summary.seconds = time.perf_counter() - t0
    return summary


def _max_ops(text: str) -> int:
    value = positive_int(text)
    if value > 200:
        raise argparse.ArgumentTypeError(f"at most 200 steps: {text}")
    return value


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``diff`` subcommand of ``python -m fastmmio.fuzz`` (:mod:`fastmmio.fuzz.cli`)."""
    d = sub.add_parser(
        "diff", help="random programs on the simulator and on this host's KVM; disagreements "
        "are shrunk and saved as regression cases",
        description="Differential fuzzing: random programs on the simulator and on this "
                    "host's KVM; every kind of disagreement is shrunk and saved as a "
                    "regression case (tests/kvm/test_fuzz_differential.py replays them).")
    d.add_argument("--examples", type=positive_int, default=1000, metavar="N",
                   help="programs to generate (default 1000)")
    d.add_argument("--seconds", type=positive_seconds, default=600.0, metavar="S",
                   help="time bound (default 600 s)")
    d.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random, printed)")
    d.add_argument("--max-ops", type=_max_ops, default=24, metavar="K",
                   help="steps per program at most (default 24)")
    d.add_argument("--device", default="/dev/kvm", metavar="PATH")
    d.add_argument("--mmio-caching", choices=("host", "on", "off"), default="host",
                   help="the simulator's kvm.mmio_caching (default: this host's)")
    d.add_argument("--save-dir", type=Path, default=Path("tests/kvm/regressions"), metavar="DIR",
                   help="where shrunk disagreements are written (default tests/kvm/regressions)")
    d.add_argument("--no-shrink", action="store_true", help="report disagreements unshrunk")
    d.add_argument("--no-save", action="store_true", help="do not write regression files")
    d.add_argument("--verbose", "-v", action="store_true", help="print every disagreement")
    from fastmmio import fanout

    fanout.add_arguments(d, 0, "the programs (shares of their own seeds, each worker on its own "
                         "host's /dev/kvm and simulator)")
    d.set_defaults(func=run_diff)
    return d


def _hypothesis_home() -> None:
    """Keep hypothesis's storage (it caches data even with ``database=None``) out of the
    user's working directory: ``$HYPOTHESIS_STORAGE_DIRECTORY`` when set, else
    ``$XDG_CACHE_HOME/fastmmio/hypothesis`` (``~/.cache/...``), else a temporary folder."""
    if os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
        return
    import tempfile

    from hypothesis.configuration import set_hypothesis_home_dir

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    home = cache / "fastmmio" / "hypothesis"
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError:
        home = Path(tempfile.gettempdir()) / f"fastmmio-hypothesis-{os.getuid()}"
    set_hypothesis_home_dir(home)


def check_save_dir(directory: Path) -> None:
    """UsageError now, before any fuzzing, if regression files cannot be written into
    ``directory`` (it may not exist yet: then its nearest existing ancestor must be a writable
    folder, as ``save_regression`` creates it)."""
    from fastmmio.outputs import check_writable_file

    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise UsageError(f"--save-dir {d}: not a directory")
    probe = d
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--save-dir {d}: {probe} is not a directory")
    check_writable_file(probe / "case-probe.json")


def run_diff(args: argparse.Namespace) -> int:
    """Fuzz, then shrink and save the first case of each kind of disagreement. Exit status 1
    when the backends disagreed on any case."""
    from fastmmio.real.backend import RealBackend

    if not args.no_save:
        check_save_dir(args.save_dir)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    from fastmmio import fanout

    workers, scheduler = fanout.resolve(getattr(args, "workers", 0), getattr(args, "scheduler", None))
    if scheduler is not None or workers:
        return _run_diff_cluster(args, seed)
    RealBackend(device=args.device).check()  # a missing or unusable device: one line, status 2
    _hypothesis_home()
    runner = DiffRunner(args.device, mmio_caching=args.mmio_caching)
    info = runner.info
    print(f"fuzz diff: seed {seed}, up to {args.examples} programs / {args.seconds:g} s, "
          f"KVM {info.kvm_kind}{' nested' if info.nested else ''}, CPL{runner.cpl}, "
          f"simulator {runner.sim_options.describe()}", flush=True)

    def progress(result: CaseResult) -> None:
        if not result.agree and args.verbose:
            print(result.report(), flush=True)
        if runner.cases % 250 == 0:
            print(f"  {runner.cases} cases", flush=True)

    summary = fuzz(runner, args.examples, args.seconds, seed, args.max_ops, progress)
    rate = summary.cases / summary.seconds if summary.seconds else 0.0
    for sig, n in summary.by_signature.most_common():
        first = summary.first[sig]
        print(f"\n== {n} case(s) differing in {', '.join(sig)}")
        if not args.no_shrink:
            small = shrink(first.program, lambda p: runner.run(p).signature == sig,
                           excluded=runner.excluded)
            first = runner.run(small)
        print(first.report())
        if not first.agree and not args.no_save:
            path = save_regression(first, args.save_dir, origin=f"fuzz diff --seed {seed}")
            print(f"saved: {path}")
    print(f"cases: {summary.cases} (+{summary.excluded} not comparable here, not run), "
          f"disagreements: {summary.disagreements} "
          f"({len(summary.by_signature)} kinds), time: {summary.seconds:.1f} s "
          f"({rate:.1f} cases/s), seed {seed}")
    return 1 if summary.disagreements else 0


def _run_diff_cluster(args: argparse.Namespace, seed: int) -> int:
    """:func:`run_diff` on a Dask cluster (:mod:`fastmmio.fuzz.cluster`): shares of the
    examples on every worker, each against its own host; disagreements shrunk on the worker
    that found them and saved here."""
    from fastmmio import fanout
    from fastmmio.fuzz.cluster import diff_campaign, host_label, shrink_where_found

    print(f"fuzz diff: seed {seed}, up to {args.examples} programs / {args.seconds:g} s on a Dask "
          f"cluster, shares of their own seeds", flush=True)
    progress, task = fanout.progress_bar("diff", args.examples)
    with fanout.open_client(args.workers, args.scheduler) as client:
        with progress:
            def on_share(done, result):
                progress.update(task, completed=done,
                                detail=result.host.get("hostname", "") if result else "lost")

            camp = diff_campaign(client, seed, args.examples, args.seconds, args.device,
                                 args.mmio_caching, args.max_ops, on_share=on_share)
        summary = camp.summary
        for host in camp.hosts:
            print(f"worker {host.get('worker') or '(local)'}: {host_label(host)}, kernel {host.get('kernel')}")
        for sig, n in summary.by_signature.most_common():
            first = summary.first[sig]
            found = camp.found_on.get(sig, {})
            print(f"\n== {n} case(s) differing in {', '.join(sig)} (first found on {host_label(found)})")
            if not args.no_shrink:
                first = shrink_where_found(client, camp, sig, args.device, args.mmio_caching)
            print(first.report())
            if not first.agree and not args.no_save:
                path = save_regression(first, args.save_dir,
                                       origin=f"fuzz diff --seed {seed} on {found.get('hostname', '?')} "
                                       f"({found.get('kvm_kind', '?')}, {found.get('kernel', '?')})")
                print(f"saved: {path}")
    rate = summary.cases / summary.seconds if summary.seconds else 0.0
    for share in camp.lost:
        print(f"lost: share {share.k} ({share.examples} programs; reproduce with --seed {share.seed} "
              f"--examples {share.examples} --workers 0): its workers died")
    print(f"cases: {summary.cases} (+{summary.excluded} not comparable here, not run), "
          f"disagreements: {summary.disagreements} "
          f"({len(summary.by_signature)} kinds), lost shares: {len(camp.lost)}, time: "
          f"{summary.seconds:.1f} s ({rate:.1f} cases/s), seed {seed}")
    return 1 if summary.disagreements or camp.lost else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fastmmio.fuzz.differential``: the same as ``fastmmio fuzz diff``."""
    from fastmmio.cli import main as fastmmio_main

    return fastmmio_main(["fuzz", "diff", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
