"""``fastmmio sweep``: cycles per notification of chosen routes against one or two machine
parameters.

Parameters, and how each reaches the models:

``tlb-size``
    Entries of the combined TLB (all page sizes in one fully associative LRU structure; 0 =
    no combined TLB). A :class:`~fastmmio.sim.vmx.caches.TranslationCacheConfig` derived from
    the ``--caches`` configuration; the guest-physical TLB and the paging-structure caches stay
    as they are there. The SDM allows any size, none included (28.3.3.2: a processor "may
    invalidate any cached mappings at any time").
``psc-levels``
    How many paging-structure-cache levels exist, from the bottom: 0 none, 1 PDE, 2 PDE and
    PDPTE, 3 all three (SDM 4.10.3 names the three; Intel documents no sizes), for both the
    combined and the guest-physical caches; a level the base configuration lacks is added
    unbounded.
``memory-latency``
    The price of a walk reference served by memory (``walk.served.mem``), a profile
    override: only pricing changes, the guest is not re-run.
``ioeventfds``
    Wildcard ioeventfds added to each I/O bus besides the route's own
    (``SimOptions.extra_ioeventfds``): the bus look-up's binary search grows with them.
``vpid``, ``nested``
    on / off.
``caches``
    Named cache configurations (``sdm-max``, ``none``, ``skylake-sp``, ...).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from fastmmio.compare.core import (
    DEFAULT_ITERATIONS,
    NA,
    PIO_REFERENCE,
    Cell,
    Comparison,
    Timings,
    check_caches,
    check_variants,
    sim_options,
)
from fastmmio.costs import Profile, load_profile
from fastmmio.errors import UsageError, did_you_mean
from fastmmio.routes import get_route
from fastmmio.sim.nested import nested_setting
from fastmmio.sim.vmx.caches import (
    CONFIGS,
    PAGE_SHIFTS,
    UNBOUNDED,
    CacheSpec,
    TlbStructure,
    TranslationCacheConfig,
)

PARAMS = ("tlb-size", "psc-levels", "memory-latency", "ioeventfds", "vpid", "nested", "caches")
CATEGORICAL = ("vpid", "nested", "caches")
DEFAULT_ROUTES = ("pio-eventfd-len1", "mmio-eventfd-len0", "ro-write-eventfd", "mmio-user")
DEFAULT_VARIANTS = ("upstream", "rfc-2015")
PSC_ORDER = ("pde", "pdpte", "pml4e")  # from the bottom of the walk up
MAX_POINTS = 400  # simulations one sweep may ask for


def _int(text: str, param: str, lo: int, hi: int) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise UsageError(f"--param {param}: {text!r} is not an integer") from None
    if not lo <= v <= hi:
        raise UsageError(f"--param {param}: {v} is outside {lo}..{hi}")
    return v


def parse_values(param: str, texts: Sequence[str]) -> list[Any]:
    """The values of ``param``, each checked (a :class:`UsageError` naming the problem)."""
    if param not in PARAMS:
        raise UsageError(f"unknown sweep parameter {param!r}{did_you_mean(param, PARAMS)}; choose from {', '.join(PARAMS)}")
    if not texts:
        raise UsageError(f"--param {param}: no values given (--values V1,V2,...)")
    out: list[Any] = []
    for t in texts:
        t = t.strip()
        if param == "tlb-size":
            out.append(_int(t, param, 0, 1 << 16))
        elif param == "psc-levels":
            out.append(_int(t, param, 0, 3))
        elif param == "ioeventfds":
            out.append(_int(t, param, 0, 1024))
        elif param == "memory-latency":
            try:
                v = float(t)
            except ValueError:
                raise UsageError(f"--param {param}: {t!r} is not a number of cycles") from None
            if not (math.isfinite(v) and v >= 0):
                raise UsageError(f"--param {param}: {t!r} must be a finite number >= 0")
            out.append(v)
        elif param == "nested":
            out.append(nested_setting(t))  # off, on (the default L0) or an L0 model
        elif param == "vpid":
            low = t.lower()
            if low not in ("on", "off"):
                raise UsageError(f"--param {param}: values are on or off, not {t!r}")
            out.append(low == "on")
        else:  # caches
            out.append(check_caches(t))
    if len(set(map(str, out))) != len(out):
        raise UsageError(f"--param {param}: a value is given twice")
    return out


def tlb_config(base: TranslationCacheConfig, entries: int) -> TranslationCacheConfig:
    """``base`` with a combined TLB of ``entries`` entries (fully associative, LRU, every
    page size), or none at all for 0."""
    tlb: tuple[TlbStructure, ...] = ()
    if entries:
        tlb = (TlbStructure(PAGE_SHIFTS, CacheSpec(
            entries, None, source=f"fastmmio sweep: {entries} entries, fully associative")),)
    return replace(base, name=f"{base.name}+tlb{entries}",
                   description=f"{base.description}; combined TLB {entries} entries",
                   combined_tlb=tlb)


def psc_config(base: TranslationCacheConfig, levels: int) -> TranslationCacheConfig:
    """``base`` with only the lowest ``levels`` paging-structure-cache levels."""
    kept = PSC_ORDER[:levels]

    def cut(d: dict[str, CacheSpec | None]) -> dict[str, CacheSpec | None]:
        return {lvl: ((d.get(lvl) or UNBOUNDED) if lvl in kept else None) for lvl in PSC_ORDER}

    return replace(base, name=f"{base.name}+psc{levels}",
                   description=f"{base.description}; {levels} paging-structure-cache levels",
                   combined_psc=cut(base.combined_psc),
                   guest_physical_psc=cut(base.guest_physical_psc))


def with_memory_latency(profile: Profile, cycles: float) -> Profile:
    """``profile`` with ``walk.served.mem`` priced at ``cycles``."""
    old = profile.prices.get("walk.served.mem")
    if old is None:
        raise UsageError(f"profile {profile.name} has no walk.served.mem price to override")
    new = replace(old, cycles=float(cycles), basis="estimate", source_ref=None,
                  source=f"fastmmio sweep: memory latency set to {cycles:g} cycles",
                  prior=old.cycles)
    return replace(profile, name=f"{profile.name}+mem{cycles:g}",
                   prices={**profile.prices, "walk.served.mem": new})


@dataclass(frozen=True)
class Base:
    """The machine every sweep point starts from (the command line's other options)."""

    caches: str = "sdm-max"
    vpid: bool = True
    nested: str = "off"  # or an L0 model (fastmmio.sim.nested.L0_MODELS)
    extra_ioeventfds: int = 0


@dataclass
class SweepPoint:
    values: tuple[Any, ...]  # one per swept parameter
    variant: str
    route: str
    cell: Cell
    ratio: float | None


@dataclass
class SweepResult:
    params: tuple[str, ...]
    values: tuple[list[Any], ...]
    routes: tuple[str, ...]
    variants: tuple[str, ...]
    profile: Profile
    base: Base
    points: list[SweepPoint]
    timings: Timings

    def series(self) -> dict[str, list[tuple[float, float]]]:
        """Plot series: one per route x variant (x the second parameter's values), against
        the first parameter (categorical values at their index)."""
        out: dict[str, list[tuple[float, float]]] = {}
        several = len(self.variants) > 1
        for p in self.points:
            if p.cell.status == NA or math.isnan(p.cell.cycles):
                continue
            name = p.route + (f" [{p.variant}]" if several else "")
            if len(self.params) > 1:
                name += f" {self.params[1]}={fmt_value(self.params[1], p.values[1])}"
            out.setdefault(name, []).append((x_position(self, p.values[0]), p.cell.cycles))
        return out

    def xticks(self) -> list[tuple[float, str]] | None:
        if self.params[0] not in CATEGORICAL:
            return None
        return [(float(i), fmt_value(self.params[0], v)) for i, v in enumerate(self.values[0])]


def fmt_value(param: str, v: Any) -> str:
    if param == "nested":
        return nested_setting(v)
    if param == "vpid":
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def x_position(result: SweepResult, value: Any) -> float:
    if result.params[0] in CATEGORICAL:
        return float(result.values[0].index(value))
    return float(value)


def _setting_options(setting: dict[str, Any], base: Base, variant: str):
    """The simulator's options for ``variant`` at one combination of the swept values."""
    caches: str | TranslationCacheConfig = setting.get("caches", base.caches)
    if "tlb-size" in setting or "psc-levels" in setting:
        cfg = CONFIGS[caches] if isinstance(caches, str) else caches
        if "tlb-size" in setting:
            cfg = tlb_config(cfg, setting["tlb-size"])
        if "psc-levels" in setting:
            cfg = psc_config(cfg, setting["psc-levels"])
        caches = cfg
    return sim_options(variant, caches, setting.get("vpid", base.vpid),
                       setting.get("nested", base.nested),
                       setting.get("ioeventfds", base.extra_ioeventfds))


def run_sweep(params: Sequence[tuple[str, Sequence[Any]]], *, routes: Sequence[str] = DEFAULT_ROUTES,
              variants: Sequence[str] = DEFAULT_VARIANTS, profile: Profile | str = "skylake-sp",
              base: Base = Base(), iterations: int = DEFAULT_ITERATIONS,
              progress: Callable[[str, int, int], None] | None = None,
              client: Any = None) -> SweepResult:
    """Simulate ``routes`` x ``variants`` at every combination of the parameters' values
    (the simulations on ``client``'s Dask cluster first when one is given,
    :func:`fastmmio.compare.parallel.prefill`)."""
    if not 1 <= len(params) <= 2:
        raise UsageError("sweep one or two parameters (--param NAME --values V1,V2 ...)")
    names = tuple(p for p, _ in params)
    if len(set(names)) != len(names):
        raise UsageError(f"parameter {names[0]} given twice")
    variants = check_variants(tuple(variants))
    for r in routes:
        get_route(r)
    check_caches(base.caches)
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    values = tuple(list(v) for _, v in params)
    combos = list(itertools.product(*values))
    total = len(combos) * len(variants) * len(routes)
    if total > MAX_POINTS:
        raise UsageError(f"the sweep asks for {total} simulations; at most {MAX_POINTS}")
    if any(n == "nested" for n in names) or nested_setting(base.nested) != "off":
        if prof.nested is None:
            raise UsageError(f"profile {prof.name} has no [nested] table: it cannot price nested")
    timings = Timings()
    root = Comparison(prof, iterations=iterations, timings=timings)
    priced: dict[float, Comparison] = {}
    points: list[SweepPoint] = []
    done = 0
    if client is not None:
        from fastmmio.compare.parallel import prefill

        prefill(root, [(r, _setting_options(dict(zip(names, combo)), base, v))
                       for combo in combos for v in variants for r in routes], client,
                on_done=None if progress is None else
                lambda n, t: progress(f"simulations on the cluster: {n} of {t}", n, total))
    for combo in combos:
        setting = dict(zip(names, combo))
        comparison = root
        if "memory-latency" in setting:
            lat = setting["memory-latency"]
            comparison = priced.get(lat) or priced.setdefault(
                lat, root.with_profile(with_memory_latency(prof, lat)))
        for v in variants:
            opts = _setting_options(setting, base, v)
            for r in routes:
                if progress is not None:
                    label = ", ".join(f"{n}={fmt_value(n, x)}" for n, x in setting.items())
                    progress(f"{r} [{v}] {label}", done, total)
                cell = comparison.cell(r, opts, "sweep")
                ratio = (comparison.ratio_to_pio(cell)
                         if comparison.simulated(PIO_REFERENCE, opts) else None)
                points.append(SweepPoint(tuple(combo), v, r, cell, ratio))
                done += 1
    # PIO's cell may come after the route's in the loop: fill the ratios now
    for p in points:
        if p.ratio is None and p.cell.pricing is not None:
            comp = root
            if "memory-latency" in names:
                comp = priced[p.values[names.index("memory-latency")]]
            if comp.simulated(PIO_REFERENCE, p.cell.run.options):
                p.ratio = comp.ratio_to_pio(p.cell)
    return SweepResult(names, values, tuple(routes), variants, prof, base, points, timings)
