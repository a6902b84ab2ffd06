"""The verdict: the 2015 thread's question answered from the numbers of one compare run.

"[PATCH RFC 1/3] vmx: allow ioeventfd for EPT violations" claimed that letting an ioeventfd
sit on a read-only memslot, and signalling it at the top of ``handle_ept_violation``, lets the
processor cache the doorbell's translation, "which finally makes MMIO as fast as port IO".
Xiao Guangrong's review said the EPT entry stays not present (so nothing is cached), that even
a read-only entry would not help a write, that reads would signal the eventfd, and that every
demand fault would pay a bus look-up (FACTS.md section 1).

This module answers each point with figures computed in the same run, never with a sentence
written in advance: for every variant of the thread (the RFC as posted, the RFC as the review
asked, both review alternatives, upstream fast MMIO, 2013 upstream) its MMIO doorbell route is
simulated next to the port-I/O ioeventfd under several machine settings (:data:`SCENARIOS`:
the SDM's maximum caching, Skylake-SP-sized caches, no caching, VPID off, KVM nested), and the
text is generated from the cycles, ratios, exits, walk references, TLB outcomes and the
doorbell's EPT entry those runs produced; "as fast as port I/O" means within a stated
tolerance. Correctness findings come from the routes' own checks (and, when
:mod:`fastmmio.review` is present, from its checks of the review's points).

The SDM rules quoted in the text (Vol. 3C, 2016 edition): 28.3.2 (no guest-physical or
combined mapping is created from an EPT entry that is not present or misconfigured), 28.3.3.1
(an EPT violation invalidates the mappings used to translate its address; with "enable VPID" =
0 every VM entry and exit invalidates the combined mappings of VPID 0).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from fastmmio.compare.core import NA, OK, PIO_REFERENCE, Cell, Comparison, sim_options
from fastmmio.sim.backend import SimOptions
from fastmmio.sim.kvm.variants import VARIANTS

DEFAULT_TOLERANCE = 0.05  # "as fast": within 5% of the PIO ioeventfd route's cycles

LABELS = {
    "upstream-2013": "upstream 2013, no fast MMIO bus",
    "upstream": "upstream fast MMIO",
    "rfc-2015": "RFC as posted",
    "rfc-2015-fixed": "RFC as the review asked",
    "bad-page": "bad-page, review alternative 1",
    "reserved-write-mostly": "reserved write-mostly SPTE, review alternative 2",
}

EXIT_NAMES = {  # SDM basic exit reasons, as the text names them
    "EPT_VIOLATION": "EPT violation",
    "EPT_MISCONFIG": "EPT misconfiguration",
    "IO_INSTRUCTION": "I/O instruction",
    "CPUID": "CPUID",
}

# What the ept_entry state means for caching, with the SDM rule (28.3.2 / 28.3.3.1).
ENTRY_CLAUSE = {
    "not present": "its EPT entry stays not present (no SPTE is installed for the page), and "
                   "no guest-physical or combined mapping is created from a not-present EPT "
                   "entry (SDM 28.3.2)",
    "misconfigured": "its EPT entry is KVM's MMIO SPTE (write without read: an EPT "
                     "misconfiguration), from which no mapping is created (SDM 28.3.2)",
    "read-only": "its EPT entry is present but read-only: a write through it is an EPT "
                 "violation, which invalidates the mappings used to translate it (SDM "
                 "28.3.3.1)",
    "read/write": "its EPT entry is present and writable",
}


@dataclass(frozen=True)
class Scenario:
    """A machine setting the verdict is computed under."""

    key: str
    label: str
    caches: str
    vpid: bool = True
    nested: bool = False

    def options(self, variant: str) -> SimOptions:
        return sim_options(variant, self.caches, self.vpid, self.nested)


SCENARIOS = (
    Scenario("sdm-max", "SDM maximum caching, VPID on, bare metal", "sdm-max"),
    Scenario("skylake-sp", "Skylake-SP-sized caches, VPID on, bare metal", "skylake-sp"),
    Scenario("none", "no translation caching, VPID on, bare metal", "none"),
    Scenario("vpid-off", "SDM maximum caching, VPID off, bare metal", "sdm-max", vpid=False),
    Scenario("nested", "SDM maximum caching, VPID on, KVM nested", "sdm-max", nested=True),
)
BASE = SCENARIOS[0]


def doorbell_route(variant: str) -> str:
    """The MMIO doorbell a variant offers (from the variant's capabilities): an ioeventfd
    over a read-only memslot for the RFC-style variants (``KVM_CAP_IOEVENTFD_PF``), the
    length-0 ioeventfd of ``KVM_FAST_MMIO_BUS`` upstream, and the length-1 wildcard of 2013
    (no ``KVM_CAP_IOEVENTFD_NO_LENGTH`` yet)."""
    cls = VARIANTS[variant]
    if cls.ioeventfd_pf_cap:
        return "ro-write-eventfd"
    if cls.ioeventfd_no_length:
        return "mmio-eventfd-len0"
    return "mmio-eventfd-len1"


@dataclass(frozen=True)
class Subject:
    """One row of the verdict: a variant's doorbell (or the PIO reference)."""

    key: str
    label: str
    variant: str
    route: str


def subjects(variants: Iterable[str]) -> list[Subject]:
    variants = list(variants)
    out = [Subject(v, LABELS.get(v, v), v, doorbell_route(v)) for v in variants]
    pio_variant = "upstream" if "upstream" in variants else variants[0]
    out.append(Subject("pio", "PIO ioeventfd", pio_variant, PIO_REFERENCE))
    return out


def scenarios_for(comparison: Comparison) -> tuple[Scenario, ...]:
    """Every scenario, less nested when the profile cannot price KVM as a guest."""
    return tuple(s for s in SCENARIOS if not s.nested or comparison.can_price_nested())


def required(variants: Iterable[str], comparison: Comparison) -> list[tuple[str, SimOptions, str]]:
    """The simulations the verdict needs: (route, options, scenario key)."""
    out = []
    for sc in scenarios_for(comparison):
        for v in variants:
            out.append((doorbell_route(v), sc.options(v), sc.key))
            out.append((PIO_REFERENCE, sc.options(v), sc.key))
    return out


@dataclass(frozen=True)
class Point:
    """A subject under a scenario."""

    status: str
    cycles: float
    ratio: float | None
    exits: float
    walk_refs: float
    tlb_hits: float
    tlb_misses: float
    ept_entry: str | None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Finding:
    """One sentence of the verdict, with the values it was generated from."""

    topic: str
    text: str
    values: dict[str, Any] = field(default_factory=dict)


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
    tolerance: float
    scenarios: tuple[Scenario, ...]
    subjects: list[Subject]
    points: dict[tuple[str, str], Point]  # (subject key, scenario key) -> Point
    findings: list[Finding]
    review: list[ReviewFinding]
    review_note: str

    def point(self, subject: str, scenario: str = BASE.key) -> Point:
        return self.points[(subject, scenario)]

    def as_fast(self, subject: str, scenario: str = BASE.key) -> bool | None:
        """Whether the subject's doorbell is within the tolerance of PIO (None: no figure)."""
        p = self.points.get((subject, scenario))
        if p is None or p.ratio is None:
            return None
        return p.ratio <= 1 + self.tolerance

    def to_json(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "scenarios": [s.__dict__ for s in self.scenarios],
            "subjects": [s.__dict__ for s in self.subjects],
            "points": [{"subject": k[0], "scenario": k[1], **p.to_json()}
                       for k, p in self.points.items()],
            "findings": [{"topic": f.topic, "text": f.text, "values": f.values}
                         for f in self.findings],
            "review": [r.__dict__ for r in self.review],
            "review_note": self.review_note,
        }


# ------------------------------------------------------------------------------------------
# numbers to words
# ------------------------------------------------------------------------------------------


def _n(x: float) -> str:
    """A count per notification: 1, 0.5, 7, 24."""
    return f"{x:.2f}".rstrip("0").rstrip(".") if not float(x).is_integer() else f"{int(x)}"


def _times(x: float) -> str:
    return "once" if x == 1 else f"{_n(x)} times"


def _exits_text(cell: Cell) -> str:
    parts = [f"{_n(v)} {EXIT_NAMES.get(k, k.replace('_', ' ').lower())} exit"
             + ("s" if v != 1 else "") for k, v in cell.exit_reasons().items() if v]
    return " + ".join(parts) if parts else "no exit"


def _point(comparison: Comparison, cell: Cell) -> Point:
    ratio = comparison.ratio_to_pio(cell) if cell.status != NA else None
    return Point(cell.status, cell.cycles, ratio, cell.exits, cell.walk_refs, cell.tlb_hits,
                 cell.tlb_misses, cell.run.ept_entry, cell.reason)


def _delta_items(a: Cell, b: Cell) -> dict[str, tuple[float, str]]:
    """Per price key: a's cycles per notification minus b's, and the price's basis."""
    out: dict[str, tuple[float, str]] = {}
    for cell, sign in ((a, 1.0), (b, -1.0)):
        assert cell.pricing is not None
        n = cell.pricing.iterations
        for item in cell.pricing.items:
            if item.free:
                continue
            d, basis = out.get(item.key, (0.0, item.basis))
            out[item.key] = (d + sign * item.cycles / n, basis)
    return {k: v for k, v in out.items() if abs(v[0]) >= 0.5}


def _difference_text(door: Cell, pio: Cell) -> tuple[str, dict[str, float]]:
    """Where the doorbell's cycles differ from PIO's, by component, and how much of that
    rests on estimated prices."""
    comps = {c: door.breakdown.get(c, 0.0) - pio.breakdown.get(c, 0.0) for c in door.breakdown}
    big = sorted(((c, d) for c, d in comps.items() if abs(d) >= 0.5), key=lambda x: -abs(x[1]))
    delta = door.cycles - pio.cycles
    parts = ", ".join(f"{c} {d:+,.0f}" for c, d in big[:4])
    items = _delta_items(door, pio)
    est = sum(abs(d) for d, basis in items.values() if basis == "estimate")
    total = sum(abs(d) for d, _ in items.values()) or 1.0
    text = f"{delta:+,.0f} cycles ({parts})" if parts else f"{delta:+,.0f} cycles"
    share = est / total
    if big and share >= 0.5:
        keys = sorted((k for k, (d, b) in items.items() if b == "estimate"),
                      key=lambda k: -abs(items[k][0]))[:3]
        text += (f"; {share:.0%} of the difference rests on estimated prices "
                 f"({', '.join(keys)})")
    return text, {"delta_cycles": delta, "estimate_share": share,
                  **{f"delta_{c}": d for c, d in comps.items()}}


def _walk_clause(cell: Cell) -> str:
    if not cell.walk_refs:
        return "no walk reference (the translation is cached)"
    psc_hits = sum(v for k, v in cell.per.items() if k.startswith("psc.") and k.endswith(".hit"))
    s = (f"{_n(cell.walk_refs)} walk references per write (TLB {_n(cell.tlb_hits)} hits / "
         f"{_n(cell.tlb_misses)} misses)")
    if psc_hits:
        s += f", cut by {_n(psc_hits)} paging-structure-cache hits"
    return s


def _doorbell_finding(comparison: Comparison, subj: Subject, door: Cell, pio: Cell,
                      tolerance: float) -> Finding:
    label = f"{subj.label} ({subj.route}, variant {subj.variant})"
    if door.status == NA:
        return Finding("doorbell", f"{label}: not applicable: {door.reason}.",
                       {"status": NA})
    if door.pricing is None or pio.pricing is None:
        return Finding("doorbell", f"{label}: not priced: {door.reason or pio.reason}.",
                       {"status": door.status})
    ratio = door.cycles / pio.cycles
    diff, dvals = _difference_text(door, pio)
    entry = door.run.ept_entry
    clause = ENTRY_CLAUSE.get(entry or "", f"its EPT entry is {entry}")
    if door.walk_refs and door.tlb_misses and entry in ("not present", "misconfigured",
                                                         "read-only"):
        clause += ", so every write walks again"
    text = (f"{label}: {door.cycles:,.0f} cycles per doorbell, {ratio:.2f}x the PIO ioeventfd "
            f"({pio.cycles:,.0f}), {diff}. Per write: {_exits_text(door)}, "
            f"{_walk_clause(door)}; {clause}.")
    if door.per.get("kvm.emulate"):
        text += f" The write is emulated ({_n(door.per['kvm.emulate'])} x86_emulate_insn)."
    if door.status != OK:
        text += f" Its checks FAIL: {door.reason}."
    return Finding("doorbell", text, {
        "subject": subj.key, "variant": subj.variant, "route": subj.route,
        "cycles": door.cycles, "pio_cycles": pio.cycles, "ratio": ratio,
        "walk_refs": door.walk_refs, "tlb_misses": door.tlb_misses, "exits": door.exits,
        "ept_entry": entry, "as_fast": ratio <= 1 + tolerance, **dvals})


def _as_fast_finding(sc: Scenario, subs: list[Subject], points: dict, tolerance: float
                     ) -> Finding:
    yes, no, na = [], [], []
    for s in subs:
        if s.key == "pio":
            continue
        p = points[(s.key, sc.key)]
        if p.ratio is None:
            na.append(s.label)
        elif p.ratio <= 1 + tolerance:
            yes.append(f"{s.label} ({p.ratio:.2f}x)")
        else:
            no.append(f"{s.label} ({p.ratio:.2f}x)")
    pio = points[("pio", sc.key)]
    head = (f"Is MMIO as fast as port I/O? ({sc.label}; PIO ioeventfd {pio.cycles:,.0f} "
            f"cycles; 'as fast' = within {tolerance:.0%}) ")
    parts = []
    parts.append(f"yes for {', '.join(yes)}" if yes else "no MMIO doorbell is")
    if no:
        parts.append(f"no for {', '.join(no)}")
    if na:
        parts.append(f"not applicable: {', '.join(na)}")
    return Finding("as-fast", head + "; ".join(parts) + ".",
                   {"scenario": sc.key, "as_fast": [y.rsplit(' (', 1)[0] for y in yes],
                    "slower": [n.rsplit(' (', 1)[0] for n in no]})


def _scenario_cause(cells: list[Cell], sc: Scenario, base_cells: list[Cell]) -> list[str]:
    """Why a scenario differs from the base one, from what the models counted."""
    causes = []
    inv = max((c.per.get("inv.vmexit_novpid", 0) + c.per.get("inv.vmentry_novpid", 0)
               for c in cells), default=0)
    if inv:
        causes.append("with VPID off every VM exit and VM entry invalidates the combined "
                      f"mappings of VPID 0 (SDM 28.3.3.1; {_n(inv)} invalidations per "
                      "notification counted), so what was cached before an exit is walked "
                      "again after it")
    decode = [c for c in cells if c.per.get("kvm.skip.decode")]
    if decode:
        causes.append("KVM running as a guest skips the EPT-misconfiguration exit by decoding "
                      "the instruction (EMULTYPE_SKIP, kvm.skip.decode; the VM-exit "
                      "instruction length is undefined there, d391f1207067) for "
                      + ", ".join(sorted({c.variant for c in decode})))
    if sc.nested:
        causes.append("every exit is priced at the profile's nested round trip")
    if sc.caches != BASE.caches:
        more = [c.walk_refs - b.walk_refs for c, b in zip(cells, base_cells)
                if c.pricing and b.pricing]
        if more and max(more) > 0:
            causes.append(f"the {sc.caches} caches keep less, so walks grow by up to "
                          f"{_n(max(more))} references per notification")
    return causes


def _scenario_finding(sc: Scenario, subs: list[Subject], cells: dict, points: dict
                      ) -> Finding:
    items, same, vals = [], [], {}
    for s in subs:
        p, b = points[(s.key, sc.key)], points[(s.key, BASE.key)]
        if math.isnan(p.cycles) or (p.ratio is None and s.key != "pio"):
            continue
        vals[s.key] = {"cycles": p.cycles, "walk_refs": p.walk_refs, "ratio": p.ratio}
        if p.cycles == b.cycles and p.walk_refs == b.walk_refs:
            same.append(s.label)
            continue
        seg = (f"{s.label}: {p.cycles:,.0f} cycles (was {b.cycles:,.0f}), "
               f"{_n(p.walk_refs)} walk refs (was {_n(b.walk_refs)})")
        if s.key != "pio" and p.ratio is not None and b.ratio is not None:
            seg += f", {p.ratio:.2f}x PIO (was {b.ratio:.2f}x)"
        items.append(seg)
    here = [cells[(s.key, sc.key)] for s in subs]
    base = [cells[(s.key, BASE.key)] for s in subs]
    causes = _scenario_cause(here, sc, base)
    if not items:
        text = (f"Under {sc.label}: every doorbell costs what it costs under {BASE.label} "
                "(same cycles, same walk references: the loop touches a few pages, which "
                "these caches hold).")
    else:
        text = f"Under {sc.label} (against {BASE.label}): " + "; ".join(items)
        if same:
            text += f"; unchanged: {', '.join(same)}"
        text += "."
    if causes and items:
        text += " Why: " + "; ".join(causes) + "."
    return Finding("scenario", text, {"scenario": sc.key, "unchanged": same, **vals})


def _correctness_findings(main: Iterable[Cell]) -> list[Finding]:
    out = []
    by_variant: dict[str, list[Cell]] = {}
    for c in main:
        by_variant.setdefault(c.variant, []).append(c)
    for v, cells in by_variant.items():
        failed = [c for c in cells if c.status not in (OK, NA)]
        na = [c for c in cells if c.status == NA]
        label = LABELS.get(v, v)
        if failed:
            descs = []
            for c in failed:
                what = []
                per = c.per
                if c.run.route.expect.eventfd == 0 and per.get("kvm.eventfd.signal"):
                    what.append(f"the eventfd was signalled {_times(per['kvm.eventfd.signal'])}"
                                " per access")
                if c.run.route.access.is_read and any("read value" in f for f in c.failures()):
                    what.append("the load was skipped (the guest did not read the memory's "
                                "value)")
                detail = "; ".join(what) if what else "; ".join(c.failures()[:2])
                descs.append(f"{c.route} ({c.run.route.description}): {detail}")
            out.append(Finding("correctness", f"Correctness, {label}: "
                               + " | ".join(descs) + ".",
                               {"variant": v, "failed": [c.route for c in failed]}))
        else:
            out.append(Finding("correctness", f"Correctness, {label}: every applicable route "
                               f"passes its checks ({len(cells) - len(na)} routes"
                               + (f"; not applicable: {', '.join(c.route for c in na)}"
                                  if na else "") + ").",
                               {"variant": v, "failed": [], "na": [c.route for c in na]}))
    return out


def _demand_fault_finding(main: Iterable[Cell]) -> Finding | None:
    touch = [c for c in main if c.route == "page-touch" and c.pricing is not None]
    if not touch:
        return None
    parts, vals = [], {}
    for c in touch:
        faults = c.per.get("exit.EPT_VIOLATION", 0.0)
        bus = c.per.get("kvm.bus.lookup.KVM_FAST_MMIO_BUS", 0.0)
        vals[c.variant] = {"faults": faults, "fast_bus_lookups": bus, "cycles": c.cycles}
        if faults:
            parts.append(f"{LABELS.get(c.variant, c.variant)} {_n(bus / faults)} "
                         f"KVM_FAST_MMIO_BUS look-ups per fault ({c.cycles:,.0f} cycles per "
                         "iteration)")
    if not parts:  # the warm-up batch took the faults: fastmmio.review measures them
        return None
    return Finding("demand-faults", "Demand faults (page-touch, each an EPT violation): "
                   + "; ".join(parts) + ".", vals)


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
                  on_review: Callable[[str], None] | None = None) -> Verdict:
    """Compute the verdict for ``variants`` (simulating what is still missing), with the
    correctness findings of ``main`` (the compare run's cells). ``review``: also run the
    checks of :mod:`fastmmio.review` (timed as ``review`` in the comparison's timings;
    ``on_review(variant)`` is called before each variant's)."""
    variants = list(variants)
    main = list(main)
    subs = subjects(variants)
    scs = scenarios_for(comparison)
    cells: dict[tuple[str, str], Cell] = {}
    points: dict[tuple[str, str], Point] = {}
    for sc in scs:
        for s in subs:
            c = comparison.cell(s.route, sc.options(s.variant), sc.key)
            cells[(s.key, sc.key)] = c
            points[(s.key, sc.key)] = _point(comparison, c)
    findings: list[Finding] = []
    pio_base = cells[("pio", BASE.key)]
    findings.append(Finding(
        "pio", f"PIO ioeventfd ({PIO_REFERENCE}, {BASE.label}): {pio_base.cycles:,.0f} "
        f"cycles; per OUT: {_exits_text(pio_base)}, "
        + (_walk_clause(pio_base) if pio_base.walk_refs else
           "no walk reference for the doorbell (a port is not translated)") + ".",
        {"cycles": pio_base.cycles, "walk_refs": pio_base.walk_refs}))
    for s in subs:
        if s.key == "pio":
            continue
        findings.append(_doorbell_finding(comparison, s, cells[(s.key, BASE.key)],
                                          comparison.cell(PIO_REFERENCE, BASE.options(s.variant),
                                                          BASE.key), tolerance))
    for sc in scs:
        findings.append(_as_fast_finding(sc, subs, points, tolerance))
    for sc in scs[1:]:
        findings.append(_scenario_finding(sc, subs, cells, points))
    if not comparison.can_price_nested():
        findings.append(Finding("scenario", f"KVM nested: not priced: profile "
                                f"{comparison.profile.name} has no [nested] table.", {}))
    findings.extend(_correctness_findings(main))
    df = _demand_fault_finding(main)
    if df is not None:
        findings.append(df)
    if review:
        with comparison.timings.measure("review"):
            rv, note = review_findings(variants, BASE.options, on_review)
    else:
        rv, note = [], "review checks not run (--no-review)"
    findings.extend(_review_summary(rv))
    findings.append(_bottom_line(subs, scs, points, tolerance, main, rv))
    return Verdict(tolerance, scs, subs, points, findings, rv, note)


