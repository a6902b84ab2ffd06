"""The judgement: every figure and yes/no the verdict states, computed once from the stored
cells, with one helper per rule.

* the ratio: :func:`fastmmio.compare.core.ratio`, always against the PIO ioeventfd cell of the
  *same* machine setting (:meth:`~fastmmio.compare.core.Comparison.pio_cell`);
* the tolerance: :func:`within` ("as fast as port I/O" means ``ratio <= 1 + tolerance``);
* the class of a doorbell under a setting: :func:`classify` (``as fast``, ``slower``,
  ``incorrect`` when its own checks fail there, ``n/a``);
* break-even: :func:`as_fast_form` / :func:`ordering_form` write each statement as a linear
  form of the price vector and :func:`fastmmio.costs.linear.break_even` answers it;
* uncertainty: :func:`uncertainty` re-prices every cell at sampled price vectors
  (:func:`fastmmio.costs.linear.reprice`) and applies the same :func:`within`.

The text (:mod:`.text`), the tables, results.json and results.csv (:mod:`fastmmio.report.compare`)
read a :class:`Judgement`; none of them recomputes a ratio or re-applies the tolerance.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

import numpy as np

from fastmmio.compare.core import (
    NA,
    OK,
    PIO_REFERENCE,
    Cell,
    Comparison,
    caches_name,
    ratio,
    sim_key,
)
from fastmmio.costs.linear import (
    BreakEven,
    PriceSpace,
    break_even,
    reprice,
    sample_prices,
)
from fastmmio.verdict.scenarios import BASE, Scenario, Subject

DEFAULT_TOLERANCE = 0.05  # "as fast": within 5% of the PIO ioeventfd route's cycles

AS_FAST, SLOWER, INCORRECT = "as fast", "slower", "incorrect"
CLASSES = (AS_FAST, SLOWER, INCORRECT, NA)


def limit(tolerance: float) -> float:
    """The largest ratio to PIO that is still "as fast": ``1 + tolerance``."""
    return 1 + tolerance


def within(r: float, tolerance: float) -> bool:
    """The tolerance rule, written once: a doorbell is as fast as port I/O when its cycles
    are at most :func:`limit` times the PIO ioeventfd's (the limit itself included)."""
    return r <= limit(tolerance)


def classify(status: str, r: float | None, tolerance: float) -> str:
    """A doorbell under one setting: ``incorrect`` when its own checks fail there (its cycles
    are not those of a working doorbell), ``n/a`` without a ratio, else by :func:`within`."""
    if status not in (OK, NA):
        return INCORRECT  # with a ratio (its checks fail) or without (its run fails)
    if r is None:
        return NA
    return AS_FAST if within(r, tolerance) else SLOWER


@dataclass(frozen=True)
class Point:
    """A subject under a scenario: the figures and the class the verdict states."""

    status: str
    cycles: float
    pio_cycles: float
    ratio: float | None
    judged: str  # one of CLASSES ("" for the PIO reference itself)
    exits: float
    walk_refs: float
    tlb_hits: float
    tlb_misses: float
    ept_entry: str | None
    reason: str = ""
    uncertainty: dict[str, float] | None = None

    @property
    def as_fast(self) -> bool | None:
        return None if self.judged in ("", NA) else self.judged == AS_FAST

    def to_json(self) -> dict[str, Any]:
        d = {k: (None if isinstance(v, float) and math.isnan(v) else v)
             for k, v in self.__dict__.items()}
        d["as_fast"] = self.as_fast
        return d


@dataclass(frozen=True)
class Statement:
    """A yes/no or an ordering the verdict states, with how far the estimated prices must
    move to change it. ``as-fast``: ``subject`` within the tolerance of PIO under
    ``scenario``; ``ordering``: ``subject`` costs no more than ``other``."""

    kind: str
    scenario: str
    subject: str
    other: str
    holds: bool
    value: float  # the ratio (as-fast) or other's cycles minus subject's (ordering)
    breakeven: BreakEven | None  # None: the statement does not depend on any price

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "scenario": self.scenario, "subject": self.subject,
                "other": self.other, "holds": self.holds, "value": self.value,
                "break_even": self.breakeven.to_json() if self.breakeven else None}


