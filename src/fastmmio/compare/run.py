"""One ``fastmmio compare`` run: the simulated matrix, this host's KVM, the calibration and
the verdict, from one set of options.

:func:`run_compare` plans every simulation first (the main matrix: routes x variants under the
chosen machine setting; the verdict's scenarios; the calibration routes), runs them with a
progress callback, measures the upstream routes on this host's KVM when it has a usable
``/dev/kvm``, and builds the verdict from the same numbers.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastmmio.bench import DEFAULT_MIN_RUNS, BenchOptions, bench_routes
from fastmmio.bench import DEFAULT_TOLERANCE as KVM_TOLERANCE
from fastmmio.compare.calibration import CALIBRATIONS, CalibrationRow, calibration_rows
from fastmmio.compare.core import (
    DEFAULT_ITERATIONS,
    PIO_REFERENCE,
    Cell,
    Comparison,
    Matrix,
    Timings,
    caches_name,
    check_caches,
    check_variants,
    sim_key,
    sim_options,
)
from fastmmio.costs import Profile, load_profile
from fastmmio.costs.linear import SAMPLING
from fastmmio.errors import HostError, UsageError
from fastmmio.result import HostInfo, RunResult
from fastmmio.routes import Route, get_route, load_catalogue
from fastmmio.sim.kvm.variants import ALL_VARIANTS, SVM_VARIANTS, VARIANTS, variants_for
from fastmmio.sim.nested import nested_setting
from fastmmio.verdict import DEFAULT_TOLERANCE, Verdict, build_verdict, required
from fastmmio.verdict.svm import SvmVerdict, build_svm_verdict
from fastmmio.verdict.svm import required as svm_required

SVM_PROFILE = "zen4"  # what SVM simulations are priced with unless told otherwise

DEFAULT_PROFILE = "skylake-sp"  # the current Intel server profile
DEFAULT_CACHES = "sdm-max"
DEFAULT_DEVICE = "/dev/kvm"
# The KVM column: short calibrated batches, as many runs as the measuring rule of
# fastmmio.bench needs, at most KVM_RUNS per route and KVM_SECONDS in all. 2^20 ticks is 0.4 ms
# at 2.6 GHz (N's floor of 64 makes a userspace exit's batch ~2 ms): shorter than a scheduler
# time slice, so a neighbour's slice lands in a few runs, which the median outvotes, instead of
# in every run. On the development host (PVM, nested, load average 8 on 2 cores) 2^20 left
# 23-25 of 25 routes stable in 1.5-2 s where 2^24 (~7 ms) left none stable in 21 s.
KVM_TARGET_TICKS = 1 << 20
KVM_RUNS = 200  # a round of the 25 routes takes ~75 ms: the time bound binds first under heavy noise
KVM_SECONDS = 30.0
# At most 2^32 ticks per batch (under 5 s at a 1 GHz TSC, 2x that while calibrating): the
# real backend's default watchdog (10 s) still bounds every batch.
KVM_MAX_TARGET_TICKS = 1 << 32
MAX_SAMPLES = 1_000_000

def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (results.json's ``time_utc``)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass(frozen=True)
class CompareOptions:
    """What ``fastmmio compare`` runs (see ``fastmmio compare --help``)."""

    routes: tuple[str, ...] = ()  # empty: the whole catalogue
    variants: tuple[str, ...] | None = None  # None: every variant of ``arches``
    profile: str = DEFAULT_PROFILE
    caches: str = DEFAULT_CACHES
    vpid: bool = True
    nested: str | bool = "off"  # or an L0 model (fastmmio.sim.nested.L0_MODELS)
    iterations: int = DEFAULT_ITERATIONS
    kvm: bool = True
    device: str = "/dev/kvm"
    kvm_target_ticks: int = KVM_TARGET_TICKS
    kvm_runs: int = KVM_RUNS  # at most, per route
    kvm_seconds: float = KVM_SECONDS  # time bound of the KVM measurement
    kvm_tolerance: float = KVM_TOLERANCE  # the median's 95% interval within +- this
    kvm_cpu: int | None = None  # pin the vCPU thread
    tolerance: float = DEFAULT_TOLERANCE
    verdict: bool = True
    review: bool = True
    uncertainty: int = 0  # sampled price sets (0: off)
    seed: int = 0
    sampling: str = "uniform"
    #: the simulated processors (``vmx``, ``svm``); SVM runs are priced with ``svm_profile``
    arches: tuple[str, ...] = ("vmx",)
    svm_profile: str = SVM_PROFILE

    def __post_init__(self) -> None:
        object.__setattr__(self, "nested", nested_setting(self.nested))
        arches = tuple(dict.fromkeys(self.arches))
        for a in arches:
            variants_for(a)  # UsageError for an unknown architecture
        if not arches:
            raise UsageError("no architecture chosen")
        object.__setattr__(self, "arches", arches)
        if self.variants is None:
            object.__setattr__(self, "variants", tuple(v for a in arches for v in variants_for(a)))
        object.__setattr__(self, "variants", check_variants(tuple(self.variants)))
        for v in self.variants:
            if ALL_VARIANTS[v].arch not in arches:
                raise UsageError(f"variant {v} is for --arch {ALL_VARIANTS[v].arch}, not "
                                 f"{','.join(arches)}")
        check_caches(self.caches)
        for name in self.routes:
            get_route(name)  # UsageError listing the valid names
        if not 0 < self.tolerance < 1:
            raise UsageError(f"tolerance must be a fraction between 0 and 1, got {self.tolerance}")
        if self.kvm_runs < 1 or not 1 <= self.kvm_target_ticks <= KVM_MAX_TARGET_TICKS:
            raise UsageError(f"KVM runs must be positive and target ticks between 1 and "
                             f"2^32 = {KVM_MAX_TARGET_TICKS}")
        if self.uncertainty < 0 or self.uncertainty > MAX_SAMPLES:
            raise UsageError(f"--uncertainty must be between 0 and {MAX_SAMPLES}, "
                             f"got {self.uncertainty}")
        if self.sampling not in SAMPLING:
            raise UsageError(f"unknown sampling {self.sampling!r}; choose from "
                             f"{', '.join(SAMPLING)}")
        if self.uncertainty and not self.verdict:
            raise UsageError("--uncertainty needs the verdict (drop --no-verdict)")
        self.kvm_bench()  # the measuring rule's bounds, the CPU to pin to

    @property
    def is_nested(self) -> bool:
        return self.nested != "off"

    def kvm_bench(self) -> BenchOptions:
        """How the KVM column is measured (UsageError for a bad bound or CPU)."""
        return BenchOptions(target_ticks=self.kvm_target_ticks, runs=self.kvm_runs,
                            min_runs=DEFAULT_MIN_RUNS, tolerance=self.kvm_tolerance,
                            max_seconds=self.kvm_seconds, cpu=self.kvm_cpu)

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class KvmSide:
    """The real-KVM half: ``status`` is ``measured``, ``skipped`` or ``unavailable``."""

    status: str
    reason: str = ""
    host: HostInfo | None = None
    results: list[RunResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def by_route(self) -> dict[str, RunResult]:
        return {r.route: r for r in self.results}

    def ratio_to_pio(self, route: str) -> float | None:
        res = self.by_route()
        pio, r = res.get(PIO_REFERENCE), res.get(route)
        if pio is None or r is None or not pio.correct or not r.correct or not pio.cycles:
            return None
        if pio.noisy or r.noisy:  # no ratio from a median the measuring rule did not settle
            return None
        return r.cycles / pio.cycles

    def comparable(self) -> str:
        """Why this host's cycles are (not) the simulated machine's."""
        if self.host is None:
            return ""
        h = self.host
        if h.kvm_kind == "svm":
            note = ("SVM host (AMD): its MMIO doorbells take #NPF exits; whether "
                    "KVM_FAST_MMIO_BUS is used depends on its kernel (Linux 7.0, 01cde4eaaeca) "
                    "and on the CPU filling next RIP on #NPF; its cycles compare with the "
                    "simulated SVM machine (--arch svm), not the VMX one")
        elif h.kvm_kind != "vmx":
            note = (f"this host's KVM is {h.kvm_kind} (no VMX/EPT): it has no EPT "
                    "misconfiguration fast path and its cycles are not the simulated "
                    "machine's; compare ratios to PIO, not cycles")
        else:
            note = "VMX host: cycles comparable with the simulated machine's"
        if h.nested:
            note += "; nested (every exit also goes through the outer hypervisor)"
        return note + f"; guest CPL{h.guest_cpl} here, CPL0 in the simulator"

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason,
                "host": self.host.to_json() if self.host else None,
                "comparable": self.comparable(),
                "skipped": [{"route": r, "reason": why} for r, why in self.skipped]}


@dataclass
class CompareRun:
    options: CompareOptions
    profile: Profile
    comparison: Comparison
    matrix: Matrix
    kvm: KvmSide
    verdict: Verdict | None
    calibration: list[CalibrationRow] | None
    timings: Timings
    wall_s: float = 0.0
    svm_verdict: SvmVerdict | None = None
    # How the run was made (results.json's "run" record): the command line and the UTC time
    # it started; a run re-rendered by ``fastmmio report`` keeps the saved run's in ``origin``.
    argv: list[str] = field(default_factory=lambda: list(sys.argv))
    started_utc: str = field(default_factory=lambda: utc_now())
    origin: dict[str, Any] | None = None

    def cells(self) -> list[Cell]:
        return list(self.matrix.cells.values())

    def all_cells(self) -> list[Cell]:
        """Every priced cell of the run, once: the main matrix, then the cells the verdict
        judged (read from its judgement, never collected again)."""
        out, seen = [], set()
        judged = self.verdict.judgement.all_cells() if self.verdict is not None else []
        for c in self.cells() + judged:
            k = sim_key(c.route, c.run.options)
            if k not in seen:
                seen.add(k)
                out.append(c)
        return out

    def failed_baseline(self) -> list[str]:
        """Failures that are tool or host problems, not findings: upstream KVM (simulated
        or real) failing a route's checks."""
        out = [f"{c.route} [sim:{c.variant}]: {c.reason}" for c in self.cells()
               if c.variant in ("upstream", "upstream-2013", "svm", "svm-pre-7.0")
               and c.status == "fail"]
        out += [f"{r.route} [kvm]: " + "; ".join(x for x in r.checks if x.startswith("FAIL"))
                for r in self.kvm.results if not r.correct]
        return out


