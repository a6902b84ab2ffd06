"""Calibration: the simulator and a cost profile held against published cycle figures.

The only published per-route figures for the doorbell routes are the six kvm-unit-tests
pci-testdev numbers of QEMU commit 22773d60 (2013, FACTS.md section 5), taken on KVM before
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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

from fastmmio.compare.core import Comparison, sim_options
from fastmmio.costs.fit import FitResult, refit
from fastmmio.costs.profile import Profile, load_profile
from fastmmio.errors import FastmmioError

SOURCE_22773D60 = ("QEMU commit 22773d60 'pci: add pci test device' (Michael S. Tsirkin, "
                   "2013), commit message: kvm-unit-tests pci figures in cycles "
                   "(FACTS.md section 5)")


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


PCI_TESTDEV_2013 = Calibration(
    profile="pci-testdev-2013",
    variant="upstream-2013",
    figures=(
        Figure("portio-no-eventfd:pci-io", "pio-user", 5287),
        Figure("portio-wildcard-eventfd:pci-io", "pio-eventfd-len1", 1762),
        Figure("portio-datamatch-eventfd:pci-io", "pio-datamatch", 1777),
        Figure("mmio-no-eventfd:pci-mem", "mmio-user", 8796),
        # wildcard MMIO was a length-1 ioeventfd in 2013 (length 0 came with f848a5a8)
        Figure("mmio-wildcard-eventfd:pci-mem", "mmio-eventfd-len1", 3609),
        Figure("mmio-datamatch-eventfd:pci-mem", "mmio-datamatch", 3685),
    ),
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