@dataclass
class Uncertainty:
    """Sampled price sets: per cell, the spread of its cycles and of its ratio to PIO."""

    samples: int
    seed: int
    method: str
    tolerance: float
    cells: dict[tuple, dict[str, float]] = field(default_factory=dict)  # sim_key -> stats
    seconds: float = 0.0

    def stats(self, cell: Cell) -> dict[str, float] | None:
        return self.cells.get(sim_key(cell.route, cell.run.options))

    def to_json(self, cells: Iterable[Cell] = ()) -> dict[str, Any]:
        rows = []
        for c in cells:
            st = self.stats(c)
            if st is not None:
                o = c.run.options
                rows.append({"route": c.route, "variant": o.variant,
                             "scenario": c.scenario, "caches": caches_name(o.caches),
                             "vpid": o.vpid, "nested": o.nested, **st})
        return {"samples": self.samples, "seed": self.seed, "method": self.method,
                "tolerance": self.tolerance, "seconds": round(self.seconds, 4), "cells": rows}


@dataclass
class Judgement:
    tolerance: float
    scenarios: tuple[Scenario, ...]
    subjects: list[Subject]
    cells: dict[tuple[str, str], Cell]  # (subject key, scenario key) -> the doorbell's cell
    pio_cells: dict[tuple[str, str], Cell]  # the PIO cell of the same setting
    points: dict[tuple[str, str], Point]
    statements: list[Statement]
    incorrect: list[str]  # variants incorrect for some guest access (labels' keys)
    uncertainty: Uncertainty | None = None

    def point(self, subject: str, scenario: str = BASE.key) -> Point:
        return self.points[(subject, scenario)]

    def judged(self, subject: str, scenario: str = BASE.key) -> str:
        return self.points[(subject, scenario)].judged

    def lists(self, scenario: str) -> dict[str, list[str]]:
        """Per class, the variants (subject keys) in it under ``scenario``."""
        out: dict[str, list[str]] = {c: [] for c in CLASSES}
        for s in self.subjects:
            if not s.is_pio:
                out[self.judged(s.key, scenario)].append(s.key)
        return out

    def statement(self, kind: str, scenario: str, subject: str, other: str = "pio"
                  ) -> Statement | None:
        for st in self.statements:
            if (st.kind, st.scenario, st.subject, st.other) == (kind, scenario, subject, other):
                return st
        return None

    def all_cells(self) -> list[Cell]:
        """Every cell the judgement read (doorbells and their PIO references), once."""
        out, seen = [], set()
        for c in list(self.cells.values()) + list(self.pio_cells.values()):
            k = sim_key(c.route, c.run.options)
            if k not in seen:
                seen.add(k)
                out.append(c)
        return out

    def bottom(self) -> dict[str, list[str]]:
        """The bottom line's groups (subject keys): as fast under every setting, as fast under
        the base setting only, slower already there; and the incorrect variants."""
        every, base_only, slow = [], [], []
        for s in self.subjects:
            if s.is_pio:
                continue
            classes = [self.judged(s.key, sc.key) for sc in self.scenarios]
            if classes[0] == AS_FAST and all(c == AS_FAST for c in classes):
                every.append(s.key)
            elif classes[0] == AS_FAST:
                base_only.append(s.key)
            elif classes[0] == SLOWER:
                slow.append(s.key)
        return {"fast_everywhere": every, "fast_base_only": base_only, "slow": slow,
                "incorrect": list(self.incorrect)}


# ------------------------------------------------------------------------------------------
# collecting the cells (once)
# ------------------------------------------------------------------------------------------


def collect(comparison: Comparison, subs: list[Subject], scs: tuple[Scenario, ...]
            ) -> tuple[dict, dict]:
    """The doorbell cell and the same setting's PIO cell for every subject and scenario."""
    cells, pios = {}, {}
    for sc in scs:
        for s in subs:
            c = comparison.cell(s.route, sc.options(s.variant), sc.key)
            cells[(s.key, sc.key)] = c
            pios[(s.key, sc.key)] = comparison.pio_cell(c)
    return cells, pios


