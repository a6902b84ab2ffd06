"""Fitting profile prices to figures (fastmmio.costs.fit): the NNLS solver (Lawson and Hanson
1974, ch. 23), recovery of known prices from synthetic event vectors, under-determined fits,
regularization, writing and re-reading profiles, refit and the command line."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from fastmmio.costs import CostModel, load_profile, parse_profile
from fastmmio.costs.fit import (
    FitError,
    Target,
    dump_profile,
    fit_profile,
    main,
    nnls,
    refit,
    write_profile,
)
from fastmmio.costs.profile import _bundled_dir
from fastmmio.errors import UsageError

# ------------------------------------------------------------------------------------------
# the solver
# ------------------------------------------------------------------------------------------


def kkt_ok(A, b, x, tol=1e-6):
    """Karush-Kuhn-Tucker conditions of min ||Ax-b||, x >= 0: x >= 0, gradient w = A^T(b-Ax)
    <= 0 where x = 0 and = 0 where x > 0."""
    w = A.T @ (b - A @ x)
    scale = max(1.0, np.abs(A.T @ b).max())
    return (x >= -tol).all() and (w[x <= tol] <= tol * scale).all() and \
        np.allclose(w[x > tol], 0, atol=tol * scale)


@pytest.mark.parametrize("seed", range(25))
def test_nnls_satisfies_kkt_on_random_problems(seed):
    rng = np.random.default_rng(seed)
    m, n = rng.integers(1, 9), rng.integers(1, 7)
    A = rng.normal(size=(m, n))
    b = rng.normal(size=m) * 10
    x = nnls(A, b)
    assert kkt_ok(A, b, x)


def test_nnls_equals_lstsq_when_unconstrained_solution_is_positive():
    rng = np.random.default_rng(7)
    A = rng.uniform(0, 3, size=(12, 5))
    x_true = np.array([5.0, 1.0, 300.0, 42.0, 0.5])
    b = A @ x_true
    assert np.allclose(nnls(A, b), x_true)


def test_nnls_clamps_at_zero():
    A = np.eye(3)
    b = np.array([1.0, -2.0, 3.0])
    assert np.allclose(nnls(A, b), [1.0, 0.0, 3.0])


# ------------------------------------------------------------------------------------------
# fitting a profile
# ------------------------------------------------------------------------------------------

BASE = """
[profile]
name = "synthetic"
description = "synthetic prices for fit tests"
cpu = "none"

[price."exit"]
cycles = 500
component = "exit"
basis = "estimate"
source = "estimate: starting value"

[price."kvm.user_exit"]
cycles = 1000
component = "userspace"
basis = "estimate"
source = "estimate: starting value"

[price."kvm.eventfd.signal"]
cycles = 100
component = "eventfd"
basis = "estimate"
source = "estimate: starting value"

[price."kvm.emulate"]
cycles = 600
component = "emulation"
basis = "estimate"
source = "estimate: starting value"

[price."kvm.bus.lookup"]
cycles = 40
component = "bus"
basis = "estimate"
source = "estimate: fixed in the fit"

[price."kvm.bus.probe"]
cycles = 10
component = "bus"
basis = "estimate"
source = "estimate: fixed in the fit"

[price."guest.insn"]
cycles = 0.5
component = "guest"
basis = "estimate"
source = "estimate: fixed in the fit"

