"""Measure routes the way kvm-unit-tests' ``x86/vmexit.c`` does, on any backend.

For each route: open a session on its machine, pick N (calibrate by doubling from 64 until one
batch takes at least ``target_ticks`` TSC ticks, as vmexit.c does with a goal of 2^30; or a
fixed N), then run batches of N until the :class:`StopRule` says the median is stable, and
report the median ticks per notification with its spread, loop overhead included as in
vmexit.c. Every batch, the calibration ones included, is checked against the route's
:class:`~fastmmio.routes.Expectation`: the eventfd count is exactly N x expected, user exits
exactly N x expected (coalesced routes: ring entries plus exits equal N), every exit record has
the expected kind, address, size, direction and data, the read-only memslot still holds its
pattern, the last read returned the expected value, and the guest's batch counter matches.

The measuring rule (:class:`StopRule`), for a host whose exits cost what its neighbours leave
(PVM, nested, shared cores): a route's figure is the median of its runs (one batch each).
After each run the rule looks at all runs so far and calls the route *stable* when there are
at least ``min_runs`` of them, the 95% confidence interval of their median (distribution-free,
from order statistics: :func:`median_interval`) lies within +-``tolerance`` of the median, and
the running median moved by at most half the tolerance over the last ``window`` runs (it has
stopped drifting). A few preempted batches widen the interval only until enough runs outvote
them (contention that slows every batch is not noise: the figure is then this host's, loaded
as it was); runs that split into two modes, or drift, never settle. A stable route stops; an unstable one runs on until ``max_runs`` runs or
until ``max_seconds`` have passed since the measurement began (calibration included; every
route gets at least one run), and is then recorded as *noisy*
(:attr:`~fastmmio.result.RunResult.noisy`) with its spread (min-max, interquartile range, the
median's interval) and the reason, so that no ratio is taken from its median.

:func:`bench_routes` interleaves the routes: the first run of every route, then the second run
of every route still measuring, and so on, so that a drift of the host (a neighbour starting,
a frequency change) hits all routes alike instead of the last ones. ``cpu`` pins the thread
that issues KVM_RUN (the vCPU thread: the calling one) to one CPU for the whole measurement
(``sched_setaffinity(2)`` with pid 0 acts on the calling thread), restoring its mask after.

Nothing here knows which backend runs: a backend whose batches carry no TSC ticks (a
simulator) passes ``price`` to turn a :class:`~fastmmio.result.BatchResult` into cycles; such
priced runs are deterministic and get no :class:`~fastmmio.result.Spread`.
"""

from __future__ import annotations

import math
import os
import statistics
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from fastmmio import layout
from fastmmio.backend import Backend, Session
from fastmmio.errors import FastmmioError, GuestError, HostError, UsageError
from fastmmio.result import BatchResult, ExitRecord, RunResult, Spread
from fastmmio.routes import EVENTFD_NAME, Route, build_machine

KUT_TARGET_TICKS = 1 << 30  # kvm-unit-tests x86/vmexit.c GOAL
# Default goal per batch: 2^28 ticks is ~0.12 s at 2.3 GHz. Calibration costs about twice the
# goal and each run one goal: 25 stable routes x (2 + 5 runs) x 0.12 s is ~20 s; routes that do
# not settle run on to DEFAULT_RUNS, all within DEFAULT_SECONDS.
DEFAULT_TARGET_TICKS = 1 << 28
DEFAULT_RUNS = 30  # at most; a stable route stops after DEFAULT_MIN_RUNS
DEFAULT_MIN_RUNS = 5
DEFAULT_WINDOW = 3
DEFAULT_TOLERANCE = 0.05  # the median known to +-5%
CONFIDENCE = 0.95  # of the median's confidence interval
DEFAULT_SECONDS = 60.0  # time bound of one bench_routes call
START_ITERATIONS = 64  # vmexit.c starts at 32 and doubles before the first batch
MAX_ITERATIONS = 1 << 28  # calibration stops here even if the goal is not reached
WARMUP_ITERATIONS = 64  # with a fixed N: one short batch first (first-touch faults, SPTEs)

