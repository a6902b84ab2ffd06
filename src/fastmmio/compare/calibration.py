"""Calibration: the simulator and a cost profile held against published cycle figures.

The only published per-route figures for the doorbell routes are the six kvm-unit-tests
pci-testdev numbers of QEMU commit 22773d60 (2013, the commit message's example output of
kvm-unit-tests; ``data/anchors/pci-testdev-2013.toml``), taken on KVM before
the fast MMIO bus: the simulated ``upstream-2013`` variant, wildcard MMIO of length 1. Profile
``pci-testdev-2013`` is fitted to them with the simulator's own steady-state event vectors
(:func:`simulated_events`, CPL0 as kvm-unit-tests runs): :func:`refit_profile` redoes that fit
(:func:`fastmmio.costs.fit.refit`) and can write it into the profile file, and
:func:`calibration_rows` compares each figure with what the simulator and the profile give
now (``fastmmio compare --profile pci-testdev-2013`` prints them).

Command line: ``python -m fastmmio.compare.calibration [--write] [--profile PATH]``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

from fastmmio.compare.core import Comparison, sim_options
from fastmmio.costs.fit import FitResult, Target, fit_profile, refit, separable_prices
from fastmmio.costs.model import CostModel
from fastmmio.costs.profile import Profile, load_profile
from fastmmio.errors import FastmmioError

SOURCE_22773D60 = ("QEMU commit 22773d60 'pci: add pci test device' (Michael S. Tsirkin, "
                   "2013), commit message: kvm-unit-tests pci figures in cycles")


@dataclass(frozen=True)
class Figure:
    """One published figure: the kvm-unit-tests test, the catalogue route that makes the
    same access, and the cycles."""

    kut: str
    route: str
    cycles: float
    source: str = SOURCE_22773D60


@dataclass(frozen=True)
class Calibration:
    """A set of published figures and the simulated machine they were taken on."""

    profile: str  # the bundled profile fitted to them
    variant: str
    figures: tuple[Figure, ...]
    caches: str = "sdm-max"
    vpid: bool = True
    note: str = ""

    def options(self):
        return sim_options(self.variant, self.caches, self.vpid, False)


def map_figures(named: Mapping[str, float], era: str, source: str
                ) -> tuple[tuple[Figure, ...], tuple[tuple[str, str], ...]]:
    """kvm-unit-tests figures (name -> cycles) mapped to routes through the name table
    (:mod:`fastmmio.kut`) in ``era``: the figures with a route, and (name, why) for the rest
    (unknown names, tests with no route, a second name for a route already taken)."""
    from fastmmio.kut import load_kut_table

    table = load_kut_table()
    if era not in table.eras:
        raise FastmmioError(f"unknown era {era!r}; eras: {', '.join(table.eras)}")
    figures: list[Figure] = []
    unused: list[tuple[str, str]] = []
    taken: dict[str, str] = {}
    for name, cycles in named.items():
        entry = table.lookup(name, era)
        if entry is None:
            unused.append((name, "not a kvm-unit-tests test of fastmmio's name table"))
        elif entry.route is None:
            unused.append((name, entry.why))
        elif entry.route in taken:
            unused.append((name, f"measures route {entry.route}, as {taken[entry.route]} does"))
        else:
            taken[entry.route] = name
            figures.append(Figure(name, entry.route, float(cycles), source))
    return tuple(figures), tuple(unused)


def anchor_figures(name: str) -> tuple[Figure, ...]:
    """The figures of the bundled anchor set ``name`` (``data/anchors``), each mapped to its
    route through the kvm-unit-tests name table in the anchor's era (names with no route are
    left out: :func:`map_figures` says why)."""
    from fastmmio.kut import load_anchor

    anchor = load_anchor(name)
    figures, _unused = map_figures(anchor.figures, anchor.era, anchor.cite())
    return figures


PCI_TESTDEV_2013 = Calibration(
    profile="pci-testdev-2013",
    variant="upstream-2013",
    # wildcard MMIO was a length-1 ioeventfd in 2013 (the name table's era pci-testdev-2013)
    figures=anchor_figures("pci-testdev-2013"),
    note="the 2013 CPU is not named; caching taken at the SDM maximum (the six routes touch "
         "a handful of pages, so any real TLB holds them)",
)

CALIBRATIONS = {PCI_TESTDEV_2013.profile: PCI_TESTDEV_2013}
TOLERANCE = 0.10  # each figure must be reproduced within 10%


def events_source(cal: Calibration, iterations: int) -> str:
    return (f"fastmmio simulator (fastmmio.compare.calibration): variant {cal.variant}, "
            f"caches {cal.caches}, VPID {'on' if cal.vpid else 'off'}, bare metal, guest "
            f"CPL0, per notification over one steady-state batch of N={iterations} after a "
            f"warm-up batch, loop included as kvm-unit-tests counts it")


def simulated_events(comparison: Comparison, cal: Calibration = PCI_TESTDEV_2013
                     ) -> dict[str, dict[str, float]]:
    """Each figure's route simulated on ``cal``'s machine: route -> events per notification
    (a route whose checks fail is an error: it would not be the path the figure measured)."""
    out = {}
    for f in cal.figures:
        run = comparison.simulate(f.route, cal.options())
        if run.status != "ok":
            raise FastmmioError(f"calibration route {f.route} under {cal.variant}: "
                                f"{run.status}: {run.reason}")
        out[f.route] = dict(sorted(run.per_notification().items()))
    return out


@dataclass(frozen=True)
class CalibrationRow:
    kut: str
    route: str
    published: float
    simulated: float  # this run: the simulator's events at the profile's prices
    percent: float  # 100 * (simulated - published) / published
    recorded_fit: float | None  # what the profile's [fit] record says it fitted
    recorded_percent: float | None


def calibration_rows(comparison: Comparison, cal: Calibration | None = None
                     ) -> list[CalibrationRow] | None:
    """The published figures next to this run's simulated ones, for ``cal`` (default: the
    calibration of the comparison's profile; None when it has none)."""
    cal = cal or CALIBRATIONS.get(comparison.profile.name)
    if cal is None:
        return None
    recorded = {}
    if comparison.profile.fit is not None:
        recorded = {t.route: t for t in comparison.profile.fit.targets}
    rows = []
    for f in cal.figures:
        cell = comparison.cell(f.route, cal.options(), "calibration")
        rec = recorded.get(f.route)
        rows.append(CalibrationRow(
            f.kut, f.route, f.cycles, cell.cycles, 100.0 * (cell.cycles - f.cycles) / f.cycles,
            rec.fitted if rec else None, rec.percent if rec else None))
    return rows