def _select_routes(names: tuple[str, ...]) -> tuple[Route, ...]:
    if names:
        return tuple(get_route(n) for n in dict.fromkeys(names))
    return load_catalogue()


def plan(options: CompareOptions, comparison: Comparison) -> list[tuple[Route, Any, str]]:
    """Every simulation the run needs, deduplicated, in run order."""
    routes = _select_routes(options.routes)
    tasks: list[tuple[Route, Any, str]] = []
    seen: set[tuple] = set()

    def add(route: Route, opts, scenario: str) -> None:
        key = sim_key(route.name, opts)
        if key not in seen:
            seen.add(key)
            tasks.append((route, opts, scenario))

    pio = get_route(PIO_REFERENCE)
    for v in options.variants:
        opts = sim_options(v, options.caches, options.vpid, options.nested)
        for r in routes:
            add(r, opts, "main")
        add(pio, opts, "main")
    if options.verdict and _vmx(options.variants):
        for name, opts, sc in required(_vmx(options.variants), comparison):
            add(get_route(name), opts, sc)
        for name, opts, sc in svm_required(_svm(options.variants)):
            add(get_route(name), opts, sc)
    cal = CALIBRATIONS.get(comparison.profile.name)
    if cal is not None:
        for f in cal.figures:
            add(get_route(f.route), cal.options(), "calibration")
    return tasks