Price = Callable[[BatchResult], float]
OnBatch = Callable[[Route, str, BatchResult], None]


def _cpu_list(cpus: Iterable[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``0-2,5``."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def check_cpu(cpu: int) -> None:
    """UsageError unless this process may run on ``cpu`` (its ``sched_getaffinity`` mask)."""
    allowed = os.sched_getaffinity(0)
    if cpu not in allowed:
        raise UsageError(f"--cpu {cpu}: not a CPU this process may run on "
                         f"(allowed: {_cpu_list(allowed)})")


@contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Pin the calling thread to ``cpu`` (``sched_setaffinity(0, ...)`` acts on the calling
    thread on Linux) and restore its mask on the way out; ``None`` does nothing."""
    if cpu is None:
        yield
        return
    check_cpu(cpu)
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@dataclass(frozen=True)
class StopRule:
    """When a route's runs are enough (see the module docstring for the rule in words)."""

    tolerance: float = DEFAULT_TOLERANCE
    min_runs: int = DEFAULT_MIN_RUNS
    max_runs: int = DEFAULT_RUNS
    window: int = DEFAULT_WINDOW
    max_seconds: float | None = DEFAULT_SECONDS

    def __post_init__(self) -> None:
        if not 0 < self.tolerance < 1:
            raise UsageError(f"the stability tolerance must be a fraction between 0 and 1, "
                             f"got {self.tolerance}")
        if self.max_runs < 1 or self.min_runs < 1 or self.window < 1:
            raise UsageError("runs must be at least 1")
        if self.max_seconds is not None and not 0 < self.max_seconds < math.inf:
            raise UsageError("the time bound must be a positive number of seconds")

    @property
    def needed(self) -> int:
        """Runs before a verdict of stable is possible: ``min_runs`` (at most ``max_runs``),
        and never fewer than 2 (one run shows no spread)."""
        return max(2, min(self.min_runs, self.max_runs))

    def text(self) -> str:
        bound = f", or after {self.max_seconds:g} s" if self.max_seconds is not None else ""
        return (f"median of {self.needed}-{max(self.max_runs, self.needed)} interleaved runs, "
                f"stable once its {CONFIDENCE:.0%} confidence interval is within "
                f"+-{self.tolerance:.0%} of it and it moved <= {self.tolerance / 2:.1%} over "
                f"the last {self.window} runs; noisy if not stable at {self.max_runs} runs{bound}")

    def assess(self, runs: Sequence[float]) -> Spread:
        """The spread of ``runs`` (in order) and the rule's verdict on it."""
        n = len(runs)
        if n == 0:
            raise ValueError("no runs to assess")
        med = statistics.median(runs)
        q1, q3 = (statistics.quantiles(runs, n=4, method="inclusive")[::2] if n > 1
                  else (runs[0], runs[0]))
        lo, hi, coverage = median_interval(runs)
        ci_rel = _rel(max(med - lo, hi - med), med)
        recent = [statistics.median(runs[:j]) for j in range(max(1, n - self.window + 1), n + 1)]
        moved = max(_rel(abs(m - med), med) for m in recent)
        if n < self.needed:
            stable, reason = False, f"{n} run{'s' if n != 1 else ''}, the rule needs {self.needed}"
        elif ci_rel > self.tolerance:
            stable, reason = False, (f"the median's {coverage:.0%} confidence interval is "
                                     f"+-{ci_rel:.1%}, wider than +-{self.tolerance:.0%}")
        elif moved > self.tolerance / 2:
            stable, reason = False, (f"the median still moved {moved:.1%} over the last "
                                     f"{self.window} runs (more than {self.tolerance / 2:.1%})")
        else:
            stable, reason = True, (f"median +-{ci_rel:.1%} ({coverage:.0%} confidence) over "
                                    f"{n} runs, moved {moved:.1%} over the last {self.window}")
        return Spread(runs=n, median=med, min=min(runs), max=max(runs), q1=q1, q3=q3,
                      iqr_rel=_rel(q3 - q1, med), ci_low=lo, ci_high=hi, ci_rel=ci_rel,
                      confidence=coverage, median_moved=moved, stable=stable, reason=reason,
                      rule=self.text())

    def stop(self, runs: Sequence[float]) -> str | None:
        """Why to stop after ``runs`` (``"stable"`` or ``"max runs"``), or None to go on."""
        if self.assess(runs).stable:
            return "stable"
        if len(runs) >= self.max_runs:
            return "max runs"
        return None


def median_interval(runs: Sequence[float], confidence: float | None = None) -> tuple[float, float, float]:
    """Distribution-free confidence interval of the median: the order statistics
    ``[x(k), x(n+1-k)]`` with the largest k for which the number of runs below the true
    median, Binomial(n, 1/2), falls below k or above n-k with probability at most
    ``1 - confidence`` (the sign-test interval for a quantile; W. J. Conover, *Practical
    Nonparametric Statistics*, 3rd ed., 1999, section 3.2). With few runs even k = 1 (min to
    max) covers less: n = 5 gives 93.75%. Returns (low, high, coverage)."""
    conf = CONFIDENCE if confidence is None else confidence
    xs = sorted(runs)
    n = len(xs)

    # tail[j] = P(B <= j), B ~ Binomial(n, 1/2), for j < k
    total, term, tail = 2 ** n, 1, [1 / 2 ** n]
    k = 1
    while k + 1 <= (n + 1) // 2:
        term = term * (n - k + 1) // k  # C(n, k)
        if 2 * (tail[-1] + term / total) > 1 - conf:
            break
        tail.append(tail[-1] + term / total)
        k += 1
    return xs[k - 1], xs[n - k], 1 - 2 * tail[k - 1]


def _rel(x: float, median: float) -> float:
    if median == 0:
        return 0.0 if x == 0 else math.inf
    return x / abs(median)


@dataclass(frozen=True)
class BenchOptions:
    """How to measure. ``iterations`` fixes N (no calibration); otherwise N doubles from
    :data:`START_ITERATIONS` until a batch takes ``target_ticks``. ``runs`` is the most runs
    per route; :attr:`rule` decides when fewer are enough. ``cpu`` pins the vCPU thread."""

    iterations: int | None = None
    target_ticks: int = DEFAULT_TARGET_TICKS
    runs: int = DEFAULT_RUNS
    max_iterations: int = MAX_ITERATIONS
    min_runs: int = DEFAULT_MIN_RUNS
    tolerance: float = DEFAULT_TOLERANCE
    max_seconds: float | None = DEFAULT_SECONDS
    cpu: int | None = None

    def __post_init__(self) -> None:
        if self.iterations is not None and not 1 <= self.iterations <= self.max_iterations:
            raise UsageError(f"iterations must be between 1 and {self.max_iterations}")
        if self.target_ticks < 1:
            raise UsageError("target ticks must be positive")
        if self.runs < 1:
            raise UsageError("runs must be at least 1")
        _ = self.rule  # validates tolerance, min runs and the time bound
        if self.cpu is not None:
            check_cpu(self.cpu)

    @property
    def rule(self) -> StopRule:
        return StopRule(tolerance=self.tolerance, min_runs=self.min_runs, max_runs=self.runs,
                        max_seconds=self.max_seconds)


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
        intact = mem == bytes([layout.RO_PATTERN]) * len(mem)
        changed = [] if intact else [i for i, b in enumerate(mem) if b != layout.RO_PATTERN]
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


class _Measurement:
    """One route being measured: its open session, N, checks and runs so far."""

    def __init__(self, backend: Backend, route: Route, cpl: int, options: BenchOptions,
                 price: Price | None, on_batch: OnBatch | None):
        self.backend, self.route, self.cpl = backend, route, cpl
        self.options, self.price, self.on_batch = options, price, on_batch
        self.checker = Checker()
        self.calibration: list[tuple[int, float]] = []
        self.batches_run = 0
        self.n = 0
        self.per_run: list[float] = []
        self.timed = True  # every run carried TSC ticks
        self.last: BatchResult | None = None
        self.stopped_by = ""
        self.session: Session | None = None

    def _run(self, n: int, phase: str) -> BatchResult:
        assert self.session is not None
        batch = self.session.run_batch(n)
        self.batches_run += 1
        check_batch(self.route, batch, self.session, self.batches_run, self.checker)
        if self.on_batch is not None:
            self.on_batch(self.route, phase, batch)
        return batch

    def start(self) -> None:
        """Open the session, then calibrate N (or take the fixed N after a warm-up batch)."""
        opened = self.backend.open(build_machine(self.route, self.cpl))
        self.session = opened.__enter__()
        options = self.options
        if options.iterations is not None:
            self.n = options.iterations
            self._run(min(WARMUP_ITERATIONS, self.n), "warm-up")
            return
        n = START_ITERATIONS
        while True:
            ticks = _batch_ticks(self._run(n, "calibrate"), self.price)
            self.calibration.append((n, ticks))
            if ticks >= options.target_ticks or n >= options.max_iterations:
                break
            # Jump closer when far below the goal (same end point as doubling, fewer batches).
            factor = 2
            while ticks * factor * 2 < options.target_ticks and n * factor * 2 <= options.max_iterations:
                factor *= 2
            n = min(n * factor, options.max_iterations)
        self.n = n

    def run_once(self) -> None:
        self.last = self._run(self.n, "run")
        self.timed = self.timed and self.last.ticks is not None
        self.per_run.append(_cycles(self.last, self.price))

    def close(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            session.__exit__(None, None, None)

    def result(self, rule: StopRule) -> RunResult:
        last, n, per_run, options = self.last, self.n, self.per_run, self.options
        assert last is not None
        spread = None
        if self.timed:
            spread = replace(rule.assess(per_run), stopped_by=self.stopped_by)
        return RunResult(
            route=self.route.name,
            backend=self.backend.name,
            cycles=statistics.median(per_run),
            cycles_spread=(min(per_run), max(per_run)),
            iterations=n,
            eventfd_signals=sum(last.eventfd_signals.values()),
            user_exits=last.user_exits,
            correct=self.checker.ok,
            checks=self.checker.lines(),
            kvm_stats=dict(last.kvm_stats),
            events=dict(last.events),
            spread=spread,
            extra={
                "cpl": self.cpl,
                "kut": self.route.kut,
                "description": self.route.description,
                "runs_cycles": per_run,
                "calibration": [list(c) for c in self.calibration],
                "target_ticks": None if options.iterations is not None else options.target_ticks,
                "cpu": options.cpu,
                "coalesced_entries": last.coalesced_entries,
                "user_exits_per_notification": last.user_exits / n,
                "host_ns_per_notification": last.host_ns / n,
                "host_ns_outside_run_per_notification": last.host_ns_outside_run / n,
            },
        )


Clock = Callable[[], float]
OnError = Callable[[Route, FastmmioError], RunResult]


def _interleaved(measurements: list[_Measurement], options: BenchOptions, clock: Clock,
                 on_error: OnError | None,
                 on_result: Callable[[RunResult], None] | None) -> list[RunResult]:
    """Start every route, then run rounds (run k of every route still measuring) until each
    is stable, has ``options.runs`` runs, or the time bound has passed (every route gets at
    least one run). ``on_error`` turns a route's error into its result (None: raise it)."""
    rule = options.rule
    results: dict[int, RunResult] = {}
    t0 = clock()

    def finish(i: int, m: _Measurement, exc: FastmmioError | None = None) -> None:
        m.close()
        if exc is not None:
            if on_error is None:
                raise exc
            results[i] = on_error(m.route, exc)
        else:
            results[i] = m.result(rule)
        if on_result is not None:
            on_result(results[i])

    active: dict[int, _Measurement] = {}
    try:
        for i, m in enumerate(measurements):
            try:
                m.start()
                active[i] = m
            except FastmmioError as exc:
                finish(i, m, exc)
        first = True
        while active:
            if not first and rule.max_seconds is not None and clock() - t0 >= rule.max_seconds:
                for i, m in list(active.items()):
                    m.stopped_by = "time bound"
                    del active[i]
                    finish(i, m)
                break
            first = False
            for i, m in list(active.items()):
                try:
                    m.run_once()
                except FastmmioError as exc:
                    del active[i]
                    finish(i, m, exc)
                    continue
                why = rule.stop(m.per_run)
                if why is not None:
                    m.stopped_by = why
                    del active[i]
                    finish(i, m)
    finally:
        for m in measurements:
            m.close()
    return [results[i] for i in range(len(measurements))]


def measure_route(
    backend: Backend,
    route: Route,
    cpl: int,
    options: BenchOptions = BenchOptions(),
    price: Price | None = None,
    on_batch: OnBatch | None = None,
    clock: Clock = time.monotonic,
) -> RunResult:
    """Calibrate (or take the fixed N), run batches until ``options.rule`` stops, check every
    batch.

    Raises what the backend raises (HostError, GuestError, IoEventFdError); see
    :func:`bench_routes` for a runner that records those as failed results instead."""
    with pinned(options.cpu):
        m = _Measurement(backend, route, cpl, options, price, on_batch)
        return _interleaved([m], options, clock, None, None)[0]


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
    clock: Clock = time.monotonic,
) -> list[RunResult]:
    """:func:`measure_route` for all routes at once, their runs interleaved (see the module
    docstring); results in the order of ``routes``, ``on_result`` as each route finishes. A
    route the guest or KVM fails on (GuestError, an ioeventfd refusal, a missing capability)
    becomes a failed result and the rest still run. A HostError about the device itself
    (missing /dev/kvm) stops everything; so does a UsageError."""

    def on_error(route: Route, exc: FastmmioError) -> RunResult:
        if isinstance(exc, UsageError) or (isinstance(exc, HostError)
                                           and "KVM_CAP" not in str(exc)):
            raise exc
        return failed_result(backend, route, cpl, exc)

    with pinned(options.cpu):
        ms = [_Measurement(backend, r, cpl, options, price, on_batch) for r in routes]
        return _interleaved(ms, options, clock, on_error, on_result)


@dataclass
class HostBench:
    """One host's bench, as a fleet run gathers it (``fastmmio bench --scheduler``): where it
    ran, the host record, the results in the order asked, the routes this host skipped and
    why, or the error that stopped it (``error``, results then empty)."""

    hostname: str
    worker: str
    host: Any  # fastmmio.result.HostInfo (None when the host could not be detected)
    results: list[RunResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    error: str = ""


def bench_this_host(route_names: Sequence[str], options: BenchOptions, cpl: int | None,
                    device: str, watchdog_s: Callable[[int | None], float]) -> HostBench:
    """Bench ``route_names`` (all the routes this host supports when empty) on this process's
    host, as ``fastmmio bench`` does locally: the task each worker of a fleet run executes.
    ``watchdog_s(tsc_khz)``: the run-loop watchdog for this host's TSC rate. Never raises for
    a host problem (a missing device, a route this host cannot run when named): it comes back
    in ``error`` so that the other hosts' results still arrive."""
    import socket

    from fastmmio.real.backend import RealBackend
    from fastmmio.real.host import detect_host, unsupported_reason
    from fastmmio.real.objects import Kvm
    from fastmmio.routes import get_route, load_catalogue

    try:
        from distributed import get_worker

        worker = get_worker().address
    except (ImportError, ValueError):
        worker = ""
    out = HostBench(socket.gethostname(), worker, None)
    try:
        RealBackend(device=device).check()
        out.host = host = detect_host(device, cpl=cpl)
        chosen = []
        with Kvm(device) as kvm:
            for r in ([get_route(n) for n in route_names] if route_names else load_catalogue()):
                why = unsupported_reason(kvm, r, host.guest_cpl, host.kvm_kind)
                (out.skipped.append((r.name, why)) if why else chosen.append(r))
        backend = RealBackend(device=device, watchdog_s=watchdog_s(host.tsc_khz))
        out.results = bench_routes(backend, chosen, host.guest_cpl, options)
    except FastmmioError as exc:
        out.error = str(exc)
    return out
