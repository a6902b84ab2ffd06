"""Measure routes the way kvm-unit-tests' ``x86/vmexit.c`` does, on any backend.

For each route: open a session on its machine, pick N (calibrate by doubling from 64 until one
batch takes at least ``target_ticks`` TSC ticks, as vmexit.c does with a goal of 2^30; or a
fixed N), run R batches of N, and report the median ticks per notification with the (min, max)
spread over the runs, loop overhead included as in vmexit.c. Every batch, the calibration ones
included, is checked against the route's :class:`~fastmmio.routes.Expectation`: the eventfd
count is exactly N x expected, user exits exactly N x expected (coalesced routes: ring entries
plus exits equal N), every exit record has the expected kind, address, size, direction and
data, the read-only memslot still holds its pattern, the last read returned the expected value,
and the guest's batch counter matches.

Nothing here knows which backend runs: a backend whose batches carry no TSC ticks (a
simulator) passes ``price`` to turn a :class:`~fastmmio.result.BatchResult` into cycles.
"""

from __future__ import annotations

import math
import statistics
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fastmmio import layout
from fastmmio.backend import Backend, Session
from fastmmio.errors import FastmmioError, GuestError, HostError, UsageError
from fastmmio.result import BatchResult, ExitRecord, RunResult
from fastmmio.routes import EVENTFD_NAME, Route, build_machine

KUT_TARGET_TICKS = 1 << 30  # kvm-unit-tests x86/vmexit.c GOAL
# Default goal per batch: 2^28 ticks is ~0.12 s at 2.3 GHz. Calibration costs about twice the
# goal and each run one goal, so 23 routes x (2 + 3 runs) x 0.12 s stays well under 2 minutes
# even where exits cost 55k-200k ticks (PVM, nested).
DEFAULT_TARGET_TICKS = 1 << 28
DEFAULT_RUNS = 3
START_ITERATIONS = 64  # vmexit.c starts at 32 and doubles before the first batch
MAX_ITERATIONS = 1 << 28  # calibration stops here even if the goal is not reached
WARMUP_ITERATIONS = 64  # with a fixed N: one short batch first (first-touch faults, SPTEs)

Price = Callable[[BatchResult], float]
OnBatch = Callable[[Route, str, BatchResult], None]


@dataclass(frozen=True)
class BenchOptions:
    """How to measure. ``iterations`` fixes N (no calibration); otherwise N doubles from
    :data:`START_ITERATIONS` until a batch takes ``target_ticks``."""

    iterations: int | None = None
    target_ticks: int = DEFAULT_TARGET_TICKS
    runs: int = DEFAULT_RUNS
    max_iterations: int = MAX_ITERATIONS

    def __post_init__(self) -> None:
        if self.iterations is not None and not 1 <= self.iterations <= self.max_iterations:
            raise UsageError(f"iterations must be between 1 and {self.max_iterations}")
        if self.target_ticks < 1:
            raise UsageError("target ticks must be positive")
        if self.runs < 1:
            raise UsageError("runs must be at least 1")


@dataclass
class Checker:
    """Collects check outcomes over all batches of one route: one line per check."""

    passed: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    batches: int = 0

    def check(self, name: str, ok: bool, failure: str) -> None:
        if ok:
            self.passed[name] = self.passed.get(name, 0) + 1
        elif len(self.failures) < 20:
            self.failures.append(f"FAIL: {name}: {failure}")

    def lines(self) -> list[str]:
        out = [f"{name} ({n}/{self.batches} batches)" for name, n in self.passed.items()]
        return out + self.failures

    @property
    def ok(self) -> bool:
        return not self.failures and self.batches > 0


def _u64(session: Session, gpa: int) -> int:
    return struct.unpack("<Q", session.read_guest(gpa, 8))[0]


def _exit_matches(route: Route, rec: ExitRecord) -> str | None:
    """None if ``rec`` is what the route's expectation says every user exit looks like."""
    exp = route.expect.exit
    if exp is None:
        return f"unexpected {rec.kind} exit at {rec.addr:#x}"
    kind = rec.kind.removeprefix("coalesced-")
    want = (exp.kind, exp.addr, exp.size, exp.is_write, exp.data)
    got = (kind, rec.addr, rec.size, rec.is_write, rec.data)
    if got != want:
        return (f"exit {kind} addr={rec.addr:#x} size={rec.size} "
                f"{'write' if rec.is_write else 'read'} data={rec.data:#x}, expected "
                f"{exp.kind} addr={exp.addr:#x} size={exp.size} "
                f"{'write' if exp.is_write else 'read'} data={exp.data:#x}")
    return None


