"""Prices as a vector: break-even points and sampled price sets, from stored event vectors.

A pricing is linear in the prices: a cell's cycles are ``sum(coef[id] * cycles[id])`` over the
profile's prices, with ``coef`` the per-notification count of each price
(:meth:`~fastmmio.costs.model.CostModel.coefficients`, nested scale included). Any statement
the verdict makes about cycles ("within 5% of port I/O", "A is cheaper than B") is therefore
the sign of one linear form ``L(p) = c . p`` of the price vector ``p``, and the questions of
issue 9 need no re-simulation:

* :func:`break_even`: the single price values at which ``L`` changes sign (each price alone,
  the others at their values), and the *cheapest combination*: a linear programme
  (:func:`scipy.optimize.linprog`, HiGHS) over the prices' intervals that minimises the total
  move, each price's move counted as the fraction of the way from its value to the end of its
  interval in that direction (so moving one price to its bound costs 1). The constraint set is
  a box and one half-space, so the optimum is also the greedy "cheapest margin per unit of
  move first" order of a fractional knapsack; the LP is used because it states the problem as
  it is and stays right when constraints are added (a test checks it against the greedy
  answer). Infeasible means: no price set inside the intervals flips it.
* :func:`sample_prices` / :func:`reprice`: ``N`` price vectors drawn inside the intervals
  (uniform, or log-uniform where ``low > 0``; seeded), and every cell re-priced at once as one
  ``cells x prices`` by ``prices x N`` matrix product.

Which prices move: every price with an interval (``low < high``) in the profile
(:mod:`fastmmio.costs.profile`); the others stay at their values. A derived price moves
within its own stated interval, independently of the prices it was derived from (its
``depends``): a wider, more cautious set than the derivation allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from fastmmio.costs.profile import Profile
from fastmmio.errors import UsageError

SAMPLING = ("uniform", "log-uniform")
LP_METHOD = ("linear programme (scipy.optimize.linprog, HiGHS) over the price intervals: "
             "least total move, each price's move as a fraction of the way to its bound")


@dataclass(frozen=True)
class PriceSpace:
    """The prices of a profile as vectors, in a fixed order (``ids``)."""

    profile: Profile
    ids: tuple[str, ...]
    nominal: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @classmethod
    def of(cls, profile: Profile) -> "PriceSpace":
        ids = list(profile.prices)
        if profile.nested is not None:
            ids += [f"nested:{k}" for k in profile.nested.prices]
        nom, lo, hi = [], [], []
        for pid in ids:
            p = profile.price_entry(pid)
            nom.append(p.cycles)
            iv = p.interval or (p.cycles, p.cycles)
            lo.append(iv[0])
            hi.append(iv[1])
        return cls(profile, tuple(ids), np.array(nom, float), np.array(lo, float),
                   np.array(hi, float))

    @property
    def index(self) -> dict[str, int]:
        return {pid: i for i, pid in enumerate(self.ids)}

    @property
    def uncertain(self) -> np.ndarray:
        """Mask of the prices that move (an interval wider than a point)."""
        return self.high > self.low

    def vector(self, coef: Mapping[str, float]) -> np.ndarray:
        """A coefficient mapping (price id -> count) as a row in this order."""
        row = np.zeros(len(self.ids))
        idx = self.index
        for pid, c in coef.items():
            row[idx[pid]] += c
        return row


# ------------------------------------------------------------------------------------------
# break-even
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SingleFlip:
    """One price alone: the value at which the statement flips (``direction`` ``above`` or
    ``below`` it), and whether that value lies inside the price's interval."""

    price: str
    basis: str
    nominal: float
    low: float
    high: float
    value: float | None  # None: the statement does not depend on this price
    direction: str
    within: bool

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Combination:
    """The cheapest combined move that flips the statement (None moves: none can)."""

    feasible: bool
    effort: float  # sum of the moves as fractions of the way to the bounds
    moves: dict[str, tuple[float, float]] = field(default_factory=dict)  # id -> (from, to)
    method: str = LP_METHOD

    def to_json(self) -> dict:
        return {"feasible": self.feasible, "effort": self.effort, "method": self.method,
                "moves": {k: {"from": a, "to": b} for k, (a, b) in self.moves.items()}}


@dataclass(frozen=True)
class BreakEven:
    """How far the prices must move to flip the sign of ``L(p)`` (``holds`` = ``L >= 0`` at
    the profile's prices)."""

    margin: float  # L at the profile's prices, cycles
    holds: bool
    singles: tuple[SingleFlip, ...]  # every price L depends on, nearest flip first
    combination: Combination

    def flips_within(self) -> list[SingleFlip]:
        return [s for s in self.singles if s.within]

    def to_json(self) -> dict:
        return {"margin": self.margin, "holds": self.holds,
                "singles": [s.to_json() for s in self.singles],
                "combination": self.combination.to_json()}


