"""The verdict of one compare run: scenarios -> cells -> judgement -> sentences."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from fastmmio.compare.core import Cell, Comparison
from fastmmio.verdict.judge import DEFAULT_TOLERANCE, Judgement, Point, judge
from fastmmio.verdict.scenarios import BASE, Scenario, Subject, scenarios_for, subjects
from fastmmio.verdict.text import Finding, findings


@dataclass(frozen=True)
class ReviewFinding:
    """One check of :mod:`fastmmio.review` for one variant: ``passed`` says whether the
    variant has the property ``claim`` (None: the variant cannot set the check up)."""

    variant: str
    name: str
    source: str
    claim: str
    passed: bool | None
    detail: str
    numbers: dict[str, float]


@dataclass
class Verdict:
    judgement: Judgement
    findings: list[Finding]
    review: list[ReviewFinding]
    review_note: str

    @property
    def tolerance(self) -> float:
        return self.judgement.tolerance

    @property
    def scenarios(self) -> tuple[Scenario, ...]:
        return self.judgement.scenarios

    @property
    def subjects(self) -> list[Subject]:
        return self.judgement.subjects

    @property
    def points(self) -> dict[tuple[str, str], Point]:
        return self.judgement.points

    def point(self, subject: str, scenario: str = BASE.key) -> Point:
        return self.judgement.point(subject, scenario)

    def as_fast(self, subject: str, scenario: str = BASE.key) -> bool | None:
        """Whether the subject's doorbell is within the tolerance of PIO (None: no figure)."""
        p = self.points.get((subject, scenario))
        return None if p is None else p.as_fast

    def to_json(self) -> dict[str, Any]:
        j = self.judgement
        out = {
            "tolerance": j.tolerance,
            "scenarios": [s.__dict__ for s in j.scenarios],
            "subjects": [s.__dict__ for s in j.subjects],
            "points": [{"subject": k[0], "scenario": k[1], **p.to_json()}
                       for k, p in j.points.items()],
            "lists": {sc.key: j.lists(sc.key) for sc in j.scenarios},
            "statements": [st.to_json() for st in j.statements],
            "findings": [{"topic": f.topic, "text": f.text, "values": f.values}
                         for f in self.findings],
            "review": [r.__dict__ for r in self.review],
            "review_note": self.review_note,
        }
        if j.uncertainty is not None:
            u = j.uncertainty.to_json()
            out["uncertainty"] = {k: v for k, v in u.items() if k != "cells"}
        return out


def review_findings(variants: Iterable[str], options_for,
                    on_variant: Callable[[str], None] | None = None
                    ) -> tuple[list[ReviewFinding], str]:
    """The checks of :mod:`fastmmio.review` (the thread's objections as computed checks),
    when that module exists in this build."""
    try:
        review = importlib.import_module("fastmmio.review")
    except ModuleNotFoundError as exc:
        if exc.name == "fastmmio.review":
            return [], ("fastmmio.review is not in this build: the review's points are "
                        "answered here only through the route checks and counts above")
        raise
    out = []
    for v in variants:
        if on_variant is not None:
            on_variant(v)
        for chk in review.review_checks(options_for(v)):
            out.append(ReviewFinding(v, chk.name, chk.source, getattr(chk, "claim", chk.name),
                                     chk.passed, chk.detail, dict(chk.numbers)))
    return out, ""


def build_verdict(comparison: Comparison, variants: Iterable[str], main: Iterable[Cell] = (),
                  *, tolerance: float = DEFAULT_TOLERANCE, review: bool = True,
                  on_review: Callable[[str], None] | None = None, samples: int = 0,
                  seed: int = 0, sampling: str = "uniform",
                  extra_cells: Iterable[Cell] = ()) -> Verdict:
    """The verdict for ``variants`` (simulating what is still missing), with the correctness
    findings of ``main`` (the compare run's cells). ``review``: also run the checks of
    :mod:`fastmmio.review` (timed as ``review``; ``on_review(variant)`` is called before each
    variant's). ``samples`` > 0: the uncertainty over ``samples`` price sets (``seed``,
    ``sampling``), over the judged cells, ``main`` and ``extra_cells``."""
    variants = list(variants)
    main = list(main)
    subs = subjects(variants)
    scs = scenarios_for(comparison)
    if review:
        with comparison.timings.measure("review"):
            rv, note = review_findings(variants, BASE.options, on_review)
    else:
        rv, note = [], "review checks not run (--no-review)"
    wrong = [r.variant for r in rv if r.passed is False and r.source == "correctness"]
    with comparison.timings.measure("judge"):
        j = judge(comparison, subs, scs, main, wrong, tolerance=tolerance, samples=samples,
                  seed=seed, sampling=sampling, extra_cells=extra_cells)
    text = findings(j, comparison.profile, main, rv,
                    nested_priced=comparison.can_price_nested())
    return Verdict(j, text, rv, note)


def rebuild_verdict(comparison: Comparison, variants: Iterable[str], main: Iterable[Cell],
                    saved: Mapping[str, Any], *, samples: int = 0, seed: int = 0,
                    sampling: str = "uniform") -> Verdict:
    """The verdict of a saved run (``saved``: its ``Verdict.to_json`` record), judged again
    from ``comparison``'s cells (restored from the saved events, possibly priced with another
    profile) by the same :func:`judge` and :func:`findings`. The review's findings are taken as
    saved: they are properties of the variants' behaviour, which a price does not change."""
    variants = list(variants)
    main = list(main)
    rv = [ReviewFinding(**{**r, "numbers": dict(r.get("numbers") or {})})
          for r in saved.get("review") or []]
    wrong = [r.variant for r in rv if r.passed is False and r.source == "correctness"]
    subs = subjects(variants)
    scs = scenarios_for(comparison)
    with comparison.timings.measure("judge"):
        j = judge(comparison, subs, scs, main, wrong,
                  tolerance=float(saved.get("tolerance", DEFAULT_TOLERANCE)), samples=samples,
                  seed=seed, sampling=sampling)
    text = findings(j, comparison.profile, main, rv,
                    nested_priced=comparison.can_price_nested())
    return Verdict(j, text, rv, str(saved.get("review_note", "")))
