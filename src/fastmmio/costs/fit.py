"""Fitting a profile's free prices to published cycle figures.

Given, per route, the event counts of one notification (name -> count, as the simulator
reports them) and a published cycles figure, and a choice of which profile prices are free
(e.g. ``exit``, ``kvm.user_exit.io``, ``kvm.emulate``), :func:`fit_profile` solves

    minimise  sum_r  w_r^2 (fixed_r + sum_j A[r, j] x_j - target_r)^2
              + lambda * sum_j ((x_j - prior_j) / max(prior_j, 1))^2        subject to x >= 0

where ``A[r, j]`` is the count of route ``r``'s events priced by free key ``j`` (each event goes
to its most specific key, as in :class:`~fastmmio.costs.model.CostModel`), ``fixed_r`` the
cycles of its other events at the profile's prices, ``w_r = 1/target_r`` ("relative", the
default: every figure counts by its percentage error) or 1 ("absolute"), and ``lambda`` the
``regularization`` (default 0). The solver is Lawson and Hanson's active-set non-negative
least squares (*Solving Least Squares Problems*, 1974, ch. 23), written here on numpy.

Without regularization the free prices must be identifiable: if the routes' count columns are
linearly dependent (two prices that always occur together, a price no route uses, fewer
distinct routes than prices) :class:`FitError` names the prices that cannot be told apart.
With ``regularization > 0`` the fit is well posed and such prices stay near their priors.

The result carries the fitted prices, per-route residuals (absolute and %), and the profile
with those prices replaced (``basis = "fitted"``, the old value kept as ``prior``) and a
``[fit]`` table recording the targets, their event vectors and where those came from, the free
keys, the method and the residuals: :func:`write_profile` writes it back as TOML and
:func:`refit` redoes a recorded fit, e.g. with the simulator's event vectors.

Command line: ``python -m fastmmio.costs.fit PROFILE.toml [--events EVENTS.json] [--dry-run]``
(``EVENTS.json``: ``{"route": {"event": count, ...}, ...}``, per notification).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fastmmio.costs.model import CostModel
from fastmmio.costs.profile import (
    COMPONENTS,
    FitRecord,
    FitTarget,
    Price,
    Profile,
    load_profile,
)
from fastmmio.errors import FastmmioError, UsageError

METHOD = "non-negative least squares (Lawson-Hanson active set), fastmmio.costs.fit"
ROUND = 2  # fitted prices are rounded to this many decimals (residuals use the rounded values)


class FitError(UsageError):
    """A fit that cannot be made: unidentifiable prices, unknown keys, bad targets."""


@dataclass(frozen=True)
class Target:
    """One published figure: route, cycles per notification, the route's event counts per
    notification, and the figure's source."""

    route: str
    cycles: float
    events: Mapping[str, float]
    source: str = ""


@dataclass(frozen=True)
class RouteResidual:
    route: str
    target: float
    fitted: float
    residual: float  # fitted - target, cycles
    percent: float  # 100 * residual / target


@dataclass(frozen=True)
class FitResult:
    parameters: dict[str, float]  # free key -> fitted cycles
    residuals: tuple[RouteResidual, ...]
    rank: int
    profile: Profile  # the input profile with the fitted prices and a [fit] record
    weighting: str
    regularization: float

    @property
    def max_abs_percent(self) -> float:
        return max((abs(r.percent) for r in self.residuals), default=0.0)

    def table(self) -> str:
        """A plain-text summary: fitted prices and per-route residuals."""
        lines = ["fitted prices (cycles):"]
        w = max(len(k) for k in self.parameters) if self.parameters else 0
        for k, v in self.parameters.items():
            prior = self.profile.prices[k].prior
            lines.append(f"  {k:<{w}}  {v:10.2f}" + (f"   (prior {prior:g})" if prior is not None
                                                       else ""))
        lines.append("routes: target fitted residual %")
        rw = max(len(r.route) for r in self.residuals) if self.residuals else 0
        for r in self.residuals:
            lines.append(f"  {r.route:<{rw}}  {r.target:8.1f} {r.fitted:8.1f} {r.residual:+8.1f} "
                         f"{r.percent:+6.2f}%")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# the solver
