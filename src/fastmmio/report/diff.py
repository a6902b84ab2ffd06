"""``fastmmio diff A.json B.json``: what changed between two saved compare runs (before and
after a kernel patch, a profile change, a new fastmmio), per route and variant.

Simulated records are matched by their machine setting (the fields of
:func:`fastmmio.compare.core.sim_key`); a change is any difference in cycles, the ratio to PIO,
VM exits or walk references per notification, or the route's status. The verdict's words are
matched by (doorbell, machine setting). Measured (real-KVM) records are matched by route: a
change of the median is *noise* when the two medians' confidence intervals overlap (each run's
:class:`fastmmio.result.Spread`; the min-max range when a record has no interval), since the
measuring rule cannot tell such medians apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from rich.table import Table
from rich.text import Text

# Relative changes smaller than this are rounding (results.json keeps floats as computed).
EPSILON = 1e-9
SETTING_FIELDS = ("variant", "caches", "vpid", "nested", "mmio_caching", "ept_ad",
                  "extra_ioeventfds", "arch", "next_rip_on_npf")


def _f(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _changed(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return (a is None) != (b is None)
    return abs(a - b) > EPSILON * max(1.0, abs(a), abs(b))


@dataclass(frozen=True)
class SimChange:
    route: str
    setting: tuple  # SETTING_FIELDS' values
    figures: dict[str, tuple[Any, Any]]  # name -> (A, B); None for a record only one side has
    status: tuple[str | None, str | None]

    @property
    def variant(self) -> str:
        return self.setting[0]


@dataclass(frozen=True)
class KvmChange:
    route: str
    a: float | None
    b: float | None
    noise: bool
    why: str


@dataclass(frozen=True)
class WordChange:
    subject: str
    scenario: str
    a: str | None
    b: str | None
    ratio_a: float | None
    ratio_b: float | None


@dataclass
class Diff:
    sim: list[SimChange]
    kvm: list[KvmChange]
    words: list[WordChange]
    same_sim: int  # matched simulated records with no change
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "simulated": [{"route": c.route, **dict(zip(SETTING_FIELDS, c.setting)),
                           "status": list(c.status),
                           **{k: list(v) for k, v in c.figures.items()}} for c in self.sim],
            "kvm": [c.__dict__ for c in self.kvm],
            "verdict": [c.__dict__ for c in self.words],
            "unchanged_simulated": self.same_sim, "notes": self.notes}


def _sim_records(doc: Mapping[str, Any]) -> dict[tuple, dict[str, Any]]:
    out = {}
    for rec in list(doc.get("simulated") or []):
        x = rec.get("extra") or {}
        key = (rec["route"],) + tuple(x.get(f) for f in SETTING_FIELDS)
        out.setdefault(key, rec)
    return out


def _sim_figures(rec: Mapping[str, Any] | None) -> dict[str, float | None]:
    if rec is None:
        return {"cycles": None, "ratio_to_pio": None, "exits": None, "walk_refs": None}
    x = rec.get("extra") or {}
    return {"cycles": _f(rec.get("cycles")), "ratio_to_pio": _f(x.get("ratio_to_pio")),
            "exits": _f(x.get("exits_per_notification")),
            "walk_refs": _f(x.get("walk_refs_per_notification"))}


def _interval(rec: Mapping[str, Any]) -> tuple[float, float, str] | None:
    s = rec.get("spread")
    if isinstance(s, Mapping):
        if s.get("ci_low") is not None and s.get("ci_high") is not None:
            return float(s["ci_low"]), float(s["ci_high"]), "confidence intervals of the medians"
        if s.get("min") is not None and s.get("max") is not None:
            return float(s["min"]), float(s["max"]), "min-max ranges of the runs"
    sp = rec.get("cycles_spread")
    if isinstance(sp, list) and len(sp) == 2 and None not in sp and sp[0] != sp[1]:
        return float(sp[0]), float(sp[1]), "min-max ranges of the runs"
    return None


def _kvm_change(route: str, a: Mapping[str, Any] | None, b: Mapping[str, Any] | None
                ) -> KvmChange | None:
    ca, cb = _f(a.get("cycles")) if a else None, _f(b.get("cycles")) if b else None
    if not _changed(ca, cb):
        return None
    if a is None or b is None:
        return KvmChange(route, ca, cb, False, "measured in one run only")
    ia, ib = _interval(a), _interval(b)
    if ia is None or ib is None:
        return KvmChange(route, ca, cb, False, "no spread recorded: cannot tell from noise")
    overlap = ia[0] <= ib[1] and ib[0] <= ia[1]
    what = ia[2] if ia[2] == ib[2] else "spreads"
    return KvmChange(route, ca, cb, overlap,
                     f"{what} overlap" if overlap else f"{what} do not overlap")


def _points(doc: Mapping[str, Any]) -> dict[tuple[str, str], Mapping[str, Any]]:
    v = doc.get("verdict") or {}
    return {(p["subject"], p["scenario"]): p for p in v.get("points") or []}


def diff_results(a: Mapping[str, Any], b: Mapping[str, Any]) -> Diff:
    """What changed from run ``a`` to run ``b`` (both results.json documents)."""
    notes = []
    pa, pb = (a.get("profile") or {}).get("name"), (b.get("profile") or {}).get("name")
    if pa != pb:
        notes.append(f"profiles differ: {pa} -> {pb} (simulated cycles are priced differently)")
    ha = ((a.get("host") or {}).get("host") or {}).get("kvm_kind")
    hb = ((b.get("host") or {}).get("host") or {}).get("kvm_kind")
    if ha and hb and ha != hb:
        notes.append(f"KVM hosts differ: {ha} -> {hb} (measured ticks are not comparable)")
    ra, rb = _sim_records(a), _sim_records(b)
    sim, same = [], 0
    for key in list(ra) + [k for k in rb if k not in ra]:
        ea, eb = ra.get(key), rb.get(key)
        fa, fb = _sim_figures(ea), _sim_figures(eb)
        sa = (ea.get("extra") or {}).get("status") if ea else None
        sb = (eb.get("extra") or {}).get("status") if eb else None
        figs = {k: (fa[k], fb[k]) for k in fa if _changed(fa[k], fb[k])}
        if figs or sa != sb:
            sim.append(SimChange(key[0], key[1:], {k: (fa[k], fb[k]) for k in fa}, (sa, sb)))
        else:
            same += 1
    ka = {r["route"]: r for r in a.get("kvm") or []}
    kb = {r["route"]: r for r in b.get("kvm") or []}
    kvm = [c for r in list(ka) + [r for r in kb if r not in ka]
           if (c := _kvm_change(r, ka.get(r), kb.get(r))) is not None]
    qa, qb = _points(a), _points(b)
    words = []
    for key in list(qa) + [k for k in qb if k not in qa]:
        x, y = qa.get(key), qb.get(key)
        ja, jb = (x or {}).get("judged"), (y or {}).get("judged")
        if ja != jb and (ja or jb):
            words.append(WordChange(key[0], key[1], ja, jb, _f((x or {}).get("ratio")),
                                    _f((y or {}).get("ratio"))))
    return Diff(sim, kvm, words, same, notes)


# ------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------


def _pair(a: float | None, b: float | None, fmt: str) -> Text:
    sa = "-" if a is None else fmt.format(a)
    sb = "-" if b is None else fmt.format(b)
    if not _changed(a, b):
        return Text(sa, style="dim")
    t = Text(f"{sa} -> {sb}")
    if a and b is not None:
        pct = 100.0 * (b - a) / abs(a)
        t.append(f" ({pct:+.1f}%)", style="red" if pct > 0 else "green")
    return t


def _setting(s: tuple) -> str:
    d = dict(zip(SETTING_FIELDS, s))
    parts = [str(d["caches"])]
    if d["vpid"] is False:
        parts.append("VPID off")
    if d["nested"] not in (False, None, "off"):
        parts.append("nested" if d["nested"] is True else f"nested under {d['nested']}")
    if d["mmio_caching"] is False:
        parts.append("no mmio_caching")
    if d["ept_ad"] is False:
        parts.append("no EPT A/D")
    if d["arch"]:
        parts.append(str(d["arch"]))
    if d["extra_ioeventfds"]:
        parts.append(f"+{d['extra_ioeventfds']} ioeventfds")
    return ", ".join(parts)


def sim_table(d: Diff) -> Table | None:
    if not d.sim:
        return None
    t = Table(title="Simulated (model cycles per notification): A -> B",
              title_justify="left", caption_justify="left")
    for col in ("route", "variant", "setting"):
        t.add_column(col, no_wrap=True)
    for col in ("cycles", "x PIO", "exits", "walk refs", "status"):
        t.add_column(col, justify="right")
    for c in d.sim:
        f = c.figures
        st = (Text(str(c.status[0]), style="dim") if c.status[0] == c.status[1]
              else Text(f"{c.status[0] or 'absent'} -> {c.status[1] or 'absent'}",
                        style="bold"))
        t.add_row(c.route, c.variant, _setting(c.setting),
                  _pair(*f["cycles"], "{:,.0f}"), _pair(*f["ratio_to_pio"], "{:.2f}"),
                  _pair(*f["exits"], "{:.3g}"), _pair(*f["walk_refs"], "{:.3g}"), st)
    t.caption = (f"{d.same_sim} other simulated records unchanged; '-': not in that run or "
                 "not priced; status absent: the route/setting is only in the other run")
    return t


def kvm_table(d: Diff) -> Table | None:
    if not d.kvm:
        return None
    t = Table(title="This host's KVM (TSC ticks per notification, median): A -> B",
              title_justify="left", caption_justify="left")
    t.add_column("route", no_wrap=True)
    t.add_column("ticks", justify="right")
    t.add_column("change")
    for c in d.kvm:
        t.add_row(c.route, _pair(c.a, c.b, "{:,.0f}"),
                  Text(f"noise ({c.why})", style="dim") if c.noise
                  else Text(f"real ({c.why})", style="bold"))
    t.caption = ("noise: the two medians' confidence intervals (or min-max ranges) overlap, "
                 "so the measuring rule cannot tell them apart")
    return t


def words_table(d: Diff) -> Table | None:
    if not d.words:
        return None
    t = Table(title="The verdict's words: A -> B", title_justify="left")
    for col in ("doorbell", "machine setting", "judged", "x PIO"):
        t.add_column(col)
    for c in d.words:
        t.add_row(c.subject, c.scenario, Text(f"{c.a or '-'} -> {c.b or '-'}", style="bold"),
                  _pair(c.ratio_a, c.ratio_b, "{:.2f}"))
    return t


def summary(d: Diff) -> str:
    real = sum(1 for c in d.kvm if not c.noise)
    if not (d.sim or d.kvm or d.words):
        return "No change: every simulated figure, KVM median and verdict word is the same."
    return (f"{len(d.sim)} simulated record(s) changed, {d.same_sim} unchanged; "
            f"{len(d.kvm)} KVM median(s) moved ({real} beyond the spread, "
            f"{len(d.kvm) - real} within it: noise); {len(d.words)} verdict word(s) changed.")