def _fraction_weights(space: PriceSpace) -> tuple[np.ndarray, np.ndarray]:
    up = space.high - space.nominal
    down = space.nominal - space.low
    return (np.where(up > 0, 1.0 / np.where(up > 0, up, 1.0), 1.0),
            np.where(down > 0, 1.0 / np.where(down > 0, down, 1.0), 1.0))


def _single_flips(space: PriceSpace, c: np.ndarray, m0: float) -> list[SingleFlip]:
    out = []
    for i in np.flatnonzero(c):
        pid = space.ids[i]
        p0, ci = float(space.nominal[i]), float(c[i])
        x = p0 - m0 / ci
        holds = m0 >= 0
        # L decreases when the price moves against the sign of c: that direction breaks a
        # statement that holds, and the other one makes a failing one hold.
        direction = ("below" if ci > 0 else "above") if holds else \
                    ("above" if ci > 0 else "below")
        lo, hi = float(space.low[i]), float(space.high[i])
        within = bool(space.uncertain[i]) and lo <= x <= hi and x >= 0
        out.append(SingleFlip(pid, space.profile.price_entry(pid).basis, p0, lo, hi, x,
                              direction, within))
    out.sort(key=lambda s: (not s.within, abs((s.value or 0) - s.nominal)
                            / max(s.high - s.low, 1e-9)))
    return out


def cheapest_combination(space: PriceSpace, c: np.ndarray, m0: float) -> Combination:
    """The least total move (fractions of the intervals) of the uncertain prices that makes
    ``L`` change sign: a linear programme (see the module docstring)."""
    from scipy.optimize import linprog

    s = 1.0 if m0 >= 0 else -1.0
    wu, wd = _fraction_weights(space)
    unc = space.uncertain
    ub_up = np.where(unc, space.high - space.nominal, 0.0)
    ub_down = np.where(unc, space.nominal - space.low, 0.0)
    n = len(space.ids)
    cost = np.concatenate([wu, wd])
    # s * (m0 + c.(u - d)) <= 0  <=>  s c.u - s c.d <= -s m0
    a = np.concatenate([s * c, -s * c])[None, :]
    bounds = [(0.0, float(b)) for b in ub_up] + [(0.0, float(b)) for b in ub_down]
    res = linprog(cost, A_ub=a, b_ub=[-s * m0], bounds=bounds, method="highs")
    if res.status == 2 or not res.success:  # 2: infeasible
        return Combination(False, float("inf"))
    u, d = res.x[:n], res.x[n:]
    moves = {}
    for i in np.flatnonzero((u - d) != 0):
        delta = float(u[i] - d[i])
        if abs(delta) > 1e-9:
            moves[space.ids[i]] = (float(space.nominal[i]), float(space.nominal[i] + delta))
    return Combination(True, float(res.fun), moves)


def break_even(space: PriceSpace, form: np.ndarray) -> BreakEven:
    """Break-even of the statement ``form . p >= 0`` (``form`` a row over ``space.ids``)."""
    c = np.asarray(form, float)
    m0 = float(c @ space.nominal)
    return BreakEven(m0, m0 >= 0, tuple(_single_flips(space, c, m0)),
                     cheapest_combination(space, c, m0))


# ------------------------------------------------------------------------------------------
# sampled price sets
# ------------------------------------------------------------------------------------------


def sample_prices(space: PriceSpace, n: int, seed: int = 0, method: str = "uniform"
                  ) -> np.ndarray:
    """``n`` price vectors (``n x len(ids)``): each uncertain price drawn independently inside
    its interval (``uniform``, or ``log-uniform``: uniform in log where ``low > 0``, uniform
    otherwise), the others at their values. Seeded: the same seed gives the same sets."""
    if method not in SAMPLING:
        raise UsageError(f"unknown sampling {method!r}; choose from {', '.join(SAMPLING)}")
    if n < 1:
        raise UsageError(f"the number of samples must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    u = rng.random((n, len(space.ids)))
    lo, hi = space.low, space.high
    out = lo + u * (hi - lo)
    if method == "log-uniform":
        pos = (lo > 0) & (hi > lo)
        llo, lhi = np.log(np.where(pos, lo, 1.0)), np.log(np.where(pos, hi, 1.0))
        out = np.where(pos, np.exp(llo + u * (lhi - llo)), out)
    return np.where(space.uncertain, out, space.nominal)


def reprice(rows: np.ndarray, prices: np.ndarray) -> np.ndarray:
    """Every row (a cell's coefficients, ``cells x ids``) at every price vector (``n x ids``):
    ``cells x n`` cycles, one matrix product."""
    return np.asarray(rows, float) @ np.asarray(prices, float).T

