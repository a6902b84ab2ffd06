"""A saved ``fastmmio compare`` run (its results.json) read back into a :class:`CompareRun`,
optionally priced with another profile, without simulating.

results.json keeps, per simulation, the steady-state batch's event counts, the machine setting
(:func:`fastmmio.compare.core.sim_key`'s fields), the status and the doorbell's EPT entry
(``simulated``: the reported cells; ``simulated_other``: the calibration's). :func:`load_run`
hands those to a fresh :class:`~fastmmio.compare.core.Comparison` as simulations already made
(:meth:`~fastmmio.compare.core.Comparison.restore`), so every cell is priced again from its
stored events (the profile saved with the run, or the one given) and the verdict is judged
again from those cells (:func:`fastmmio.verdict.rebuild_verdict`: the same judgement code, with
the review's findings as saved). A figure the saved run lacks (a profile that needs another
machine setting) is a :class:`~fastmmio.errors.UsageError`, never a simulation.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

from fastmmio.compare.calibration import calibration_rows
from fastmmio.compare.core import NA, OK, Comparison, Matrix, SimRun, Timings, sim_options
from fastmmio.compare.run import CompareOptions, CompareRun, KvmSide
from fastmmio.costs import Profile
from fastmmio.costs.profile import profile_from_json
from fastmmio.errors import FastmmioError, UsageError
from fastmmio.result import HostInfo, RunResult, Spread
from fastmmio.routes import get_route
from fastmmio.sim.backend import SimOptions
from fastmmio.verdict import rebuild_verdict


def read_results(path: Path | str) -> dict[str, Any]:
    """The JSON of a compare run's results.json (UsageError, one line, for anything else)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a results.json of fastmmio compare (not UTF-8 text)") \
            from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("simulated"), list) \
            or not isinstance(doc.get("options"), dict):
        raise UsageError(f"{path}: not a results.json of fastmmio compare (no 'simulated' "
                         "records or 'options')")
    return doc


def _dataclass(cls, d: Mapping[str, Any]):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def run_result(d: Mapping[str, Any]) -> RunResult:
    """A :class:`RunResult` from its JSON record (``RunResult.to_json``)."""
    r = _dataclass(RunResult, d)
    r.cycles = math.nan if r.cycles is None else r.cycles
    spread = d.get("cycles_spread") or (r.cycles, r.cycles)
    r.cycles_spread = tuple(math.nan if x is None else x for x in spread)
    if isinstance(d.get("spread"), Mapping):
        r.spread = _dataclass(Spread, d["spread"])
    return r


def sim_run(rec: Mapping[str, Any]) -> SimRun:
    """The :class:`SimRun` a ``simulated`` record was made from."""
    x = rec.get("extra") or {}
    o = sim_options(x["variant"], x.get("caches", "sdm-max"), bool(x.get("vpid", True)),
                    x.get("nested", "off"), int(x.get("extra_ioeventfds", 0)))
    o = SimOptions(**{**o.__dict__, "mmio_caching": bool(x.get("mmio_caching", True)),
                      "ept_ad": bool(x.get("ept_ad", True)), "arch": x.get("arch"),
                      "next_rip_on_npf": x.get("next_rip_on_npf", "yes")})
    status = x.get("status", OK)
    result = run_result(rec) if rec.get("iterations") else None
    if status == NA and result is not None:
        status = OK  # it ran; only its pricing failed (re-priced here)
    return SimRun(get_route(rec["route"]), o, status, result, x.get("reason", "") or "",
                  x.get("ept_entry"))


def _options(d: Mapping[str, Any], profile: str) -> CompareOptions:
    """The saved options as they were (not checked again against this host: a pinned CPU
    or a device of the machine that made the run need not exist here)."""
    o = object.__new__(CompareOptions)
    for f in fields(CompareOptions):
        v = d.get(f.name, f.default)
        object.__setattr__(o, f.name, tuple(v) if isinstance(v, list) else v)
    object.__setattr__(o, "profile", profile)
    return o


def _kvm_side(doc: Mapping[str, Any]) -> KvmSide:
    h = doc.get("host") or {}
    host = _dataclass(HostInfo, h["host"]) if isinstance(h.get("host"), Mapping) else None
    return KvmSide(h.get("status", "skipped"), h.get("reason", ""), host,
                   [run_result(r) for r in doc.get("kvm") or []],
                   [(s["route"], s["reason"]) for s in h.get("skipped") or []])


def _nested_text(nested) -> str:
    return "bare metal" if nested in (False, None, "off") else f"nested under {nested}"


class _NotStored(UsageError):
    pass


def load_run(path: Path | str, profile: Profile | None = None) -> CompareRun:
    """The compare run saved in ``path`` (a results.json), priced with ``profile`` (default:
    the profile saved with it), with its verdict judged again from the stored cells."""
    path = Path(path)
    doc = read_results(path)
    try:
        if profile is None:
            full = (doc.get("profile") or {}).get("full")
            if full is None:
                raise UsageError(f"{path}: the run was saved without its profile (an older "
                                 "fastmmio): give one with --profile")
            profile = profile_from_json(full, str(path))
        opts = _options(doc["options"], profile.name)
        timings = Timings()
        comparison = Comparison(profile, iterations=int(opts.iterations), timings=timings)

        def refuse(route, options) -> None:
            raise _NotStored(f"{path}: the saved run has no simulation of {route.name} "
                             f"[{options.variant}, caches {options.caches}, "
                             f"{_nested_text(options.nested)}] that this "
                             f"profile needs; run fastmmio compare --profile {profile.name}")

        comparison.on_simulate = refuse
        records = list(doc["simulated"]) + list(doc.get("simulated_other") or [])
        for rec in records:
            comparison.restore(sim_run(rec))
        routes = tuple(dict.fromkeys(r["route"] for r in doc["simulated"]
                                     if (r.get("extra") or {}).get("scenario") == "main"))
        cells = {}
        for rec in doc["simulated"]:
            x = rec["extra"]
            if x.get("scenario") == "main":
                sr = sim_run(rec)
                cells[(sr.options.variant, rec["route"])] = comparison.cell(
                    sr.route, sr.options, "main")
        matrix = Matrix(tuple(opts.variants), routes, cells)
        verdict = None
        saved = doc.get("verdict")
        if saved is not None:
            verdict = rebuild_verdict(comparison, opts.variants, matrix.cells.values(), saved,
                                      samples=int(opts.uncertainty), seed=int(opts.seed),
                                      sampling=opts.sampling)
        try:
            cal = calibration_rows(comparison)
        except _NotStored:
            cal = None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"{path}: a record is incomplete or malformed "
                         f"({type(exc).__name__}: {exc})") from None
    except FastmmioError as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"{path}: {exc}") from None
    run_rec = doc.get("run") or {}
    run = CompareRun(opts, profile, comparison, matrix, _kvm_side(doc), verdict, cal, timings,
                     wall_s=float(doc.get("wall_s") or 0.0),
                     origin={"file": str(path), "fastmmio": doc.get("fastmmio"),
                             "time_utc": run_rec.get("time_utc"),
                             "argv": run_rec.get("argv"),
                             "profile": (doc.get("profile") or {}).get("name")})
    return run