def bundled_profile_path(name: str) -> Path:
    return Path(str(resources.files("fastmmio").joinpath(f"costs/profiles/{name}.toml")))


def refit_profile(profile: Profile | str | Path | None = None, *, write: bool = False,
                  cal: Calibration = PCI_TESTDEV_2013, iterations: int = 32) -> FitResult:
    """Redo the fit recorded in ``profile`` (default: the bundled one of ``cal``) with the
    simulator's event vectors; ``write`` rewrites the profile file."""
    if profile is None:
        profile = bundled_profile_path(cal.profile)
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    comparison = Comparison(prof, iterations=iterations)
    events = simulated_events(comparison, cal)
    return refit(prof, events, events_source=events_source(cal, iterations), write=write)


# ------------------------------------------------------------------------------------------
# fastmmio calibrate: a profile fitted to the user's own figures
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FigureSet:
    """Figures to calibrate against and the simulated machine they are compared with."""

    label: str  # what they are, for titles: "anchor set tr-reload-2017", "vmexit.log"
    source: str  # their citation
    calibration: Calibration
    unused: tuple[tuple[str, str], ...] = ()


def figure_set_from_anchor(name: str) -> FigureSet:
    from fastmmio.kut import load_anchor

    anchor = load_anchor(name)
    figures, unused = map_figures(anchor.figures, anchor.era, anchor.cite())
    cal = Calibration(profile="", variant=anchor.variant, figures=figures,
                      note=f"{anchor.description}; CPU {anchor.cpu}")
    return FigureSet(f"anchor set {anchor.name}", anchor.cite(), cal, unused)