[free."vmentry"]
reason = "in the exit round trip"
"""

TRUE = {"exit": 1234.0, "kvm.user_exit": 3700.0, "kvm.eventfd.signal": 180.0,
        "kvm.emulate": 1500.0}
FREE = list(TRUE)


def synthetic_routes():
    """Route event vectors (per notification) in the shapes the simulator reports."""
    return {
        "pio-user": {"exit.IO_INSTRUCTION": 1, "vmentry": 1, "kvm.bus.lookup.KVM_PIO_BUS": 1,
                     "kvm.bus.probe": 3, "kvm.user_exit.io": 1, "guest.insn": 3},
        "pio-eventfd": {"exit.IO_INSTRUCTION": 1, "vmentry": 1, "kvm.bus.lookup.KVM_PIO_BUS": 1,
                        "kvm.bus.probe": 5, "kvm.eventfd.signal": 1, "guest.insn": 3},
        "mmio-user": {"exit.EPT_MISCONFIG": 1, "vmentry": 1, "kvm.emulate": 1,
                      "kvm.bus.lookup.KVM_MMIO_BUS": 1, "kvm.bus.probe": 4,
                      "kvm.user_exit.mmio": 1, "guest.insn": 3},
        "mmio-eventfd": {"exit.EPT_MISCONFIG": 1, "vmentry": 1, "kvm.emulate": 1,
                         "kvm.bus.lookup.KVM_MMIO_BUS": 1, "kvm.bus.probe": 6,
                         "kvm.eventfd.signal": 1, "guest.insn": 3},
        "double-exit": {"exit.EPT_VIOLATION": 2, "vmentry": 2, "kvm.emulate": 1,
                        "kvm.eventfd.signal": 1, "guest.insn": 3},
    }


def true_profile():
    prof = parse_profile(BASE, "synthetic.toml")
    text = BASE
    for k, v in TRUE.items():
        text = text.replace(f'[price."{k}"]\ncycles = {int(prof.prices[k].cycles)}',
                            f'[price."{k}"]\ncycles = {v}')
    truth = parse_profile(text, "truth.toml")
    assert all(truth.prices[k].cycles == v for k, v in TRUE.items())
    return truth


def targets_from(profile, routes, noise=None):
    m = CostModel(profile)
    out = []
    for i, (r, evs) in enumerate(routes.items()):
        c = m.cost(evs).cycles
        if noise is not None:
            c *= 1 + noise[i]
        out.append(Target(r, c, evs, source="synthetic"))
    return out


def test_fit_recovers_known_prices_exactly():
    targets = targets_from(true_profile(), synthetic_routes())
    result = fit_profile(parse_profile(BASE, "synthetic.toml"), targets, FREE)
    for k, v in TRUE.items():
        assert result.parameters[k] == pytest.approx(v, abs=0.01), k
    assert result.max_abs_percent < 1e-3
    assert result.rank == len(FREE)


@pytest.mark.parametrize("weighting", ["relative", "absolute"])
def test_fit_recovers_prices_from_noisy_figures(weighting):
    rng = np.random.default_rng(3)
    routes = synthetic_routes()
    noise = rng.normal(0, 0.003, size=len(routes))
    targets = targets_from(true_profile(), routes, noise)
    result = fit_profile(parse_profile(BASE, "synthetic.toml"), targets, FREE,
                         weighting=weighting)
    for k, v in TRUE.items():
        assert result.parameters[k] == pytest.approx(v, rel=0.15), k
    assert result.max_abs_percent < 1.0


def test_fitted_profile_records_what_was_fitted_and_reprices_consistently():
    targets = targets_from(true_profile(), synthetic_routes())
    result = fit_profile(parse_profile(BASE, "synthetic.toml"), targets, FREE,
                         events_source="synthetic vectors")
    prof = result.profile
    for k in FREE:
        assert prof.prices[k].basis == "fitted"
        assert prof.prices[k].prior == parse_profile(BASE, "x").prices[k].cycles
        assert "fitted" in prof.prices[k].source
    assert prof.fit.free == tuple(FREE)
    assert prof.fit.events_source == "synthetic vectors"
    m = CostModel(prof)
    for t, r in zip(prof.fit.targets, result.residuals):
        assert math.isclose(m.cost(t.events).cycles, r.fitted, abs_tol=1e-6)
        assert math.isclose(r.residual, r.fitted - r.target, abs_tol=1e-9)


def test_underdetermined_fit_names_the_inseparable_prices():
    """Every route has exactly one exit here, and the user exit always comes with the same
    bus events: exit and kvm.bus.lookup always occur together, so cannot be told apart."""
    routes = {k: v for k, v in synthetic_routes().items() if k != "double-exit"}
    targets = targets_from(true_profile(), routes)
    with pytest.raises(FitError) as e:
        fit_profile(parse_profile(BASE, "s.toml"), targets, FREE + ["kvm.bus.lookup"])
    msg = str(e.value)
    assert "under-determined" in msg and "exit" in msg and "kvm.bus.lookup" in msg


def test_fewer_routes_than_prices_is_underdetermined():
    targets = targets_from(true_profile(), dict(list(synthetic_routes().items())[:2]))
    with pytest.raises(FitError, match="rank 2"):
        fit_profile(parse_profile(BASE, "s.toml"), targets, FREE)


def test_price_used_by_no_route_is_named():
    routes = {k: v for k, v in synthetic_routes().items() if "emulate" not in str(v)}
    targets = targets_from(true_profile(), routes)
    with pytest.raises(FitError, match="no target's events use kvm.emulate"):
        fit_profile(parse_profile(BASE, "s.toml"), targets, FREE)


def test_regularization_makes_underdetermined_fit_well_posed():
    routes = {k: v for k, v in synthetic_routes().items() if k != "double-exit"}
    targets = targets_from(true_profile(), routes)
    base = parse_profile(BASE, "s.toml")
    result = fit_profile(base, targets, FREE + ["kvm.bus.lookup"], regularization=1e-4)
    assert result.max_abs_percent < 0.5
    # what the data do fix is kept: the emulator's cost (mmio minus pio routes) and the sums
    # exit + look-up + user exit, exit + look-up + signal; the split within them follows the
    # priors
    p = result.parameters
    assert p["kvm.emulate"] == pytest.approx(TRUE["kvm.emulate"], rel=0.01)
    assert p["exit"] + p["kvm.bus.lookup"] + p["kvm.user_exit"] == pytest.approx(
        TRUE["exit"] + 40 + TRUE["kvm.user_exit"], rel=0.005)
    assert p["exit"] + p["kvm.bus.lookup"] + p["kvm.eventfd.signal"] == pytest.approx(
        TRUE["exit"] + 40 + TRUE["kvm.eventfd.signal"], rel=0.01)
    assert all(v >= 0 for v in result.parameters.values())
    assert "regularization" in result.profile.fit.method


@pytest.mark.parametrize("free,match", [
    (["nope"], "not a \\[price\\] key"),
    (["exit", "exit"], "twice"),
    ([], "no free parameters"),
])
def test_bad_free_lists(free, match):
    targets = targets_from(true_profile(), synthetic_routes())
    with pytest.raises(FitError, match=match):
        fit_profile(parse_profile(BASE, "s.toml"), targets, free)


def test_bad_targets():
    base = parse_profile(BASE, "s.toml")
    with pytest.raises(FitError, match="no targets"):
        fit_profile(base, [], FREE)
    with pytest.raises(FitError, match="positive"):
        fit_profile(base, [Target("r", -3, {"exit.X": 1})], ["exit"])
    with pytest.raises(FitError, match="two targets"):
        fit_profile(base, [Target("r", 3, {"exit.X": 1}), Target("r", 4, {"exit.X": 1})],
                    ["exit"])
    with pytest.raises(FitError, match="exit.X"):
        fit_profile(base, [Target("r", 3, {"exit.X": -1})], ["exit"])
    assert issubclass(FitError, UsageError)


def test_unknown_event_in_a_target_is_an_error():
    from fastmmio.costs import UnpricedEventError

    with pytest.raises(UnpricedEventError, match="kvm.mystery"):
        fit_profile(parse_profile(BASE, "s.toml"), [Target("r", 10, {"kvm.mystery": 1})],
                    ["exit"])


# ------------------------------------------------------------------------------------------
# writing, refit, command line
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["skylake-sp", "pci-testdev-2013"])
def test_dump_reads_back_equal(name):
    prof = load_profile(name)
    again = parse_profile(dump_profile(prof), prof.origin)
    assert again == prof


def test_write_and_refit_are_idempotent(tmp_path):
    src = _bundled_dir().joinpath("pci-testdev-2013.toml")
    path = tmp_path / "p.toml"
    path.write_text(src.read_text())
    before = load_profile(path)
    result = refit(path, write=True)
    after = load_profile(path)
    assert after.prices == before.prices
    assert result.max_abs_percent < 1.1


def test_refit_with_new_event_vectors(tmp_path):
    path = tmp_path / "p.toml"
    shutil.copy(str(_bundled_dir().joinpath("pci-testdev-2013.toml")), path)
    prof = load_profile(path)
    vectors = {t.route: dict(t.events) for t in prof.fit.targets}
    for r in ("mmio-user", "mmio-eventfd-len1", "mmio-datamatch"):
        # e.g. the simulator counts one more software walk's entry reads
        vectors[r]["kvm.emulate.walk.ref"] = vectors[r]["kvm.emulate.walk.ref"] + 4
    result = refit(path, vectors, events_source="test vectors", write=True)
    after = load_profile(path)
    assert after.fit.events_source == "test vectors"
    # the extra walk references (4 x 40 cycles) come out of the emulator's fitted fixed cost
    assert result.parameters["kvm.emulate"] == pytest.approx(
        prof.prices["kvm.emulate"].cycles - 160, abs=0.02)
    with pytest.raises(FitError, match="no target"):
        refit(path, {"not-a-route": {}})


def test_refit_without_fit_table():
    with pytest.raises(FitError, match="no \\[fit\\] table"):
        refit(parse_profile(BASE, "s.toml"))


def test_command_line(tmp_path, capsys):
    path = tmp_path / "p.toml"
    shutil.copy(str(_bundled_dir().joinpath("pci-testdev-2013.toml")), path)
    text = path.read_text()
    assert main([str(path), "--dry-run"]) == 0
    assert "kvm.user_exit.mmio" in capsys.readouterr().out
    assert path.read_text() == text
    ev = tmp_path / "ev.json"
    ev.write_text(json.dumps({"pio-user": {"exit.IO_INSTRUCTION": 1, "kvm.user_exit.io": 1}}))
    assert main([str(path), "--events", str(ev), "--events-source", "hand"]) == 0
    assert load_profile(path).fit.events_source == "hand"
    ev.write_text("{not json")
    assert main([str(path), "--events", str(ev)]) == 2
    assert "cannot read event vectors" in capsys.readouterr().err


def test_write_profile_refuses_unwritable_path(tmp_path):
    with pytest.raises(UsageError, match="cannot write profile"):
        write_profile(load_profile("skylake-sp"), tmp_path / "no" / "dir" / "p.toml")