def run_kvm(routes: tuple[Route, ...], options: CompareOptions, progress: Progress | None,
            done0: int, total: int, timings: Timings) -> KvmSide:
    """The upstream routes on this host's KVM: a small calibrated batch, runs interleaved
    across routes until each median is stable (:class:`fastmmio.bench.StopRule`), at most
    ``kvm_runs`` runs and ``kvm_seconds``; the vCPU thread pinned to ``kvm_cpu`` if given."""
    from fastmmio.real.host import unsupported_reason
    from fastmmio.real.backend import RealBackend
    from fastmmio.real.host import detect_host
    from fastmmio.real.objects import Kvm

    t0 = time.perf_counter()
    try:
        RealBackend(device=options.device).check()
    except HostError as exc:
        return KvmSide("unavailable", f"this host has no usable KVM: {exc}")
    host = detect_host(options.device)
    side = KvmSide("measured", host=host)
    chosen = []
    try:
        with Kvm(options.device) as kvm:
            for r in routes:
                why = unsupported_reason(kvm, r, host.guest_cpl, host.kvm_kind)
                (side.skipped.append((r.name, why)) if why else chosen.append(r))
        done = [done0]

        def on_result(res: RunResult) -> None:
            done[0] += 1
            if progress is not None:
                progress(f"KVM {res.route}", done[0], total)

        side.results = bench_routes(
            RealBackend(device=options.device), chosen, host.guest_cpl,
            options.kvm_bench(), on_result=on_result)
    except HostError as exc:
        side.status, side.reason = "unavailable", f"KVM failed during the run: {exc}"
    timings.add("kvm", time.perf_counter() - t0)
    return side