# ------------------------------------------------------------------------------------------


def nnls(A: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """Minimise ``||A x - b||`` subject to ``x >= 0`` (Lawson and Hanson 1974, algorithm NNLS).

    Active-set method: start with every variable held at zero; repeatedly free the variable
    whose gradient most wants to grow, solve the unconstrained least-squares problem on the
    free set, and step back along the segment until no free variable is negative.
    """
    A = np.asarray(A, dtype=float)
    b = np.asarray(b, dtype=float)
    m, n = A.shape
    if b.shape != (m,):
        raise ValueError(f"b has shape {b.shape}, expected ({m},)")
    if max_iter is None:
        max_iter = 30 * max(n, 1) + 100
    tol = 10 * np.finfo(float).eps * max(np.abs(A).sum(axis=0).max(initial=0.0), 1.0) * max(m, n)
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = A.T @ (b - A @ x)
    it = 0
    blocked = np.zeros(n, dtype=bool)  # Lawson-Hanson's safeguard: a variable whose own
    # unconstrained value comes out <= 0 right after it was freed is set aside (its w taken
    # as 0) until another variable changes the solution; rounding can make that happen.
    while (~passive & ~blocked).any() and (w[~passive & ~blocked] > tol).any():
        j = int(np.argmax(np.where(passive | blocked, -np.inf, w)))
        passive[j] = True
        first = True
        while True:
            it += 1
            if it > max_iter:
                raise FitError(f"NNLS did not converge in {max_iter} iterations")
            s = np.zeros(n)
            s[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if first and s[j] <= tol:
                passive[j] = False
                blocked[j] = True
                s = x
                break
            first = False
            if (s[passive] > tol).all():
                blocked[:] = False
                break
            neg = passive & (s <= tol)
            alpha = np.min(x[neg] / (x[neg] - s[neg]))
            x = x + alpha * (s - x)
            passive &= x > tol
            x[~passive] = 0.0
        x = s
        w = A.T @ (b - A @ x)
    return x


def _null_space_params(M: np.ndarray, names: Sequence[str]) -> tuple[int, list[list[str]]]:
    """Rank of ``M`` and, for each null-space direction, the parameters it involves."""
    if M.size == 0:
        return 0, [list(names)]
    _, s, vt = np.linalg.svd(M, full_matrices=True)
    tol = max(M.shape) * np.finfo(float).eps * (s[0] if s.size else 0.0) * 1e3
    rank = int((s > tol).sum())
    groups = []
    for v in vt[rank:]:
        involved = [names[i] for i in np.flatnonzero(np.abs(v) > 1e-8)]
        if involved and involved not in groups:
            groups.append(involved)
    return rank, groups


# ------------------------------------------------------------------------------------------
# fitting a profile
# ------------------------------------------------------------------------------------------


def design(model: CostModel, targets: Sequence[Target], free: Sequence[str]
           ) -> tuple[np.ndarray, np.ndarray]:
    """The count matrix ``A`` (routes x free keys) and each route's fixed cycles (its events
    not priced by a free key, at the profile's prices)."""
    index = {k: j for j, k in enumerate(free)}
    A = np.zeros((len(targets), len(free)))
    fixed = np.zeros(len(targets))
    for r, t in enumerate(targets):
        for name, count in t.events.items():
            res = model.resolve(name)
            if res.key in index and not res.free:
                A[r, index[res.key]] += count
            else:
                fixed[r] += count * res.unit_cycles
    return A, fixed


@dataclass(frozen=True)
class Separability:
    """Which prices a set of targets can fit (:func:`separable_prices`)."""

    chosen: tuple[str, ...]  # linearly independent count columns, largest contribution first
    tied: dict[str, tuple[str, ...]]  # key -> chosen keys its count column is a combination of
    held: dict[str, str]  # key -> why it is not a candidate (measured, priced at 0)
    rank: int


def separable_prices(profile: Profile, targets: Sequence[Target],
                     candidates: Sequence[str] | None = None) -> Separability:
    """The largest set of prices the targets can fit without inventing a value.

    Every price the targets' events use (or ``candidates``) is taken in order of the cycles
    it contributes to the targets at the profile's prices, largest first, and kept when its
    count column (weighted as :func:`fit_profile` weights it, by 1/target) raises the rank
    of the design matrix. A price that does not is *tied*: its column is a combination of
    the kept ones (the same event vectors: e.g. the VMCS-length skip occurs exactly once per
    exit, so no kvm-unit-tests figure tells it from the exit), and it is held. Prices whose
    basis is ``measured`` and prices of 0 cycles are not candidates (held, with the reason).
    """
    model = CostModel(profile, nested=False)
    used: dict[str, float] = {}
    for t in targets:
        for name, count in t.events.items():
            res = model.resolve(name)
            if not res.free and count:
                used[res.key] = used.get(res.key, 0.0) + count * res.unit_cycles / t.cycles
    held: dict[str, str] = {}
    pool = list(candidates) if candidates is not None else list(used)
    ranked = []
    for k in pool:
        p = profile.prices.get(k)
        if p is None:
            raise FitError(f"{k!r} is not a [price] key of profile {profile.name}")
        if candidates is None and p.basis == "measured":
            held[k] = f"measured ({p.cycles:g} cycles): not moved by a fit"
        elif candidates is None and p.cycles == 0:
            held[k] = "priced at 0 cycles"
        else:
            ranked.append(k)
    ranked.sort(key=lambda k: -used.get(k, 0.0))
    wts = np.array([1.0 / float(t.cycles) for t in targets])
    chosen: list[str] = []
    tied: dict[str, tuple[str, ...]] = {}
    rank = 0
    for k in ranked:
        A, _ = design(model, targets, chosen + [k])
        Aw = A * wts[:, None]
        r = int(np.linalg.matrix_rank(Aw)) if Aw.size else 0
        if r > rank:
            chosen.append(k)
            rank = r
            continue
        if not chosen:
            tied[k] = ()
            continue
        coef = np.linalg.lstsq(Aw[:, :-1], Aw[:, -1], rcond=None)[0]
        tied[k] = tuple(c for c, v in zip(chosen, coef) if abs(v) > 1e-9)
    return Separability(tuple(chosen), tied, held, rank)


def _check_inputs(profile: Profile, targets: Sequence[Target], free: Sequence[str]) -> None:
    if not targets:
        raise FitError("no targets to fit")
    if not free:
        raise FitError("no free parameters: name the profile prices to fit")
    if len(set(free)) != len(free):
        raise FitError(f"free parameters listed twice: {', '.join(free)}")
    for k in free:
        if k not in profile.prices:
            known = ", ".join(profile.prices)
            raise FitError(f"free parameter {k!r} is not a [price] key of profile "
                           f"{profile.name}; keys: {known}")
    seen = set()
    for t in targets:
        if t.route in seen:
            raise FitError(f"route {t.route!r} has two targets")
        seen.add(t.route)
        if not (isinstance(t.cycles, (int, float)) and math.isfinite(t.cycles) and t.cycles > 0):
            raise FitError(f"route {t.route!r}: target cycles must be a positive number, "
                           f"got {t.cycles!r}")
        for name, count in t.events.items():
            if isinstance(count, bool) or not isinstance(count, (int, float)) \
                    or not math.isfinite(count) or count < 0:
                raise FitError(f"route {t.route!r}: event {name!r} count must be a finite "
                               f"number >= 0, got {count!r}")


def fit_profile(profile: Profile | str | Path, targets: Sequence[Target], free: Sequence[str],
                *, weighting: str = "relative", regularization: float = 0.0,
                events_source: str = "", notes: str = "") -> FitResult:
    """Fit the prices ``free`` (keys of ``profile``'s ``[price]``) to ``targets``.

    Raises :class:`FitError` when the free prices are not identifiable from the targets and
    ``regularization`` is 0, naming the prices that cannot be told apart. Events that match
    no key raise :class:`~fastmmio.costs.model.UnpricedEventError` as in pricing.
    """
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    free = list(free)
    _check_inputs(prof, targets, free)
    if weighting not in ("relative", "absolute"):
        raise FitError(f"weighting must be 'relative' or 'absolute', not {weighting!r}")
    if not (math.isfinite(regularization) and regularization >= 0):
        raise FitError(f"regularization must be a number >= 0, got {regularization!r}")
    model = CostModel(prof, nested=False)
    A, fixed = design(model, targets, free)
    tgt = np.array([float(t.cycles) for t in targets])
    wts = 1.0 / tgt if weighting == "relative" else np.ones_like(tgt)
    Aw = A * wts[:, None]
    bw = (tgt - fixed) * wts

    rank, groups = _null_space_params(Aw, free)
    unused = [k for j, k in enumerate(free) if not A[:, j].any()]
    if rank < len(free) and regularization == 0:
        why = []
        if unused:
            why.append(f"no target's events use {', '.join(unused)}")
        tied = [g for g in groups if not set(g) <= set(unused)]
        for g in tied:
            why.append("the targets cannot tell apart " + ", ".join(g))
        raise FitError(
            f"under-determined fit of profile {prof.name}: {len(free)} free prices but the "
            f"targets' count matrix has rank {rank} ({'; '.join(why)}). Fix some of them "
            "(drop them from the free list), add routes that separate them, or pass "
            "regularization > 0 to keep them near their priors"
        )

    priors = np.array([prof.prices[k].prior if prof.prices[k].prior is not None
                       else prof.prices[k].cycles for k in free])
    if regularization > 0:
        D = np.diag(1.0 / np.maximum(priors, 1.0)) * math.sqrt(regularization)
        x = nnls(np.vstack([Aw, D]), np.concatenate([bw, D @ priors]))
    else:
        x = nnls(Aw, bw)
    x = np.round(x, ROUND)
    params = {k: float(v) for k, v in zip(free, x)}

    fitted = fixed + A @ x
    residuals = tuple(
        RouteResidual(t.route, float(t.cycles), float(f), float(f - t.cycles),
                      float(100.0 * (f - t.cycles) / t.cycles))
        for t, f in zip(targets, fitted)
    )
    cited = "; ".join(dict.fromkeys(t.source for t in targets if t.source)) or "the [fit] targets"
    spread = fit_intervals(Aw, bw, x, rank)
    new_prices = dict(prof.prices)
    for j, (k, v) in enumerate(params.items()):
        old = prof.prices[k]
        low, high, why = old.low, old.high, old.why
        if spread is not None:
            se, dof = spread
            low, high = max(0.0, round(v - 2 * se[j], ROUND)), round(v + 2 * se[j], ROUND)
            why = (f"the fit's residuals: +-2 standard errors (one is {se[j]:.1f} cycles; "
                   f"weighted residual variance over {dof} degrees of freedom)")
        elif low is not None and not low <= v <= high:
            low, high, why = None, None, ""  # the prior's interval no longer holds the value
        note = old.note
        if old.basis != "fitted":  # first fit: keep what the prior was and why
            note = (note + " | " if note else "") + f"prior {old.cycles:g} ({old.basis}): {old.source}"
        new_prices[k] = replace(
            old, cycles=v, basis="fitted", source_ref=None,
            source=f"fitted (see [fit]) to: {cited}",
            prior=old.prior if old.prior is not None else old.cycles, note=note,
            low=low, high=high, why=why,
        )
    reg_note = (f"; regularization {regularization:g} toward the priors" if regularization
                else "")
    record = FitRecord(
        free=tuple(free),
        targets=tuple(
            FitTarget(route=t.route, cycles=float(t.cycles), source=t.source or "(not given)",
                      events=dict(t.events), fitted=round(r.fitted, 2),
                      residual=round(r.residual, 2), percent=round(r.percent, 3))
            for t, r in zip(targets, residuals)
        ),
        method=f"{METHOD}; {weighting} weighting{reg_note}",
        weighting=weighting,
        regularization=float(regularization),
        events_source=events_source,
        notes=notes,
        rank=rank,
    )
    new_profile = replace(prof, prices=new_prices, fit=record)
    return FitResult(params, residuals, rank, new_profile, weighting, float(regularization))


def fit_intervals(Aw: np.ndarray, bw: np.ndarray, x: np.ndarray, rank: int
                  ) -> tuple[np.ndarray, int] | None:
    """Standard errors of the fitted prices from the residuals (ordinary least-squares
    covariance ``s^2 (A^T A)^+`` of the weighted system, ``s^2`` = residual sum of squares over
    the degrees of freedom), and the degrees of freedom; None when there are none (as many
    independent targets as prices: the residuals are zero and say nothing)."""
    dof = Aw.shape[0] - rank
    if dof <= 0:
        return None
    r = Aw @ x - bw
    s2 = float(r @ r) / dof
    cov = s2 * np.linalg.pinv(Aw.T @ Aw)
    return np.sqrt(np.maximum(np.diag(cov), 0.0)), dof


def refit(profile: Profile | str | Path, events: Mapping[str, Mapping[str, float]] | None = None,
          *, events_source: str | None = None, write: bool = False) -> FitResult:
    """Redo the fit recorded in ``profile``'s ``[fit]`` table.

    ``events`` (route -> per-notification counts), when given, replaces the recorded event
    vectors of those routes (e.g. with the simulator's), and ``events_source`` says where they
    came from. With ``write=True`` the profile file is rewritten with the result.
    """
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    if prof.fit is None:
        raise FitError(f"profile {prof.name} ({prof.origin}) has no [fit] table to redo")
    events = dict(events or {})
    known = {t.route for t in prof.fit.targets}
    unknown = sorted(set(events) - known)
    if unknown:
        raise FitError(f"event vectors given for routes the fit has no target for: "
                       f"{', '.join(unknown)} (targets: {', '.join(sorted(known))})")
    targets = [Target(t.route, t.cycles, events.get(t.route, t.events), t.source)
               for t in prof.fit.targets]
    src = prof.fit.events_source
    if events:
        src = events_source or "event vectors supplied to refit() (source not stated)"
    result = fit_profile(prof, targets, prof.fit.free, weighting=prof.fit.weighting,
                         regularization=prof.fit.regularization, events_source=src,
                         notes=prof.fit.notes)
    if write:
        write_profile(result.profile, prof.origin)
    return result


# ------------------------------------------------------------------------------------------
# writing profiles
# ------------------------------------------------------------------------------------------


def _s(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a valid TOML basic string


def _n(v: float) -> str:
    v = float(v)
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def _q(key: str) -> str:
    return _s(key)


def _price_lines(p: Price) -> list[str]:
    out = [f"cycles = {_n(p.cycles)}", f"component = {_s(p.component)}",
           f"basis = {_s(p.basis)}", f"source = {_s(p.source_ref or p.source)}"]
    if p.exact:
        out.append("exact = true")
    if p.prior is not None:
        out.append(f"prior = {_n(p.prior)}")
    if p.note:
        out.append(f"note = {_s(p.note)}")
    if p.interval is not None:
        out += [f"low = {_n(p.low)}", f"high = {_n(p.high)}", f"why = {_s(p.why)}"]
    if p.depends:
        out.append("depends = [" + ", ".join(_s(d) for d in p.depends) + "]")
    return out


def dump_profile(profile: Profile) -> str:
    """The profile as TOML text that :func:`~fastmmio.costs.profile.parse_profile` reads back
    to an equal profile (prices, free entries, sources, nested, fit)."""
    L: list[str] = ["# fastmmio CPU cost profile (schema: fastmmio.costs.profile)", ""]
    L += ["[profile]", f"name = {_s(profile.name)}", f"description = {_s(profile.description)}",
          f"cpu = {_s(profile.cpu)}"]
    if profile.nested_default:
        L.append("nested = true")
    if profile.notes:
        L.append(f"notes = {_s(profile.notes)}")
    if profile.sources:
        L += ["", "[sources]"] + [f"{_q(k)} = {_s(v)}" for k, v in profile.sources.items()]
    order = {c: i for i, c in enumerate(COMPONENTS)}
    for p in sorted(profile.prices.values(), key=lambda p: order[p.component]):
        L += ["", f"[price.{_q(p.key)}]"] + _price_lines(p)
    for f in profile.free.values():
        L += ["", f"[free.{_q(f.key)}]", f"reason = {_s(f.reason)}"]
        if f.exact:
            L.append("exact = true")
    if profile.nested is not None:
        n = profile.nested
        L += ["", "[nested]", f"description = {_s(n.description)}", f"source = {_s(n.source)}"]
        if n.scale:
            L.append("scale = { " + ", ".join(f"{k} = {_n(v)}" for k, v in n.scale.items())
                     + " }")
        for p in n.prices.values():
            L += ["", f"[nested.price.{_q(p.key)}]"] + _price_lines(p)
    if profile.fit is not None:
        f = profile.fit
        L += ["", "[fit]", f"method = {_s(f.method)}", f"weighting = {_s(f.weighting)}",
              f"regularization = {_n(f.regularization)}",
              "free = [" + ", ".join(_s(k) for k in f.free) + "]"]
        if f.rank is not None:
            L.append(f"rank = {f.rank}")
        if f.events_source:
            L.append(f"events_source = {_s(f.events_source)}")
        if f.notes:
            L.append(f"notes = {_s(f.notes)}")
        for t in f.targets:
            L += ["", "[[fit.target]]", f"route = {_s(t.route)}", f"cycles = {_n(t.cycles)}",
                  f"source = {_s(t.source)}"]
            for name in ("fitted", "residual", "percent"):
                v = getattr(t, name)
                if v is not None:
                    L.append(f"{name} = {_n(v)}")
            L.append("events = { " + ", ".join(f"{_q(k)} = {_n(v)}" for k, v in t.events.items())
                     + " }")
    return "\n".join(L) + "\n"


def write_profile(profile: Profile, path: str | Path) -> Path:
    """Write ``profile`` as TOML to ``path`` (checked by reading it back first)."""
    from fastmmio.costs.profile import parse_profile

    text = dump_profile(profile)
    parse_profile(text, str(path))  # never write a file that would not load
    path = Path(path)
    from fastmmio.outputs import write_text

    write_text(path, text, "profile")  # atomic: a reader never sees half a profile
    return path


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastmmio.costs.fit",
                                 description="Redo the fit recorded in a profile's [fit] table.")
    ap.add_argument("profile", help="profile .toml file (rewritten unless --dry-run)")
    ap.add_argument("--events", help="JSON: {route: {event: count}} per notification, "
                                     "replacing the recorded event vectors")
    ap.add_argument("--events-source", help="where the --events vectors come from")
    ap.add_argument("--dry-run", action="store_true", help="print the fit, write nothing")
    args = ap.parse_args(argv)
    try:
        events = None
        if args.events:
            try:
                events = json.loads(Path(args.events).read_text())
            except (OSError, ValueError) as exc:
                raise UsageError(f"cannot read event vectors {args.events}: {exc}") from None
        result = refit(args.profile, events, events_source=args.events_source,
                       write=not args.dry_run)
    except FastmmioError as exc:
        print(f"fastmmio: {exc}", file=sys.stderr)
        return exc.exit_status
    print(result.table())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
