"""The simulated side of ``fastmmio compare``: routes x KVM variants x machine settings, each
run once on the simulator and priced with a CPU profile.

A :class:`Comparison` owns one cost profile and a memo of simulations keyed by the route and
everything in :class:`~fastmmio.sim.backend.SimOptions` that changes what the models count.
Every cell is the same measurement :mod:`fastmmio.bench` makes on real KVM
(:func:`~fastmmio.bench.measure_route`, with its per-batch correctness checks): a warm-up
batch, then one steady-state batch of a small fixed N (the simulator is deterministic, so one
batch is the whole answer). The steady-state batch's event counts (between the guest's two
RDTSCs) are then priced; pricing is separate from simulating, so a price change (a profile, a
memory latency, the nested setting's prices) re-prices without re-running the guest.

A route a variant cannot run is *not applicable*, not a failure: a route written for another
variant (``Route.variant``), or an ioeventfd the variant's ``kvm_assign_ioeventfd`` refuses
(length 0 before ``KVM_CAP_IOEVENTFD_NO_LENGTH``, f848a5a8). A route whose checks fail under a
variant is a finding (e.g. the RFC as posted signals the eventfd on a read).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from fastmmio.bench import BenchOptions, failed_result, measure_route
from fastmmio.costs import CostModel, Pricing, Profile, load_profile
from fastmmio.errors import (
    FastmmioError,
    GuestError,
    IoEventFdError,
    UsageError,
    did_you_mean,
)
from fastmmio.result import RunResult
from fastmmio.routes import Route, get_route
from fastmmio.sim.backend import EnginePool, SimBackend, SimOptions
from fastmmio.sim.kvm.spte import SpteFormat
from fastmmio.sim.kvm.variants import ALL_VARIANTS
from fastmmio.sim.vmx.caches import CONFIGS, TranslationCacheConfig
from fastmmio.sim.vmx.layouts import EPT_R, EPT_W, EPT_X

SIM_CPL = 0  # kvm-unit-tests runs its vmexit tests at CPL0; so does the simulator here
DEFAULT_ITERATIONS = 32  # steady-state batch (the warm-up batch is as long, up to 64)
MAX_ITERATIONS = 4096
PIO_REFERENCE = "pio-eventfd-len1"  # the port-I/O ioeventfd every ratio is taken against

OK, FAIL, NA = "ok", "fail", "n/a"


# ------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------


def caches_name(caches: str | TranslationCacheConfig) -> str:
    """The name of a cache configuration given by name or as a config object."""
    return caches if isinstance(caches, str) else caches.name


def check_variants(names: "list[str] | tuple[str, ...]") -> tuple[str, ...]:
    """The variant names, each checked (a :class:`UsageError` naming the choices); VMX and
    SVM variants alike (each names its own architecture)."""
    bad = [v for v in names if v not in ALL_VARIANTS]
    if bad:
        raise UsageError(f"unknown KVM variant {bad[0]!r}{did_you_mean(bad[0], ALL_VARIANTS)}; choose from {', '.join(ALL_VARIANTS)}")
    if not names:
        raise UsageError("no KVM variant chosen")
    return tuple(dict.fromkeys(names))


def check_caches(name: str) -> str:
    if name not in CONFIGS:
        raise UsageError(f"unknown cache configuration {name!r}{did_you_mean(name, CONFIGS)}; "
                         f"choose from {', '.join(CONFIGS)}")
    return name


def sim_key(route: str, options: SimOptions) -> tuple:
    """What makes two simulations the same (the watchdog timeout does not)."""
    return (route, options.variant, caches_name(options.caches), options.vpid, options.nested,
            options.mmio_caching, options.ept_ad, options.extra_ioeventfds, options.arch,
            options.next_rip_on_npf)


def ept_entry_state(spte: int, fmt: SpteFormat | None = None) -> str:
    """How the processor sees an EPT entry, by its bits 2:0 (SDM 28.2.2 / 28.2.3.1):
    ``not present`` (000b), ``misconfigured`` (write without read: KVM's MMIO SPTE is W|X),
    ``read-only``, ``read/write`` (execute not shown: a doorbell is never fetched). For an
    NPT entry (``fmt`` NPT) by P, the MMIO mask and W (APM 15.25.6): ``not present``,
    ``reserved`` (KVM's MMIO SPTE: a reserved bit set, so every access is a #NPF with RSV),
    ``read-only``, ``read/write``."""
    if fmt is not None and fmt.name == "npt":
        if not spte & 1:
            return "not present"
        if fmt.mmio_mask and spte & fmt.mmio_mask == fmt.mmio_value:
            return "reserved"
        return "read/write" if spte & 2 else "read-only"
    rwx = spte & (EPT_R | EPT_W | EPT_X)
    if rwx == 0:
        return "not present"
    if rwx & EPT_W and not rwx & EPT_R:
        return "misconfigured"
    if not rwx & EPT_R:
        return "execute-only"
    return "read/write" if rwx & EPT_W else "read-only"


class Timings:
    """Host seconds spent, by key (``simulate``, ``simulate:variant:<v>``, ``price``...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, key: str, seconds: float) -> None:
        self.seconds[key] += seconds
        self.counts[key] += 1

    @contextmanager
    def measure(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(key, time.perf_counter() - t0)

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in sorted(self.seconds.items())}


class _RecordingBackend:
    """A SimBackend that keeps the last session it opened, so that the machine's state (the
    doorbell's EPT entry) can be read after :func:`measure_route` has closed it (a closed
    SimSession keeps its models)."""

    def __init__(self, options: SimOptions, engines: EnginePool | None = None):
        self.inner = SimBackend(options, engines=engines)
        self.name = self.inner.name
        self.session = None

    def open(self, machine):
        self.session = self.inner.open(machine)
        return self.session


# ------------------------------------------------------------------------------------------
# simulations and priced cells
# ------------------------------------------------------------------------------------------


@dataclass
class SimRun:
    """One route simulated under one machine setting (not priced).

    ``status``: ``ok`` (every check passed), ``fail`` (a check failed, or the guest stopped),
    ``n/a`` (the variant cannot run the route: ``reason`` says why). ``result`` is the
    :class:`RunResult` of :func:`measure_route` (its ``events`` are the steady-state batch's);
    its cycles are set when a :class:`Cell` prices it. ``ept_entry``: how the processor sees
    the EPT entry of the access's guest-physical address after the batch (memory routes).
    """

    route: Route
    options: SimOptions
    status: str
    result: RunResult | None
    reason: str = ""
    ept_entry: str | None = None
    seconds: float = 0.0

    @property
    def iterations(self) -> int:
        return self.result.iterations if self.result is not None else 0

    def per_notification(self) -> dict[str, float]:
        """Event counts of the steady-state batch divided by N."""
        n = self.iterations
        if not n or self.result is None:
            return {}
        return {k: v / n for k, v in self.result.events.items()}


def _sum(per: Mapping[str, float], prefix: str) -> float:
    return sum(v for k, v in per.items() if k.startswith(prefix))


@dataclass
class Cell:
    """A priced simulation: the figures ``fastmmio compare`` reports for one route under one
    variant and machine setting. Per-notification figures come from the steady-state batch."""

    run: SimRun
    scenario: str
    pricing: Pricing | None = None
    price_error: str = ""

    @property
    def route(self) -> str:
        return self.run.route.name

    @property
    def variant(self) -> str:
        return self.run.options.variant

    @property
    def status(self) -> str:
        if self.run.status == OK and self.pricing is None:
            return NA
        return self.run.status

    @property
    def reason(self) -> str:
        return self.run.reason or self.price_error

    @property
    def correct(self) -> bool:
        return self.run.status == OK

    @property
    def cycles(self) -> float:
        return self.pricing.cycles if self.pricing is not None else math.nan

    @property
    def breakdown(self) -> dict[str, float]:
        return dict(self.pricing.breakdown) if self.pricing is not None else {}

    @property
    def per(self) -> dict[str, float]:
        return self.run.per_notification()

    @property
    def exits(self) -> float:
        """VM exits per notification."""
        return _sum(self.per, "exit.")

    def exit_reasons(self) -> dict[str, float]:
        return {k.removeprefix("exit."): v for k, v in sorted(self.per.items())
                if k.startswith("exit.")}

    @property
    def walk_refs(self) -> float:
        """Paging-structure references per notification (guest and EPT entries)."""
        return _sum(self.per, "walk.ref.")

    @property
    def tlb_hits(self) -> float:
        return self.per.get("tlb.combined.hit", 0.0)

    @property
    def tlb_misses(self) -> float:
        return self.per.get("tlb.combined.miss", 0.0)

    def failures(self) -> list[str]:
        if self.run.result is None:
            return [self.run.reason] if self.run.reason else []
        return [c.removeprefix("FAIL: ") for c in self.run.result.checks if c.startswith("FAIL")]

    def to_result(self, ratio: float | None = None) -> RunResult:
        """The JSON record: :class:`RunResult` (cycles and breakdown from the pricing) with
        the machine setting, the status and the per-notification figures in ``extra``."""
        o = self.run.options
        base = self.run.result
        if base is None:
            base = RunResult(route=self.route, backend=f"sim:{o.variant}", cycles=math.nan,
                             cycles_spread=(math.nan, math.nan), iterations=0,
                             eventfd_signals=0, user_exits=0, correct=False)
        extra = dict(base.extra)
        extra.update({
            "variant": o.variant, "caches": caches_name(o.caches), "vpid": o.vpid,
            "nested": o.nested, "mmio_caching": o.mmio_caching, "ept_ad": o.ept_ad,
            "arch": o.arch, "next_rip_on_npf": o.next_rip_on_npf,
            "extra_ioeventfds": o.extra_ioeventfds, "scenario": self.scenario,
            "status": self.status, "reason": self.reason, "ept_entry": self.run.ept_entry,
            "exits_per_notification": self.exits, "exit_reasons": self.exit_reasons(),
            "walk_refs_per_notification": self.walk_refs,
            "tlb_combined_hits_per_notification": self.tlb_hits,
            "tlb_combined_misses_per_notification": self.tlb_misses,
            "ratio_to_pio": ratio,
            "profile": self.pricing.profile if self.pricing else None,
        })
        extra.pop("runs_cycles", None)  # the simulator's placeholder, not a measurement
        cycles = self.cycles
        return replace(base, cycles=cycles, cycles_spread=(cycles, cycles),
                       breakdown=self.breakdown, correct=self.correct, extra=extra)


class Comparison:
    """Simulates routes under machine settings (memoised) and prices them with one profile.

    ``iterations``: N of the steady-state batch (the warm-up batch is ``min(64, N)``).
    ``on_simulate(route, options)`` is called before each new simulation (progress display).
    """

    def __init__(self, profile: Profile | str | Path = "skylake-sp", *,
                 iterations: int = DEFAULT_ITERATIONS, cpl: int = SIM_CPL,
                 on_simulate: Callable[[Route, SimOptions], None] | None = None,
                 timings: Timings | None = None, engines: EnginePool | None = None):
        if not 1 <= iterations <= MAX_ITERATIONS:
            raise UsageError(f"iterations must be between 1 and {MAX_ITERATIONS}")
        self.profile = profile if isinstance(profile, Profile) else load_profile(profile)
        self.iterations = iterations
        self.cpl = cpl
        self.on_simulate = on_simulate
        self.timings = timings if timings is not None else Timings()
        self._runs: dict[tuple, SimRun] = {}
        self._models: dict[tuple, CostModel] = {}
        #: a profile per architecture other than :attr:`profile`'s (``{"svm": zen4}``)
        self.arch_profiles: dict[str, Profile] = {}
        # unicorn engines set up once for all the simulations (a worker of a Dask cluster
        # passes its own, kept between tasks: fastmmio.compare.parallel)
        self._engines = engines if engines is not None else EnginePool()

    def with_profile(self, profile: Profile) -> "Comparison":
        """A comparison pricing with ``profile`` that shares this one's simulations (a price
        change never re-runs the guest)."""
        other = Comparison(profile, iterations=self.iterations, cpl=self.cpl,
                           on_simulate=self.on_simulate, timings=self.timings)
        other._runs = self._runs
        other._engines = self._engines
        other.arch_profiles = dict(self.arch_profiles)
        return other

    # -- pricing ----------------------------------------------------------------------------

    def model(self, nested: bool, arch: str | None = None) -> CostModel:
        """The cost model (ProfileError when the profile cannot price nested). ``arch``: a
        simulation's architecture, priced with its own profile when one was given
        (:attr:`arch_profiles`, e.g. SVM runs with zen4 beside VMX runs with skylake-sp)."""
        profile = self.arch_profiles.get(arch or "", self.profile)
        m = self._models.get((nested, profile.name))
        if m is None:
            m = self._models[(nested, profile.name)] = CostModel(profile, nested=nested)
        return m

    def profile_for(self, arch: str | None) -> Profile:
        """The profile a simulation of ``arch`` is priced with."""
        return self.arch_profiles.get(arch or "", self.profile)

    def can_price_nested(self) -> bool:
        return self.profile.nested is not None

    # -- simulating -------------------------------------------------------------------------

    def runs(self) -> dict[tuple, SimRun]:
        """Every simulation made so far, by :func:`sim_key` (a copy)."""
        return dict(self._runs)

    def restore(self, run: SimRun) -> None:
        """Take a simulation made earlier (a saved run's record) as this one's: a price change
        re-prices it without running the guest (:mod:`fastmmio.compare.saved`)."""
        self._runs[sim_key(run.route.name, run.options)] = run

    def simulated(self, route: str, options: SimOptions) -> bool:
        return sim_key(route, options) in self._runs

    def simulate(self, route: Route | str, options: SimOptions) -> SimRun:
        r = route if isinstance(route, Route) else get_route(route)
        key = sim_key(r.name, options)
        run = self._runs.get(key)
        if run is not None:
            return run
        if self.on_simulate is not None:
            self.on_simulate(r, options)
        t0 = time.perf_counter()
        run = self._simulate(r, options)
        run.seconds = time.perf_counter() - t0
        return self.record(run)

    def record(self, run: SimRun) -> SimRun:
        """Keep ``run`` (simulated here or by a worker of a cluster,
        :mod:`fastmmio.compare.parallel`) as this comparison's simulation of its route and
        options, its seconds counted in the timings."""
        self.timings.add("simulate", run.seconds)
        self.timings.add(f"simulate:variant:{run.options.variant}", run.seconds)
        self.timings.add(f"simulate:route:{run.route.name}", run.seconds)
        self._runs[sim_key(run.route.name, run.options)] = run
        return run

    def _simulate(self, route: Route, options: SimOptions) -> SimRun:
        if route.variant is not None and route.variant != options.variant:
            return SimRun(route, options, NA, None,
                          f"written for the {route.variant} variant")
        backend = _RecordingBackend(options, self._engines)
        bench = BenchOptions(iterations=self.iterations, runs=1)
        try:
            result = measure_route(backend, route, self.cpl, bench, price=lambda _b: 0.0)
        except IoEventFdError as exc:
            return SimRun(route, options, NA, None, f"the variant refuses the route's "
                          f"ioeventfd: {exc.rule}")
        except GuestError as exc:
            return SimRun(route, options, FAIL, failed_result(backend, route, self.cpl, exc),
                          str(exc))
        entry = None
        session = backend.session
        if route.access.is_memory and session is not None:
            mmu = session.vm.mmu
            entry = ept_entry_state(mmu.get_spte(route.access.target), mmu.fmt)
        status = OK if result.correct else FAIL
        reason = "" if result.correct else "; ".join(
            c.removeprefix("FAIL: ") for c in result.checks if c.startswith("FAIL"))
        return SimRun(route, options, status, result, reason, entry)

    def cell(self, route: Route | str, options: SimOptions, scenario: str = "main") -> Cell:
        """The route simulated under ``options`` and priced (nested prices when
        ``options.nested``)."""
        run = self.simulate(route, options)
        cell = Cell(run, scenario)
        if run.result is None or run.status == NA or not run.result.iterations:
            return cell
        t0 = time.perf_counter()
        try:
            model = self.model(options.is_nested, options.arch)
        except FastmmioError as exc:
            cell.price_error = str(exc)
            return cell
        cell.pricing = model.price(run.result.events, run.result.iterations)
        self.timings.add("price", time.perf_counter() - t0)
        return cell

    def pio_cell(self, cell: Cell) -> Cell:
        """The PIO ioeventfd route under ``cell``'s own machine setting: what its ratio is
        taken against (never another setting's)."""
        return self.cell(PIO_REFERENCE, cell.run.options, cell.scenario)

    def ratio_to_pio(self, cell: Cell) -> float | None:
        """``cell``'s cycles over the PIO ioeventfd route's under the same machine setting."""
        if cell.pricing is None:
            return None
        return ratio(cell, self.pio_cell(cell))


def ratio(cell: Cell, pio: Cell) -> float | None:
    """The one ratio rule: ``cell``'s cycles over ``pio``'s (None when either is not priced).
    Callers pass the PIO cell of the same machine setting (:meth:`Comparison.pio_cell`)."""
    if cell.pricing is None or pio.pricing is None or not pio.cycles:
        return None
    return cell.cycles / pio.cycles



def sim_options(variant: str, caches: str | TranslationCacheConfig = "sdm-max", vpid: bool = True,
                nested: str | bool = "off", extra_ioeventfds: int = 0, **kw: Any) -> SimOptions:
    """SimOptions with compare's defaults (watchdog: 30 s a batch); the architecture is the
    variant's (``kw``: other :class:`SimOptions` fields, e.g. ``next_rip_on_npf``)."""
    return SimOptions(variant=variant, caches=caches, vpid=vpid, nested=nested,
                      extra_ioeventfds=extra_ioeventfds, **kw)


@dataclass
class Matrix:
    """Cells by (variant, route) for one machine setting, in the order asked."""

    variants: tuple[str, ...]
    routes: tuple[str, ...]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)

    def by_variant(self, variant: str) -> list[Cell]:
        return [self.cells[(variant, r)] for r in self.routes]