def run_compare(options: CompareOptions, progress: Progress | None = None,
                profile: Profile | None = None, client: Any = None) -> CompareRun:
    """The whole job (simulation, real KVM, calibration, verdict); outputs are written by
    :func:`fastmmio.report.compare.write_outputs`. ``client``: a Dask client
    (:func:`fastmmio.fanout.open_client`) to run the planned simulations on, or None to
    run them here."""
    t_start = time.perf_counter()
    started = utc_now()
    timings = Timings()
    prof = profile if profile is not None else load_profile(options.profile)
    if options.is_nested and prof.nested is None:
        raise UsageError(f"profile {prof.name} has no [nested] table: it cannot price "
                         "--nested (use a profile that has one, e.g. skylake-sp)")
    if options.arches == ("svm",) and profile is None and options.profile == DEFAULT_PROFILE:
        prof = load_profile(options.svm_profile)
    comparison = Comparison(prof, iterations=options.iterations, timings=timings)
    if "svm" in options.arches:
        comparison.arch_profiles["svm"] = (prof if options.arches == ("svm",)
                                           else load_profile(options.svm_profile))
    routes = _select_routes(options.routes)
    kvm_routes = tuple(r for r in routes if r.upstream) if options.kvm else ()
    tasks = plan(options, comparison)
    n_review = len(_vmx(options.variants)) if options.verdict and options.review else 0
    total = len(tasks) + n_review + len(kvm_routes)
    done = 0
    if client is not None:
        from fastmmio.compare.parallel import prefill

        prefill(comparison, [(r, o) for r, o, _ in tasks], client,
                on_done=None if progress is None else
                lambda n, _t: progress(f"simulations on the cluster: {n} of {len(tasks)}", n, total))
    for route, opts, scenario in tasks:
        if progress is not None:
            progress(f"{route.name} [{opts.variant}, {caches_name(opts.caches)}"
                     f"{', vpid off' if not opts.vpid else ''}{f', nested under {opts.nested}' if opts.is_nested else ''}]",
                     done, total)
        comparison.simulate(route, opts)
        done += 1

    matrix = Matrix(options.variants, tuple(r.name for r in routes))
    for v in options.variants:
        opts = sim_options(v, options.caches, options.vpid, options.nested)
        for r in routes:
            matrix.cells[(v, r.name)] = comparison.cell(r, opts, "main")

    if options.kvm:
        kvm = run_kvm(kvm_routes, options, progress, done, total, timings)
    else:
        kvm = KvmSide("skipped", "--no-kvm")
    done += len(kvm_routes)

    verdict = None
    svm_verdict = None
    if options.verdict and _svm(options.variants):
        svm_verdict = build_svm_verdict(comparison, list(_svm(options.variants)),
                                        options.tolerance)
    if options.verdict and _vmx(options.variants):
        t0 = time.perf_counter()
        step = [done]

        def on_review(variant: str) -> None:
            if progress is not None:
                progress(f"review checks [{variant}]", step[0], total)
            step[0] += 1

        verdict = build_verdict(comparison, _vmx(options.variants),
                                [c for c in matrix.cells.values() if c.variant in VARIANTS],
                                tolerance=options.tolerance, review=options.review,
                                on_review=on_review, samples=options.uncertainty,
                                seed=options.seed, sampling=options.sampling)
        timings.add("verdict", time.perf_counter() - t0)
    cal = calibration_rows(comparison)
    run = CompareRun(options, prof, comparison, matrix, kvm, verdict, cal, timings,
                     svm_verdict=svm_verdict, started_utc=started)
    run.wall_s = time.perf_counter() - t_start
    return run


def _vmx(variants: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(v for v in variants if v in VARIANTS)


def _svm(variants: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(v for v in variants if v in SVM_VARIANTS)


def default_out() -> Path:
    return Path("fastmmio-out")
