"""Prices as a vector (fastmmio.costs.linear) and the profile fields it reads: intervals,
dependencies, their validation; coefficient rows that re-price a stored event vector exactly;
the linear programme against the exact greedy answer; seeded sampling inside the intervals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmmio.cli import main
from fastmmio.costs import CostModel, load_profile
from fastmmio.costs.fit import dump_profile, fit_intervals
from fastmmio.costs.linear import (
    PriceSpace,
    break_even,
    cheapest_combination,
    reprice,
    sample_prices,
)
from fastmmio.costs.profile import parse_profile
from fastmmio.errors import ProfileError, UsageError

HEAD = """
[profile]
name = "t"
description = "test"
cpu = "none"
"""


def _price(key, cycles, basis="estimate", extra=""):
    return (f'\n[price."{key}"]\ncycles = {cycles}\ncomponent = "handler"\nbasis = "{basis}"\n'
            f'source = "estimate for the test"\n{extra}')


IV = 'low = 50\nhigh = 200\nwhy = "a kernel path of ~100-300 instructions"\n'


def test_interval_and_depends_are_read_and_written_back():
    text = HEAD + _price("a", 100, extra=IV) + _price(
        "b", 10, "derived", 'low = 5\nhigh = 20\nwhy = "from a"\ndepends = ["a"]\n')
    prof = parse_profile(text)
    assert prof.prices["a"].interval == (50, 200)
    assert prof.prices["a"].why == "a kernel path of ~100-300 instructions"
    assert prof.prices["b"].depends == ("a",)
    again = parse_profile(dump_profile(prof))
    assert again.prices == prof.prices


@pytest.mark.parametrize("extra, message", [
    ('low = 150\nhigh = 200\nwhy = "x y"\n', "does not contain cycles 100"),
    ('low = 50\nhigh = 90\nwhy = "x y"\n', "does not contain cycles 100"),
    ('low = 50\nwhy = "x y"\n', "an interval needs both low and high"),
    ('high = 150\nwhy = "x y"\n', "an interval needs both low and high"),
    ('low = 50\nhigh = 150\n', "say what sizes the interval"),
    ('why = "x y"\n', "given without an interval"),
    ('low = -1\nhigh = 150\nwhy = "x y"\n', "must not be negative"),
    ('low = 50\nhigh = inf\nwhy = "x y"\n', "must be finite"),
    ('depends = ["nope"]\n', "'nope' is not a key of [price]"),
    ('depends = "a"\n', "must be a list of price keys"),
    ('depends = ["a"]\n', "dependency cycle: a -> a"),
])
def test_bad_intervals_and_dependencies_are_refused(extra, message):
    with pytest.raises(ProfileError, match=".*" + __import__("re").escape(message)):
        parse_profile(HEAD + _price("a", 100, extra=extra))


def test_a_dependency_cycle_through_several_prices_is_refused():
    text = (HEAD + _price("a", 1, extra='depends = ["b"]\n') + _price("b", 1, extra='depends = '
            '["c"]\n') + _price("c", 1, extra='depends = ["a"]\n'))
    with pytest.raises(ProfileError, match="dependency cycle: (a -> b -> c -> a|b -> c -> a -> b"
                                           "|c -> a -> b -> c)"):
        parse_profile(text)


def test_bad_profile_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(HEAD + _price("exit", 100, extra='depends = ["nope"]\n'))
    code = main(["compare", "--profile", str(bad), "--no-kvm", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'nope' is not a key of [price]" in err[0]


def test_estimate_roots_follow_depends_transitively():
    text = (HEAD + _price("est", 1) + _price("meas", 1, "measured")
            + _price("d1", 1, "derived", 'depends = ["est", "meas"]\n')
            + _price("d2", 1, "derived", 'depends = ["d1"]\n')
            + _price("d3", 1, "derived", 'depends = ["meas"]\n'))
    prof = parse_profile(text)
    assert prof.estimate_roots("d2") == ("est",)
    assert prof.estimate_roots("d3") == ()
    assert prof.estimate_roots("est") == ("est",)


@pytest.mark.parametrize("name", ["skylake-sp", "pci-testdev-2013"])
def test_bundled_profiles_give_every_unmeasured_price_an_interval(name):
    """Issue 9: every estimate gets an interval and says why; fitted ones carry their fit's;
    derived ones name what they were derived from when that was an estimate."""
    prof = load_profile(name)
    prices = list(prof.prices.values()) + list(prof.nested.prices.values() if prof.nested
                                               else [])
    for p in prices:
        if p.basis != "measured":
            assert p.interval is not None and p.why, (name, p.key)
        if p.basis == "fitted":
            assert "residuals" in p.why, p.key
    if name == "skylake-sp":
        for key in ("exit", "kvm.handler.io", "kvm.handler.vmcall"):
            assert prof.estimate_roots(key), key  # derived, but subtracting estimates


def test_fit_interval_is_two_standard_errors_from_the_residuals():
    """y = 2x exactly plus +-1 residuals: s^2 = RSS/(m - n); se = sqrt(s^2 / sum(x^2))."""
    A = np.array([[1.0], [2.0], [3.0], [4.0]])
    b = np.array([3.0, 3.0, 7.0, 7.0])  # 2x + (+1, -1, +1, -1)
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    se, dof = fit_intervals(A, b, x, 1)
    r = A @ x - b
    assert dof == 3
    assert se[0] == pytest.approx(np.sqrt((r @ r) / 3 / 30.0))
    assert fit_intervals(A[:1], b[:1], x, 1) is None  # exactly determined: nothing to say


SCALED = HEAD + _price("exit", 1000, "measured") + _price("h", 100, extra=IV) + """
[free."vmentry"]
reason = "test"