def _point(cell: Cell, pio: Cell, is_pio: bool, tolerance: float) -> Point:
    r = ratio(cell, pio) if cell.status != NA else None
    judged = "" if is_pio else classify(cell.status, r, tolerance)
    return Point(cell.status, cell.cycles, pio.cycles, r, judged, cell.exits, cell.walk_refs,
                 cell.tlb_hits, cell.tlb_misses, cell.run.ept_entry, cell.reason)


# ------------------------------------------------------------------------------------------
# break-even
# ------------------------------------------------------------------------------------------


class Rows:
    """Each cell's coefficient row over a profile's price vector (memoised per cell)."""

    def __init__(self, comparison: Comparison):
        self.comparison = comparison
        self.space = PriceSpace.of(comparison.profile)
        self._rows: dict[tuple, np.ndarray] = {}

    def row(self, cell: Cell) -> np.ndarray | None:
        if cell.pricing is None or cell.run.result is None:
            return None
        k = sim_key(cell.route, cell.run.options)
        r = self._rows.get(k)
        if r is None:
            res = cell.run.result
            coef = self.comparison.model(cell.run.options.is_nested).coefficients(
                res.events, res.iterations)
            r = self._rows[k] = self.space.vector(coef)
        return r


def as_fast_form(door: np.ndarray, pio: np.ndarray, tolerance: float) -> np.ndarray:
    """``limit(t) * pio - door``: non-negative exactly when :func:`within` holds."""
    return limit(tolerance) * pio - door


def ordering_form(cheaper: np.ndarray, dearer: np.ndarray) -> np.ndarray:
    """``dearer - cheaper``: non-negative while the first costs no more than the second."""
    return dearer - cheaper


def _breakeven(space: PriceSpace, form: np.ndarray) -> BreakEven | None:
    if not np.any(np.abs(form) > 1e-12):
        return None
    return break_even(space, form)


def statements(rows: Rows, subs: list[Subject], scs: tuple[Scenario, ...], cells: dict,
               pios: dict, points: dict, tolerance: float) -> list[Statement]:
    """Every yes/no (each doorbell against PIO, every setting) and every ordering (adjacent
    doorbells by cycles under the base setting), each with its break-even."""
    out = []
    for sc in scs:
        for s in subs:
            p = points[(s.key, sc.key)]
            if s.is_pio or p.judged not in (AS_FAST, SLOWER):
                continue
            d, q = rows.row(cells[(s.key, sc.key)]), rows.row(pios[(s.key, sc.key)])
            form = as_fast_form(d, q, tolerance)
            out.append(Statement("as-fast", sc.key, s.key, "pio", p.judged == AS_FAST,
                                 float(p.ratio), _breakeven(rows.space, form)))
    ranked = sorted((s for s in subs if not s.is_pio
                     and points[(s.key, BASE.key)].judged in (AS_FAST, SLOWER)),
                    key=lambda s: points[(s.key, BASE.key)].cycles)
    for a, b in zip(ranked, ranked[1:]):
        ra, rb = rows.row(cells[(a.key, BASE.key)]), rows.row(cells[(b.key, BASE.key)])
        form = ordering_form(ra, rb)
        gap = points[(b.key, BASE.key)].cycles - points[(a.key, BASE.key)].cycles
        out.append(Statement("ordering", BASE.key, a.key, b.key, True, gap,
                             _breakeven(rows.space, form)))
    return out


# ------------------------------------------------------------------------------------------
# uncertainty
# ------------------------------------------------------------------------------------------


