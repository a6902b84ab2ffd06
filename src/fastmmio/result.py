"""Results: one batch, one route's run, one host. Shared by both backends and the reports.

Field names are the JSON keys of ``fastmmio bench --json`` and ``fastmmio compare``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ExitRecord:
    """One exit to userspace, as ``struct kvm_run`` described it."""

    kind: str  # "io" | "mmio" | "shutdown" | "internal-error" | ...
    addr: int = 0  # port for "io", GPA for "mmio"
    size: int = 0  # access width in bytes
    is_write: bool = False
    data: int = 0  # value written, or value returned to the guest for a read
    count: int = 1  # KVM_EXIT_IO repeat count (string I/O)


@dataclass
class BatchResult:
    """One guest batch of N accesses, from RDTSC to RDTSC, and what happened around it."""

    iterations: int
    ticks: int | None  # guest TSC ticks between the two RDTSCs (None on the simulator)
    user_exits: int  # KVM_RUN returns other than the final "done" OUT
    eventfd_signals: dict[str, int]  # per ioeventfd name: counter increments during the batch
    exits: list[ExitRecord] = field(default_factory=list)  # capped sample of user exits, in order
    coalesced_entries: int = 0  # entries drained from the coalesced ring
    kvm_stats: dict[str, int] = field(default_factory=dict)  # binary-stats deltas (real backend)
    events: dict[str, int] = field(default_factory=dict)  # model event counts (simulator)
    host_ns: int = 0  # host wall time of the batch
    host_ns_outside_run: int = 0  # host time spent outside KVM_RUN (run-loop overhead)


@dataclass(frozen=True)
class Spread:
    """How one measured route's runs scatter and whether its median settled, judged by
    :class:`fastmmio.bench.StopRule` (``rule`` states it). Figures are cycles per notification;
    ``iqr_rel`` and ``median_moved`` are fractions of the median."""

    runs: int
    median: float
    min: float
    max: float
    q1: float  # first quartile (statistics.quantiles, inclusive method)
    q3: float
    iqr_rel: float  # (q3 - q1) / median
    ci_low: float  # confidence interval of the median (order statistics)
    ci_high: float
    ci_rel: float  # max(median - ci_low, ci_high - median) / median
    confidence: float  # the interval's coverage (95%, or less with few runs)
    median_moved: float  # largest move of the running median over the rule's last runs
    stable: bool  # the rule's verdict; False: "noisy", no ratio is derived from the median
    reason: str  # why (not) stable, one line
    stopped_by: str = ""  # "stable" | "max runs" | "time bound"
    rule: str = ""


@dataclass
class RunResult:
    """One route on one backend: the JSON record of ``bench`` and ``compare``."""

    route: str
    backend: str  # "kvm" or "sim:<variant>"
    cycles: float  # median cycles per notification (loop overhead included, as kvm-unit-tests)
    cycles_spread: tuple[float, float]  # (min, max) over the runs
    iterations: int
    eventfd_signals: int  # total over the final batch
    user_exits: int  # total over the final batch
    correct: bool
    checks: list[str] = field(default_factory=list)  # what was checked, failures prefixed "FAIL:"
    kvm_stats: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    breakdown: dict[str, float] = field(default_factory=dict)  # cycles by component (simulator)
    extra: dict[str, Any] = field(default_factory=dict)
    spread: Spread | None = None  # timed runs only (real KVM); None for priced simulations

    @property
    def noisy(self) -> bool:
        """Measured, but the runs did not settle within the rule's tolerance."""
        return self.spread is not None and not self.spread.stable

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["cycles_spread"] = list(self.cycles_spread)
        return d


@dataclass(frozen=True)
class HostInfo:
    cpu_model: str
    tsc_khz: int | None
    kernel: str
    kvm_kind: str  # "vmx" | "svm" | "pvm" | "none"
    nested: bool
    guest_cpl: int
    cpl_reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
