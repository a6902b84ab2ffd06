"""Run programs on the real backend and hold the host side to account.

Every run must end in a defined outcome (:data:`fastmmio.fuzz.program.DEFINED_OUTCOMES`):
the guest reached the done port, KVM shut it down, the run loop's watchdog stopped it, KVM
reported an error (a :class:`~fastmmio.errors.GuestError` with its ``kind``), or KVM refused
the machine before it ran. Anything else is a *finding*:

* ``crash``: an exception that is not a :class:`~fastmmio.errors.FastmmioError` escaped the
  backend (a bug of the host side, with its traceback);
* ``unexpected``: a defined outcome the program does not allow (``Program.allowed``);
* ``leak``: file descriptors, KVM objects, memory mappings, threads or address space left
  behind, measured from ``/proc/self`` between runs (:class:`ResourceSnapshot`);
* ``hang``: a run that outlives its watchdog by a wide margin. The process cannot recover
  from that by itself, so :class:`HangGuard` prints the program and every thread's stack and
  exits with status 3 instead of hanging forever.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fastmmio.deadline import DeadlineTimer
from fastmmio.errors import FastmmioError, GuestError
from fastmmio.fuzz.program import DONE, KVM_ERROR, REFUSED, SHUTDOWN, WATCHDOG, Program
from fastmmio.real.backend import RealBackend

DEFAULT_WATCHDOG_S = 0.25  # a hostile run either ends within milliseconds or loops forever
HANG_MARGIN_S = 20.0  # the hang guard fires this long after a run's watchdog bound
HANG_EXIT_STATUS = 3
FAULTHANDLER_MAX_S = 365 * 86400.0  # far below what faulthandler.dump_traceback_later can hold (time_t)


@dataclass(frozen=True)
class Outcome:
    """How one run ended."""

    outcome: str  # a defined outcome, or "crash"
    detail: str  # GuestError.kind, the exception type, or "" for done
    message: str
    seconds: float
    user_exits: int = 0  # of the batch, when it completed

    @property
    def label(self) -> str:
        return f"{self.outcome}:{self.detail}" if self.detail and self.detail != self.outcome else self.outcome


def run_program(program: Program, device: str = "/dev/kvm", watchdog_s: float = DEFAULT_WATCHDOG_S) -> Outcome:
    """Build ``program``'s machine, run one batch on :class:`RealBackend`, close it, and say
    how it ended. Never raises for anything the guest does; a host-side bug comes back as
    outcome ``crash`` with the traceback as message."""
    t0 = time.perf_counter()
    try:
        machine = program.machine()
        with RealBackend(device, watchdog_s=watchdog_s).open(machine) as session:
            batch = session.run_batch(1)
        return Outcome(DONE, "", "", time.perf_counter() - t0, batch.user_exits)
    except GuestError as exc:
        kind = getattr(exc, "kind", "guest-error")
        outcome = {"shutdown": SHUTDOWN, "watchdog": WATCHDOG}.get(kind, KVM_ERROR)
        return Outcome(outcome, kind, str(exc), time.perf_counter() - t0)
    except FastmmioError as exc:
        return Outcome(REFUSED, type(exc).__name__, str(exc), time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - a host-side bug is exactly what we look for
        return Outcome("crash", type(exc).__name__, traceback.format_exc(), time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------
# leaks
# ------------------------------------------------------------------------------------------


def _fd_kind(target: str) -> str:
    """What an fd is, by its /proc/self/fd link: KVM objects by their anon inode name
    (kvm-vm, kvm-vcpu:N, kvm-vm-stats, ...), eventfds, /dev/kvm, or 'other'."""
    if target.startswith("anon_inode:"):
        name = target[len("anon_inode:") :]
        if name.startswith("kvm-vcpu:"):
            return "kvm-vcpu"
        if name.startswith("kvm") or name == "[eventfd]":
            return name.strip("[]")
    if target == "/dev/kvm":
        return "/dev/kvm"
    return "other"


@dataclass(frozen=True)
class ResourceSnapshot:
    """What this process holds, from /proc/self: open fds (total and by KVM kind), memory
    mappings (lines of /proc/self/maps, and those of KVM objects), threads, VmSize, VmRSS."""

    fds: int
    fd_kinds: dict[str, int]
    maps: int
    kvm_maps: int
    threads: int
    vm_size_kb: int
    rss_kb: int

    @classmethod
    def take(cls) -> "ResourceSnapshot":
        kinds: Counter = Counter()
        fds = 0
        for name in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{name}")
            except OSError:  # the fd of the listdir itself, already closed
                continue
            fds += 1
            kinds[_fd_kind(target)] += 1
        with open("/proc/self/maps") as f:
            lines = f.readlines()
        kvm_maps = sum(1 for line in lines if "kvm" in line)
        status: dict[str, int] = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmSize", "VmRSS"):
                    status[key] = int(value.split()[0])
        return cls(
            fds=fds,
            fd_kinds={k: v for k, v in kinds.items() if k != "other"},
            maps=len(lines),
            kvm_maps=kvm_maps,
            threads=len(os.listdir("/proc/self/task")),
            vm_size_kb=status.get("VmSize", 0),
            rss_kb=status.get("VmRSS", 0),
        )

    def vms(self) -> int:
        return self.fd_kinds.get("kvm-vm", 0)


# A run maps 2 MiB + 64 KiB of guest memory (two mappings) and the vCPU's kvm_run pages.
# Python's allocator and glibc's per-thread malloc arenas (64 MiB of address space each, a
# new one now and then as the watchdog threads come and go; at most 8 per core) grow the
# address space in steps that stop; a leak grows it with every run. So the bounds are a
# fixed slack or a per-run rate, whichever is larger: leaking a run's memslots (2 lines and
# 2 MiB per run) crosses them within a few hundred runs, arena steps never do (measured:
# +8 lines and +83 MiB over 31,000 runs).
MAPS_SLACK = 64
MAPS_PER_RUN = 0.01
VM_SIZE_SLACK_KB = 256 * 1024
VM_SIZE_PER_RUN_KB = 1024


def compare(base: ResourceSnapshot, now: ResourceSnapshot, runs: int = 0) -> list[str]:
    """Leaks between two snapshots taken between runs (so no VM should be open in either),
    ``runs`` runs apart."""
    leaks = []
    if now.fds != base.fds:
        leaks.append(f"open fds {base.fds} -> {now.fds}")
    for kind in sorted(set(base.fd_kinds) | set(now.fd_kinds)):
        a, b = base.fd_kinds.get(kind, 0), now.fd_kinds.get(kind, 0)
        if b > a:
            leaks.append(f"{kind} fds {a} -> {b}")
    if now.kvm_maps > base.kvm_maps:
        leaks.append(f"KVM mappings {base.kvm_maps} -> {now.kvm_maps}")
    maps_bound = max(MAPS_SLACK, int(MAPS_PER_RUN * runs))
    if now.maps > base.maps + maps_bound:
        leaks.append(f"memory mappings {base.maps} -> {now.maps} (more than {maps_bound} new in {runs} runs)")
    if now.threads > base.threads:
        leaks.append(f"threads {base.threads} -> {now.threads}")
    vm_bound = max(VM_SIZE_SLACK_KB, VM_SIZE_PER_RUN_KB * runs)
    if now.vm_size_kb > base.vm_size_kb + vm_bound:
        leaks.append(f"address space {base.vm_size_kb} KiB -> {now.vm_size_kb} KiB "
                     f"(more than {vm_bound} KiB new in {runs} runs)")
    return leaks


# ------------------------------------------------------------------------------------------
# hangs
# ------------------------------------------------------------------------------------------


class HangGuard:
    """Ends the process if one run outlives its bound: the run loop's watchdog should have
    stopped any guest long before. A :class:`~fastmmio.deadline.DeadlineTimer` (the run loop's
    watchdog thread too) prints which program was running and every thread's stack, then
    ``os._exit(3)``; ``faulthandler.dump_traceback_later`` backs it up should the stuck thread
    hold the GIL (not for a bound past :data:`FAULTHANDLER_MAX_S`, which faulthandler cannot
    hold: such a bound means "no bound" in practice, and the timer thread alone watches it)."""

    def __init__(self, out=None) -> None:
        self.out = out if out is not None else sys.stderr
        self._timer = DeadlineTimer("fastmmio-hang-guard")
        self._what = ""

    def arm(self, seconds: float, what: str) -> None:
        self._what = what
        self._timer.arm(seconds, self._hang)
        faulthandler.cancel_dump_traceback_later()
        if seconds + 10 <= FAULTHANDLER_MAX_S:
            faulthandler.dump_traceback_later(seconds + 10, exit=True, file=self._fd_file())

    def _fd_file(self):
        """faulthandler writes to a file descriptor: ``out`` if it has one, else stderr."""
        try:
            self.out.fileno()
            return self.out
        except (AttributeError, OSError, ValueError):
            return sys.__stderr__

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        self._timer.disarm()

    def _hang(self) -> None:
        print(f"fastmmio fuzz: HANG: {self._what} did not end; the host process is stuck",
              file=self.out, flush=True)
        faulthandler.dump_traceback(file=self._fd_file(), all_threads=True)
        os._exit(HANG_EXIT_STATUS)

    def close(self) -> None:
        self.disarm()
        self._timer.close()


# ------------------------------------------------------------------------------------------
# a campaign
# ------------------------------------------------------------------------------------------


@dataclass
class Finding:
    what: str  # "crash" | "unexpected" | "leak" | "lost" (its worker died, on a cluster)
    program: str  # Program.describe()
    detail: str
    host: str = ""  # the worker's host on a cluster (fastmmio.fuzz.cluster); "" in-process

    def line(self) -> str:
        first = self.detail.strip().splitlines()[-1] if self.detail.strip() else ""
        return f"{self.what}: {self.program}: {first}" + (f" [on {self.host}]" if self.host else "")


@dataclass
class Summary:
    runs: int = 0
    seconds: float = 0.0
    outcomes: Counter = field(default_factory=Counter)  # Outcome.label -> runs
    by_kind: dict[str, Counter] = field(default_factory=dict)  # program kind -> outcome -> runs
    by_cpl: Counter = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    leak_checks: int = 0
    first: ResourceSnapshot | None = None  # after the warm-up runs
    last: ResourceSnapshot | None = None
    slowest: tuple[float, str] = (0.0, "")
    history: list[tuple[int, ResourceSnapshot]] = field(default_factory=list)  # (runs, snapshot) per check

    @property
    def crashes(self) -> int:
        return sum(1 for f in self.findings if f.what == "crash")

    @property
    def unexpected(self) -> int:
        return sum(1 for f in self.findings if f.what == "unexpected")

    @property
    def leaks(self) -> int:
        return sum(1 for f in self.findings if f.what == "leak")

    @property
    def lost(self) -> int:
        return sum(1 for f in self.findings if f.what == "lost")

    @property
    def ok(self) -> bool:
        return not self.findings

    def add(self, other: "Summary", host: str = "") -> None:
        """Add another campaign's counts and findings (a share run on a cluster's worker,
        ``host`` naming it); the resource snapshots stay this summary's own."""
        self.runs += other.runs
        self.outcomes.update(other.outcomes)
        for kind, counts in other.by_kind.items():
            self.by_kind.setdefault(kind, Counter()).update(counts)
        self.by_cpl.update(other.by_cpl)
        self.leak_checks += other.leak_checks
        for f in other.findings:
            self.findings.append(dataclasses.replace(f, host=f.host or host))
        if other.slowest[0] > self.slowest[0]:
            self.slowest = (other.slowest[0], other.slowest[1] + (f" on {host}" if host else ""))

    def lines(self) -> list[str]:
        out = [
            f"hostile runs: {self.runs} in {self.seconds:.1f} s "
            f"({self.runs / self.seconds if self.seconds else 0:.1f} runs/s); "
            f"CPL: {', '.join(f'{c}: {n}' for c, n in sorted(self.by_cpl.items()))}",
            "outcomes: " + ", ".join(f"{k} {v}" for k, v in self.outcomes.most_common()),
        ]
        for kind in sorted(self.by_kind):
            c = self.by_kind[kind]
            out.append(f"  {kind:15} {sum(c.values()):6}  " + ", ".join(f"{k} {v}" for k, v in c.most_common()))
        out.append(
            f"findings: {self.crashes} crashes, {self.unexpected} unexpected outcomes, {self.leaks} leaks "
            f"({self.leak_checks} leak checks)" + (f", {self.lost} lost (worker died)" if self.lost else "")
        )
        if self.first and self.last:
            f, l = self.first, self.last
            out.append(
                f"resources after warm-up -> end: fds {f.fds} -> {l.fds}, maps {f.maps} -> {l.maps}, "
                f"KVM fds {sum(f.fd_kinds.values())} -> {sum(l.fd_kinds.values())}, "
                f"threads {f.threads} -> {l.threads}, VmSize {f.vm_size_kb // 1024} -> "
                f"{l.vm_size_kb // 1024} MiB, RSS {f.rss_kb // 1024} -> {l.rss_kb // 1024} MiB"
            )
        if len(self.history) > 2:
            step = max(1, len(self.history) // 6)
            points = self.history[::step] + ([self.history[-1]] if (len(self.history) - 1) % step else [])
            out.append("VmSize/RSS/maps by runs: " + ", ".join(
                f"{n}: {r.vm_size_kb // 1024}/{r.rss_kb // 1024} MiB/{r.maps}" for n, r in points))
        if self.slowest[1]:
            out.append(f"slowest run: {self.slowest[0]:.2f} s ({self.slowest[1]})")
        for finding in self.findings[:20]:
            out.append("  " + finding.line())
        if len(self.findings) > 20:
            out.append(f"  ... {len(self.findings) - 20} more")
        return out


WARMUP_RUNS = 8  # first runs allocate what stays (imports, caches, the watchdog's first use)


def campaign(
    programs: Iterator[Program],
    runs: int | None = None,
    seconds: float | None = None,
    device: str = "/dev/kvm",
    watchdog_s: float = DEFAULT_WATCHDOG_S,
    leak_every: int = 50,
    hang_guard: bool = True,
    on_run: Callable[[int, Program, Outcome], None] | None = None,
    leak_checks: bool = True,
) -> Summary:
    """Run programs until ``runs`` are done or ``seconds`` have passed (whichever first; at
    least one of them must be given), checking outcomes and, every ``leak_every`` runs and at
    the end, resources against a snapshot taken after the warm-up runs (not with
    ``leak_checks`` False: in a Dask worker, whose own connections and threads come and go,
    /proc/self does not measure the runs alone)."""
    if runs is None and seconds is None:
        raise ValueError("give runs or seconds")
    summary = Summary()
    guard = HangGuard() if hang_guard else None
    t_start = time.perf_counter()
    deadline = t_start + seconds if seconds is not None else None
    base: ResourceSnapshot | None = None
    reported: set[str] = set()

    def check_leaks() -> None:
        now = ResourceSnapshot.take()
        # A joined thread's kernel task can outlive join() by a moment: look again shortly
        # before calling anything a leak.
        since = max(0, summary.runs - WARMUP_RUNS)
        for _ in range(20):
            if not compare(base, now, since):
                break
            time.sleep(0.05)
            now = ResourceSnapshot.take()
        summary.last = now
        summary.leak_checks += 1
        summary.history.append((summary.runs, now))
        for leak in compare(base, now, since):
            key = leak.split(" ")[0]
            if key not in reported:  # one finding per resource, with its numbers
                reported.add(key)
                summary.findings.append(Finding("leak", f"after {summary.runs} runs", leak))

    try:
        for program in programs:
            if runs is not None and summary.runs >= runs:
                break
            if deadline is not None and time.perf_counter() >= deadline:
                break
            if guard is not None:
                guard.arm(watchdog_s + HANG_MARGIN_S, program.describe())
            outcome = run_program(program, device, watchdog_s)
            if guard is not None:
                guard.disarm()
            summary.runs += 1
            summary.outcomes[outcome.label] += 1
            summary.by_kind.setdefault(program.kind, Counter())[outcome.label] += 1
            summary.by_cpl[program.cpl] += 1
            if outcome.seconds > summary.slowest[0]:
                summary.slowest = (outcome.seconds, f"{program.describe()} -> {outcome.label}")
            if outcome.outcome == "crash":
                summary.findings.append(Finding("crash", program.describe(), outcome.message))
            elif outcome.outcome not in program.allowed:
                summary.findings.append(Finding(
                    "unexpected", program.describe(),
                    f"{outcome.label} (allowed: {', '.join(sorted(program.allowed))}): {outcome.message[:300]}"))
            if on_run is not None:
                on_run(summary.runs, program, outcome)
            if summary.runs == WARMUP_RUNS:
                base = summary.first = ResourceSnapshot.take()
            elif base is not None and leak_checks and summary.runs % leak_every == 0:
                check_leaks()
        if leak_checks:
            if base is None:  # fewer runs than the warm-up: compare with the first snapshot possible
                base = summary.first = ResourceSnapshot.take()
            check_leaks()
    finally:
        if guard is not None:
            guard.close()
        summary.seconds = time.perf_counter() - t_start
    return summary