def _review_summary(rv: list[ReviewFinding]) -> list[Finding]:
    """One sentence per variant: which of the review's properties it lacks, and the
    measurement that shows it."""
    out = []
    by_variant: dict[str, list[ReviewFinding]] = {}
    for r in rv:
        by_variant.setdefault(r.variant, []).append(r)
    for v, checks in by_variant.items():
        lacking = [r for r in checks if r.passed is False]
        label = LABELS.get(v, v)
        if lacking:
            text = (f"Review checks (fastmmio.review, on the RFC's doorbell ro-write-eventfd "
                    f"and its read ro-read-eventfd), {label}: lacks " + "; ".join(
                f"'{r.claim}' ({r.source}: {r.detail})" for r in lacking) + ".")
        else:
            n = len([r for r in checks if r.passed is not None])
            text = (f"Review checks (fastmmio.review), {label}: has "
                    + ("the one applicable property" if n == 1 else
                       f"all {n} applicable properties") + " the review asked for")
            na = [r.name for r in checks if r.passed is None]
            text += f" (not applicable: {', '.join(na)})." if na else "."
        out.append(Finding("review", text, {"variant": v,
                                            "lacking": [r.name for r in lacking]}))
    return out


def _bottom_line(subs: list[Subject], scs: tuple[Scenario, ...], points: dict,
                 tolerance: float, main: list[Cell], rv: list[ReviewFinding]) -> Finding:
    fast_everywhere, fast_base, slow = [], [], []
    for s in subs:
        if s.key == "pio":
            continue
        rs = [points[(s.key, sc.key)].ratio for sc in scs]
        if rs[0] is None:
            continue
        if all(r is not None and r <= 1 + tolerance for r in rs):
            fast_everywhere.append(s.label)
        elif rs[0] <= 1 + tolerance:
            where = [f"{r:.2f}x {sc.key}" for r, sc in zip(rs, scs)
                     if r is not None and r > 1 + tolerance]
            fast_base.append(f"{s.label} (but {', '.join(where)})")
        else:
            slow.append(f"{s.label} ({rs[0]:.2f}x)")
    wrong = sorted({LABELS.get(c.variant, c.variant) for c in main if c.status not in (OK, NA)}
                   | {LABELS.get(r.variant, r.variant) for r in rv
                      if r.passed is False and r.source == "correctness"})
    parts = []
    if fast_everywhere:
        parts.append("as fast as port I/O under every setting: " + ", ".join(fast_everywhere))
    if fast_base:
        parts.append(f"as fast under {BASE.label}, not under every setting: "
                     + ", ".join(fast_base))
    if slow:
        parts.append("slower than port I/O already there: " + ", ".join(slow))
    if wrong:
        parts.append("incorrect for some guest access: " + ", ".join(wrong))
    cached = [LABELS.get(r.variant, r.variant) for r in rv
              if r.name == "write-translation-cached" and r.passed]
    if rv:
        parts.append("a doorbell write served by a cached translation (the RFC's premise): "
                     + (", ".join(cached) if cached else "under no variant"))
    return Finding("bottom-line", f"Bottom line (tolerance {tolerance:.0%}): "
                   + "; ".join(parts) + ".",
                   {"fast_everywhere": fast_everywhere, "fast_base_only": fast_base,
                    "slow": slow, "incorrect": wrong})