def check_batch(route: Route, batch: BatchResult, session: Session, batches_run: int,
                checker: Checker) -> None:
    """Check one batch against the route's expectations (see the module docstring)."""
    n = batch.iterations
    e = route.expect
    checker.batches += 1
    if batch.ticks is not None:
        checker.check("TSC advanced over the batch", batch.ticks > 0, f"T1-T0 = {batch.ticks}")
    count = _u64(session, layout.MAILBOX_GPA + layout.MAILBOX_BATCHES)
    checker.check("guest batch counter", count == batches_run,
                  f"guest counted {count} batches, host ran {batches_run}")

    signals = batch.eventfd_signals
    if route.ioeventfd is not None:
        got = signals.get(EVENTFD_NAME, 0)
        checker.check(f"eventfd signals == {e.eventfd} x N", got == e.eventfd * n,
                      f"{got} signals for N={n}")
    else:
        checker.check("no eventfd signals", not any(signals.values()), f"signals {signals}")

    if e.coalesced:
        total = batch.user_exits + batch.coalesced_entries
        checker.check("coalesced entries + user exits == N", total == n,
                      f"{batch.coalesced_entries} entries + {batch.user_exits} exits, N={n}")
        checker.check("coalesced ring used", n == 0 or batch.coalesced_entries > 0,
                      "no entry went through the ring")
    else:
        checker.check(f"user exits == {e.user_exits} x N", batch.user_exits == e.user_exits * n,
                      f"{batch.user_exits} exits for N={n}")

    bad = [m for m in (_exit_matches(route, r) for r in batch.exits) if m]
    checker.check("exit records match (kind, address, size, direction, data)", not bad,
                  bad[0] if bad else "")

    if e.read_value is not None and n > 0:
        last = _u64(session, layout.MAILBOX_GPA + layout.MAILBOX_LAST_READ)
        checker.check(f"read value == {e.read_value:#x}", last == e.read_value,
                      f"guest read {last:#x}")
    if e.ro_unchanged:
        mem = session.read_guest(layout.RO_BASE, layout.RO_SIZE)
        changed = [i for i, b in enumerate(mem) if b != layout.RO_PATTERN]
        checker.check("read-only memslot unchanged", not changed,
                      f"{len(changed)} bytes changed, first at {layout.RO_BASE + changed[0]:#x}"
                      if changed else "")


def _cycles(batch: BatchResult, price: Price | None) -> float:
    if batch.ticks is not None:
        return batch.ticks / batch.iterations
    if price is None:
        raise UsageError("this backend reports no TSC ticks and no price function was given")
    return price(batch) / batch.iterations


def _batch_ticks(batch: BatchResult, price: Price | None) -> float:
    return batch.ticks if batch.ticks is not None else (price(batch) if price else 0.0)


def measure_route(
    backend: Backend,
    route: Route,
    cpl: int,
    options: BenchOptions = BenchOptions(),
    price: Price | None = None,
    on_batch: OnBatch | None = None,
) -> RunResult:
    """Calibrate (or take the fixed N), run ``options.runs`` batches, check every batch.

    Raises what the backend raises (HostError, GuestError, IoEventFdError); see
    :func:`bench_routes` for a runner that records those as failed results instead."""
    machine = build_machine(route, cpl)
    checker = Checker()
    calibration: list[tuple[int, float]] = []
    batches_run = 0

    def run(session: Session, n: int, phase: str) -> BatchResult:
        nonlocal batches_run
        batch = session.run_batch(n)
        batches_run += 1
        check_batch(route, batch, session, batches_run, checker)
        if on_batch is not None:
            on_batch(route, phase, batch)
        return batch

    with backend.open(machine) as session:
        if options.iterations is not None:
            n = options.iterations
            run(session, min(WARMUP_ITERATIONS, n), "warm-up")
        else:
            n = START_ITERATIONS
            while True:
                batch = run(session, n, "calibrate")
                ticks = _batch_ticks(batch, price)
                calibration.append((n, ticks))
                if ticks >= options.target_ticks or n >= options.max_iterations:
                    break
                # Jump closer when far below the goal (same end point as doubling, fewer batches).
                factor = 2
                while ticks * factor * 2 < options.target_ticks and n * factor * 2 <= options.max_iterations:
                    factor *= 2
                n = min(n * factor, options.max_iterations)
        per_run: list[float] = []
        last: BatchResult | None = None
        for _ in range(options.runs):
            last = run(session, n, "run")
            per_run.append(_cycles(last, price))
    assert last is not None
    return RunResult(
        route=route.name,
        backend=backend.name,
        cycles=statistics.median(per_run),
        cycles_spread=(min(per_run), max(per_run)),
        iterations=n,
        eventfd_signals=sum(last.eventfd_signals.values()),
        user_exits=last.user_exits,
        correct=checker.ok,
        checks=checker.lines(),
        kvm_stats=dict(last.kvm_stats),
        events=dict(last.events),
        extra={
            "cpl": cpl,
            "kut": route.kut,
            "description": route.description,
            "runs_cycles": per_run,
            "calibration": [list(c) for c in calibration],
            "target_ticks": None if options.iterations is not None else options.target_ticks,
            "coalesced_entries": last.coalesced_entries,
            "user_exits_per_notification": last.user_exits / n,
            "host_ns_per_notification": last.host_ns / n,
            "host_ns_outside_run_per_notification": last.host_ns_outside_run / n,
        },
    )


def failed_result(backend: Backend, route: Route, cpl: int, error: FastmmioError) -> RunResult:
    """A RunResult for a route that could not be measured (cycles NaN, correct False)."""
    return RunResult(
        route=route.name,
        backend=backend.name,
        cycles=math.nan,
        cycles_spread=(math.nan, math.nan),
        iterations=0,
        eventfd_signals=0,
        user_exits=0,
        correct=False,
        checks=[f"FAIL: {type(error).__name__}: {error}"],
        extra={"cpl": cpl, "kut": route.kut, "description": route.description,
               "error": str(error)},
    )


def bench_routes(
    backend: Backend,
    routes: Iterable[Route],
    cpl: int,
    options: BenchOptions = BenchOptions(),
    price: Price | None = None,
    on_batch: OnBatch | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """:func:`measure_route` for each route; a route the guest or KVM fails on (GuestError,
    an ioeventfd refusal, a missing capability) becomes a failed result and the rest still
    run. A HostError about the device itself (missing /dev/kvm) stops everything."""
    results = []
    for route in routes:
        try:
            result = measure_route(backend, route, cpl, options, price, on_batch)
        except HostError as exc:
            if "KVM_CAP" not in str(exc):
                raise
            result = failed_result(backend, route, cpl, exc)
        except (GuestError, FastmmioError) as exc:
            if isinstance(exc, UsageError):
                raise
            result = failed_result(backend, route, cpl, exc)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
