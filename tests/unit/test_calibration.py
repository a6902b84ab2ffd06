"""Calibration: the simulated upstream-2013 routes, priced with profile pci-testdev-2013, give
each kvm-unit-tests pci-testdev figure of QEMU commit 22773d60 (commit message) within
10%; the profile's fit was made with the simulator's own event vectors."""

from __future__ import annotations

import pytest

from fastmmio.cli import main
from fastmmio.compare.calibration import (
    PCI_TESTDEV_2013,
    TOLERANCE,
    bundled_profile_path,
    calibration_rows,
    refit_profile,
)
from fastmmio.compare.core import Comparison
from fastmmio.costs import load_profile

FIT_FREE = ["exit", "kvm.user_exit.io", "kvm.user_exit.mmio", "kvm.emulate"]


@pytest.fixture(scope="module")
def rows():
    return calibration_rows(Comparison("pci-testdev-2013"))


def test_the_six_published_figures_are_the_facts_table():
    """QEMU 22773d60 commit message: the six kvm-unit-tests figures and the routes that
    make the same access (wildcard MMIO was a length-1 ioeventfd in 2013)."""
    got = {f.kut: (f.route, f.cycles) for f in PCI_TESTDEV_2013.figures}
    assert got == {
        "portio-no-eventfd:pci-io": ("pio-user", 5287),
        "portio-wildcard-eventfd:pci-io": ("pio-eventfd-len1", 1762),
        "portio-datamatch-eventfd:pci-io": ("pio-datamatch", 1777),
        "mmio-no-eventfd:pci-mem": ("mmio-user", 8796),
        "mmio-wildcard-eventfd:pci-mem": ("mmio-eventfd-len1", 3609),
        "mmio-datamatch-eventfd:pci-mem": ("mmio-datamatch", 3685),
    }
    assert PCI_TESTDEV_2013.variant == "upstream-2013"


def test_simulated_upstream_2013_reproduces_each_pci_testdev_figure_within_10_percent(rows):
    assert rows is not None and len(rows) == 6
    for r in rows:
        assert abs(r.percent) <= 100 * TOLERANCE, (
            f"{r.kut} ({r.route}): simulated {r.simulated:.0f} vs published {r.published:.0f} "
            f"({r.percent:+.1f}%); refit with python -m fastmmio.compare.calibration --write")


def test_the_calibration_check_can_fail():
    """The same figures priced with another CPU's profile (skylake-sp) miss by more than 10%:
    the check above is not satisfied by any profile."""
    rows = calibration_rows(Comparison("skylake-sp"), PCI_TESTDEV_2013)
    assert max(abs(r.percent) for r in rows) > 100 * TOLERANCE


def test_the_profile_fit_was_made_with_the_simulators_event_vectors():
    """Refitting now, from the simulator's vectors, gives the prices the profile holds (if the
    models changed, refit: python -m fastmmio.compare.calibration --write)."""
    prof = load_profile(bundled_profile_path("pci-testdev-2013"))
    assert prof.fit is not None and "simulator" in prof.fit.events_source
    result = refit_profile(prof, write=False)
    for key, value in result.parameters.items():
        assert value == pytest.approx(prof.prices[key].cycles, abs=0.01), key
    assert result.max_abs_percent <= 100 * TOLERANCE


def test_fitted_parameters_are_the_four_round_trips_and_the_emulator():
    prof = load_profile("pci-testdev-2013")
    assert list(prof.fit.free) == FIT_FREE
    fitted = sorted(k for k, p in prof.prices.items() if p.basis == "fitted")
    assert fitted == sorted(FIT_FREE)
    for t in prof.fit.targets:  # residuals recorded in the file, within the 10%
        assert t.percent is not None and abs(t.percent) <= 100 * TOLERANCE


def test_compare_with_the_2013_profile_prints_the_calibration(tmp_path, capsys):
    code = main(["compare", "pio-user", "--profile", "pci-testdev-2013", "--variants",
                 "upstream-2013", "--no-kvm", "--no-verdict", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "Calibration: profile pci-testdev-2013" in out
    for f in PCI_TESTDEV_2013.figures:
        assert f.kut in out
    assert "fitted prices: exit, kvm.user_exit.io, kvm.user_exit.mmio, kvm.emulate" in out