def uncertainty(rows: Rows, cells: Iterable[Cell], n: int, *, seed: int = 0,
                method: str = "uniform", tolerance: float = DEFAULT_TOLERANCE) -> Uncertainty:
    """Every priced cell (and its PIO reference) at ``n`` sampled price vectors: one matrix
    product; per cell the median and 90% interval of its cycles and of its ratio to PIO, and
    the share of samples in which it is as fast (:func:`within`)."""
    t0 = time.perf_counter()
    out = Uncertainty(n, seed, method, tolerance)
    keys: dict[tuple, int] = {}
    order: list[np.ndarray] = []
    pairs: list[tuple[tuple, int, int | None]] = []  # (cell key, its row, its PIO's row)
    pio_rows: dict[tuple, int | None] = {}  # by the PIO cell's key

    def add(c: Cell) -> int | None:
        k = sim_key(c.route, c.run.options)
        if k not in keys:
            r = rows.row(c)
            if r is None:
                return None
            keys[k] = len(order)
            order.append(r)
        return keys[k]

    for c in cells:
        i = add(c)
        if i is None:
            continue
        pk = sim_key(PIO_REFERENCE, c.run.options)
        if pk not in pio_rows:
            pio_rows[pk] = add(rows.comparison.pio_cell(c))
        pairs.append((sim_key(c.route, c.run.options), i, pio_rows[pk]))
    if not order:
        return out
    prices = sample_prices(rows.space, n, seed, method)
    cycles = reprice(np.vstack(order), prices)  # cells x n, one matrix product
    ci = np.array([i for _, i, _ in pairs])
    cq = np.quantile(cycles[ci], (0.05, 0.5, 0.95), axis=1)
    with_pio = [(m, j) for m, (_, _, j) in enumerate(pairs) if j is not None]
    rq = share = None
    if with_pio:
        r = cycles[ci[[m for m, _ in with_pio]]] / cycles[[j for _, j in with_pio]]
        rq = np.quantile(r, (0.05, 0.5, 0.95), axis=1)
        share = np.mean(within(r, tolerance), axis=1)
    slot = {m: q for q, (m, _) in enumerate(with_pio)}
    for m, (k, _, _) in enumerate(pairs):
        st: dict[str, float] = {"cycles_median": float(cq[1, m]),
                                "cycles_p05": float(cq[0, m]), "cycles_p95": float(cq[2, m])}
        if m in slot:
            q = slot[m]
            st.update({"ratio_median": float(rq[1, q]), "ratio_p05": float(rq[0, q]),
                       "ratio_p95": float(rq[2, q]), "share_as_fast": float(share[q])})
        out.cells[k] = st
    out.seconds = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------
# the whole judgement
# ------------------------------------------------------------------------------------------


def judge(comparison: Comparison, subs: list[Subject], scs: tuple[Scenario, ...],
          main: Iterable[Cell], review_incorrect: Iterable[str] = (), *,
          tolerance: float = DEFAULT_TOLERANCE, samples: int = 0, seed: int = 0,
          sampling: str = "uniform", extra_cells: Iterable[Cell] = ()) -> Judgement:
    """Judge ``subs`` under ``scs`` from ``comparison``'s cells. ``main``: the run's cells
    (a variant failing any of them is incorrect); ``review_incorrect``: variants the review's
    correctness checks found wrong. With ``samples`` > 0, the uncertainty over those cells,
    the judged ones and ``extra_cells``."""
    main = list(main)
    cells, pios = collect(comparison, subs, scs)
    points = {k: _point(c, pios[k], k[0] == "pio", tolerance) for k, c in cells.items()}
    wrong = {c.variant for c in main if c.status not in (OK, NA)} | set(review_incorrect)
    incorrect = [s.variant for s in subs if not s.is_pio and s.variant in wrong]
    rows = Rows(comparison)
    sts = statements(rows, subs, scs, cells, pios, points, tolerance)
    j = Judgement(tolerance, scs, subs, cells, pios, points, sts, incorrect)
    if samples:
        every = j.all_cells() + main + list(extra_cells)
        j.uncertainty = uncertainty(rows, every, samples, seed=seed, method=sampling,
                                    tolerance=tolerance)
        for k, c in cells.items():
            st = j.uncertainty.stats(c)
            if st is not None and k[0] != "pio":
                points[k] = _with(points[k], st)
    return j


def _with(p: Point, st: Mapping[str, float]) -> Point:
    return replace(p, uncertainty=dict(st))