[nested]
description = "test nested"
source = "the test's own figure"
scale = { handler = 2.0 }

[nested.price."exit"]
cycles = 5000
component = "exit"
basis = "derived"
source = "derived for the test"
"""


@pytest.mark.parametrize("nested", [False, True])
def test_coefficients_reprice_exactly(nested):
    prof = parse_profile(SCALED)
    model = CostModel(prof, nested=nested)
    events = {"exit.X": 8, "h.sub": 12, "vmentry": 8}
    pricing = model.price(events, 4)
    coef = model.coefficients(events, 4)
    space = PriceSpace.of(prof)
    row = space.vector(coef)
    assert float(row @ space.nominal) == pytest.approx(pricing.cycles)
    assert coef == ({"nested:exit": 2.0, "h": 6.0} if nested else {"exit": 2.0, "h": 3.0})


def _greedy(space, c, m0):
    """Fractional knapsack: spend the cheapest margin per unit of move first. (Margins are
    cycles: the generated ones are 0 or at least 0.01 away from it, well above the LP's
    feasibility tolerance.)"""
    s = 1.0 if m0 >= 0 else -1.0
    need = abs(m0)
    if need == 0:
        return 0.0  # already on the boundary
    options = []
    for i in np.flatnonzero(space.uncertain):
        gain = -s * c[i]  # margin removed per cycle moved up
        if gain > 0:
            room, per = space.high[i] - space.nominal[i], gain
        else:
            room, per = space.nominal[i] - space.low[i], -gain
        if room <= 0 or per == 0:
            continue
        options.append((1.0 / (room * per), room * per))  # effort per margin, margin
    effort = 0.0
    for cost, margin in sorted(options):
        take = min(margin, need)
        effort += take * cost
        need -= take
        if need <= 1e-9:
            return effort
    return None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(1, 1000), st.floats(0.1, 3), st.floats(0.1, 3),
                          st.one_of(st.just(0.0), st.floats(0.01, 3), st.floats(-3, -0.01))),
                min_size=1, max_size=6),
       st.one_of(st.just(0.0), st.floats(0.01, 500), st.floats(-500, -0.01)))
def test_linear_programme_matches_the_exact_greedy_answer(prices, offset):
    text = HEAD
    coefs = []
    for i, (p, down, up, c) in enumerate(prices):
        text += _price(f"p{i}", p, extra=f'low = {p / (1 + down)}\nhigh = {p * (1 + up)}\n'
                                          'why = "test"\n')
        coefs.append(c)
    space = PriceSpace.of(parse_profile(text))
    c = np.array(coefs)
    m0 = float(c @ space.nominal) + offset
    form_nominal = m0  # L(p) = c.p + offset: fold the offset into the margin
    comb = cheapest_combination(space, c, form_nominal)
    want = _greedy(space, c, form_nominal)
    if want is None:
        assert not comb.feasible
    else:
        assert comb.feasible and comb.effort == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_single_flip_values_and_directions():
    prof = parse_profile(HEAD + _price("a", 100, extra=IV) + _price("b", 100, extra=IV))
    space = PriceSpace.of(prof)
    be = break_even(space, np.array([1.0, -1.5]))  # 100 - 150 = -50: does not hold
    assert not be.holds and be.margin == pytest.approx(-50)
    by = {s.price: s for s in be.singles}
    assert by["a"].value == pytest.approx(150) and by["a"].direction == "above"
    assert by["a"].within
    assert by["b"].value == pytest.approx(100 - 50 / 1.5) and by["b"].direction == "below"


def test_sampling_is_seeded_and_stays_inside_the_intervals():
    prof = parse_profile(HEAD + _price("a", 100, extra=IV) + _price("fixed", 7, "measured"))
    space = PriceSpace.of(prof)
    for method in ("uniform", "log-uniform"):
        x = sample_prices(space, 5000, 3, method)
        assert np.array_equal(x, sample_prices(space, 5000, 3, method))
        assert (x[:, 0] >= 50).all() and (x[:, 0] <= 200).all()
        assert (x[:, 1] == 7).all()
    lu = sample_prices(space, 20000, 3, "log-uniform")[:, 0]
    assert np.median(lu) == pytest.approx(100, rel=0.05)  # sqrt(50 x 200)
    un = sample_prices(space, 20000, 3, "uniform")[:, 0]
    assert np.median(un) == pytest.approx(125, rel=0.05)
    with pytest.raises(UsageError):
        sample_prices(space, 10, 0, "normal")
    rows = np.array([[2.0, 1.0], [0.0, 3.0]])
    assert np.allclose(reprice(rows, x[:3]), rows @ x[:3].T)