@dataclass(frozen=True)
class Calibrated:
    """What :func:`calibrate` found: the fit, the rows of the residual table, and which
    prices were fitted, tied (not separable from fitted ones) or held."""

    fit: FitResult
    rows: tuple[CalibrationRow, ...]
    figures: FigureSet
    tied: dict[str, tuple[str, ...]]
    held: dict[str, str]

    @property
    def profile(self) -> Profile:
        return self.fit.profile


def calibrate(base: Profile, figures: FigureSet, fit: Sequence[str] | None = None, *,
              name: str = "calibrated", iterations: int = 32) -> Calibrated:
    """Fit ``base``'s prices to ``figures``: simulate each figure's route on the figure set's
    machine for its event vector, then non-negative least squares
    (:func:`fastmmio.costs.fit.fit_profile`, relative weighting). ``fit`` names the prices
    that may move (an under-determined choice is a :class:`~fastmmio.costs.fit.FitError`);
    without it, the largest set of prices the figures can separate
    (:func:`fastmmio.costs.fit.separable_prices`). Every other price keeps its value, basis
    and source from ``base``."""
    cal = figures.calibration
    if not cal.figures:
        raise FastmmioError(f"{figures.label}: no figure maps to a route: nothing to fit")
    comparison = Comparison(base, iterations=iterations)
    events = simulated_events(comparison, cal)
    targets = [Target(f.route, f.cycles, events[f.route], figures.source) for f in cal.figures]
    sep = separable_prices(base, targets, fit)
    free = list(fit) if fit is not None else list(sep.chosen)
    if not free:
        raise FastmmioError(f"{figures.label}: the figures use no price that a fit may move")
    kut_of = {f.route: f.kut for f in cal.figures}
    result = fit_profile(base, targets, free, events_source=events_source(cal, iterations),
                         notes="kvm-unit-tests names: " + ", ".join(
                             f"{f.route} = {f.kut}" for f in cal.figures))
    model_prices = dict(result.profile.prices)
    model = CostModel(base, nested=False)
    users: dict[str, list[str]] = {}
    for t in targets:
        for ev, count in t.events.items():
            res = model.resolve(ev)
            if count and not res.free:
                users.setdefault(res.key, [])
                if kut_of[t.route] not in users[res.key]:
                    users[res.key].append(kut_of[t.route])
    for k in free:
        p = model_prices[k]
        model_prices[k] = replace(p, source=(f"fitted by fastmmio calibrate to "
                                             f"{', '.join(users.get(k, []))} ({figures.source})"))
    held = dict(sep.held)
    tied = {k: v for k, v in sep.tied.items() if k not in free}
    for k in users:
        if k in free:
            continue
        p = model_prices[k]
        why = (f"not separable by these figures from {', '.join(tied[k]) or 'nothing fitted'}"
               if k in tied else held.get(k, "not in --fit"))
        held.setdefault(k, why)
        model_prices[k] = replace(p, note=(p.note + " | " if p.note else "")
                                  + f"held at {p.cycles:g} ({p.basis}) by fastmmio calibrate: {why}")
    notes = (f"Fitted by fastmmio calibrate to {figures.label} ({figures.source}) from base "
             f"profile {base.name}. Fitted: {', '.join(free)}. Held: "
             + "; ".join(f"{k} ({why})" for k, why in held.items()) + ".")
    prof = replace(result.profile, name=name, prices=model_prices, notes=notes,
                   description=f"fitted by fastmmio calibrate to {figures.label}",
                   cpu=cal.note or base.cpu)
    result = replace(result, profile=prof)
    rows = tuple(CalibrationRow(f.kut, f.route, f.cycles, r.fitted, r.percent, None, None)
                 for f, r in zip(cal.figures, result.residuals))
    return Calibrated(result, rows, figures, tied, held)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fastmmio.compare.calibration",
        description="Refit the pci-testdev-2013 profile with the simulator's event vectors.")
    ap.add_argument("--profile", help="profile .toml (default: the bundled pci-testdev-2013)")
    ap.add_argument("--write", action="store_true", help="rewrite the profile file")
    args = ap.parse_args(argv)
    try:
        result = refit_profile(args.profile, write=args.write)
    except FastmmioError as exc:
        print(f"fastmmio: {exc}", file=sys.stderr)
        return exc.exit_status
    print(result.table())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
