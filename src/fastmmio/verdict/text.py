"""The verdict's sentences, written from a :class:`~fastmmio.verdict.judge.Judgement`.

Every figure, ratio and yes/no comes from the judgement (which took each ratio against the
same setting's PIO cell and applied the tolerance once); this module only puts them into
words, and reads the cells' event counts for the *why* (exits, walk references, EPT entry).

The SDM rules quoted (Vol. 3C, 2016 edition): 28.3.2 (no guest-physical or combined mapping is
created from an EPT entry that is not present or misconfigured), 28.3.3.1 (an EPT violation
invalidates the mappings used to translate its address, paging-structure-cache entries
included; with "enable VPID" = 0 every VM entry and exit invalidates the combined mappings of
VPID 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from fastmmio.compare.core import NA, OK, PIO_REFERENCE, Cell
from fastmmio.costs.linear import BreakEven
from fastmmio.costs.profile import Profile
from fastmmio.verdict.judge import AS_FAST, INCORRECT, SLOWER, Judgement
from fastmmio.verdict.scenarios import BASE, Scenario, Subject, label, skip_rule

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
WALK_LEVELS = ("pml4e", "pdpte", "pde", "pte")


@dataclass(frozen=True)
class Finding:
    """One sentence of the verdict, with the values it was generated from."""

    topic: str
    text: str
    values: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# numbers to words
# ------------------------------------------------------------------------------------------


def _n(x: float) -> str:
    """A count per notification: 1, 0.5, 7, 24."""
    return f"{x:.2f}".rstrip("0").rstrip(".") if not float(x).is_integer() else f"{int(x)}"


def _c(x: float) -> str:
    """A price in cycles: 175, 0.4, 1,170."""
    return f"{x:,.0f}" if abs(x) >= 10 or float(x).is_integer() else f"{x:.2g}"


def _times(x: float) -> str:
    return "once" if x == 1 else f"{_n(x)} times"


def exits_text(cell: Cell) -> str:
    parts = [f"{_n(v)} {EXIT_NAMES.get(k, k.replace('_', ' ').lower())} exit"
             + ("s" if v != 1 else "") for k, v in cell.exit_reasons().items() if v]
    return " + ".join(parts) if parts else "no exit"


def walk_clause(cell: Cell) -> str:
    if not cell.walk_refs:
        return "no walk reference (the translation is cached)"
    psc_hits = sum(v for k, v in cell.per.items() if k.startswith("psc.") and k.endswith(".hit"))
    s = (f"{_n(cell.walk_refs)} walk references per write (TLB {_n(cell.tlb_hits)} hits / "
         f"{_n(cell.tlb_misses)} misses)")
    if psc_hits:
        s += f", cut by {_n(psc_hits)} paging-structure-cache hits"
    return s


def walk_split(cell: Cell) -> tuple[float, float]:
    """Of a walk's references, (upper, leaves): the leaves are the deepest level each
    structure (guest tables, EPT) was read at; the upper ones are those a paging-structure
    cache would have served had the EPT violation not invalidated its entries (SDM 28.3.3.1)."""
    upper = leaves = 0.0
    for struct in ("guest", "ept"):
        counts = [cell.per.get(f"walk.ref.{struct}.{lv}", 0.0) for lv in WALK_LEVELS]
        deepest = max((i for i, c in enumerate(counts) if c), default=None)
        if deepest is None:
            continue
        leaves += counts[deepest]
        upper += sum(counts) - counts[deepest]
    return upper, leaves


def single_phrase(s) -> str:
    """One price alone: 'is above 175 cycles (estimate 150, interval 100-300)'."""
    return (f"`{s.price}` is {s.direction} {_c(s.value)} cycles ({s.basis} {_c(s.nominal)}, "
            f"interval {_c(s.low)}-{_c(s.high)})")


def flip_phrase(be: BreakEven | None) -> str:
    """How far the prices must move to change a statement: the nearest single prices (at
    most two named) and the cheapest combination (see :mod:`fastmmio.costs.linear`)."""
    if be is None:
        return "no price moves it (the same event vectors on both sides)"
    inside = be.flips_within()
    if inside:
        head = "flips if " + ", or if ".join(single_phrase(s) for s in inside[:2])
        if len(inside) > 2:
            head += f" (or {len(inside) - 2} other single price"
            head += "s)" if len(inside) > 3 else ")"
    else:
        head = "no single price flips it within its interval"
    comb = be.combination
    if not comb.feasible:
        return head + "; no combination within the intervals does"
    if inside and len(comb.moves) == 1:
        return head
    moves = sorted(comb.moves.items(), key=lambda kv: -abs(kv[1][1] - kv[1][0]))
    shown = ", ".join(f"`{k}` {_c(a)}->{_c(b)}" for k, (a, b) in moves[:3])
    more = f" and {len(moves) - 3} more" if len(moves) > 3 else ""
    return head + f"; cheapest combination: {shown}{more}"


def flip_brief(be: BreakEven | None) -> str:
    """:func:`flip_phrase` for a table cell: the nearest single price that flips the
    statement inside its interval ('`exit.ept_violation` > 175'), else why none does."""
    if be is None:
        return "no price"
    inside = be.flips_within()
    if not inside:
        return "none in range"
    s = inside[0]
    return f"{s.price} {'>' if s.direction == 'above' else '<'} {_c(s.value)}"


def _uncertainty_phrase(point, detail: bool = True) -> str:
    u = point.uncertainty
    if not u or "share_as_fast" not in u:
        return ""
    s = f"as fast in {u['share_as_fast']:.0%} of plausible price sets"
    if detail:
        s += (f" (median {u['ratio_median']:.2f}x, 90% {u['ratio_p05']:.2f}-"
              f"{u['ratio_p95']:.2f}x)")
    return s


# ------------------------------------------------------------------------------------------
# sentences
# ------------------------------------------------------------------------------------------


def _delta_items(a: Cell, b: Cell) -> dict[str, float]:
    """Per price id: a's cycles per notification minus b's."""
    out: dict[str, float] = {}
    for cell, sign in ((a, 1.0), (b, -1.0)):
        assert cell.pricing is not None
        n = cell.pricing.iterations
        for item in cell.pricing.items:
            if item.free:
                continue
            pid = f"nested:{item.key}" if item.nested_rule == "override" else item.key
            out[pid] = out.get(pid, 0.0) + sign * item.cycles / n
    return {k: v for k, v in out.items() if abs(v) >= 0.5}


def difference_text(door: Cell, pio: Cell, profile: Profile) -> tuple[str, dict[str, float]]:
    """Where the doorbell's cycles differ from PIO's, by component, and how much of that
    rests on estimated prices: an estimate itself, or a price derived from one (its
    ``depends``, followed by :meth:`Profile.estimate_roots`)."""
    comps = {c: door.breakdown.get(c, 0.0) - pio.breakdown.get(c, 0.0) for c in door.breakdown}
    big = sorted(((c, d) for c, d in comps.items() if abs(d) >= 0.5), key=lambda x: -abs(x[1]))
    delta = door.cycles - pio.cycles
    parts = ", ".join(f"{c} {d:+,.0f}" for c, d in big[:4])
    items = _delta_items(door, pio)
    leaning = {k: d for k, d in items.items() if profile.estimate_roots(k)}
    est = sum(abs(d) for d in leaning.values())
    total = sum(abs(d) for d in items.values()) or 1.0
    text = f"{delta:+,.0f} cycles ({parts})" if parts else f"{delta:+,.0f} cycles"
    share = est / total
    if big and share >= 0.5:
        keys = sorted(leaning, key=lambda k: -abs(leaning[k]))[:3]
        named = [k if profile.price_entry(k).basis == "estimate" else f"{k}, derived from "
                 + ", ".join(profile.estimate_roots(k)) for k in keys]
        text += (f"; {share:.0%} of the difference rests on estimated prices "
                 f"({'; '.join(named)})")
    return text, {"delta_cycles": delta, "estimate_share": share,
                  "estimate_keys": sorted(leaning),
                  **{f"delta_{c}": d for c, d in comps.items()}}


def _entry_clause(door: Cell) -> str:
    entry = door.run.ept_entry
    clause = ENTRY_CLAUSE.get(entry or "", f"its EPT entry is {entry}")
    inv = door.per.get("inv.ept_violation", 0.0)
    if entry == "not present" and inv and door.walk_refs:
        upper, leaves = walk_split(door)
        if upper:
            clause += (f"; of its {_n(door.walk_refs)} walk references, {_n(leaves)} (the "
                       "leaves) follow from that, and "
                       f"{_n(upper)} (the upper levels) from the EPT violation itself, which "
                       "invalidates the paging-structure-cache entries used to translate "
                       f"the address (SDM 28.3.3.1; {_n(inv)} per write counted)")
    if door.walk_refs and door.tlb_misses and entry in ("not present", "misconfigured",
                                                         "read-only"):
        clause += ", so every write walks again"
    return clause


def pio_finding(j: Judgement) -> Finding:
    pio = j.cells[("pio", BASE.key)]
    return Finding(
        "pio", f"PIO ioeventfd ({PIO_REFERENCE}, {BASE.label}): {pio.cycles:,.0f} "
        f"cycles; per OUT: {exits_text(pio)}, "
        + (walk_clause(pio) if pio.walk_refs else
           "no walk reference for the doorbell (a port is not translated)") + ".",
        {"cycles": pio.cycles, "walk_refs": pio.walk_refs})


def doorbell_finding(j: Judgement, subj: Subject, profile: Profile) -> Finding:
    door, pio = j.cells[(subj.key, BASE.key)], j.pio_cells[(subj.key, BASE.key)]
    p = j.point(subj.key)
    name = f"{subj.label} ({subj.route}, variant {subj.variant})"
    if door.status == NA:
        return Finding("doorbell", f"{name}: not applicable: {door.reason}.", {"status": NA})
    if p.ratio is None:
        return Finding("doorbell", f"{name}: not priced: {door.reason or pio.reason}.",
                       {"status": door.status})
    diff, dvals = difference_text(door, pio, profile)
    answer = {AS_FAST: "as fast as port I/O", SLOWER: "slower than port I/O",
              INCORRECT: "incorrect (its checks fail)"}[p.judged]
    text = (f"{name}: {door.cycles:,.0f} cycles per doorbell, {p.ratio:.2f}x the PIO "
            f"ioeventfd ({pio.cycles:,.0f}): {answer}")
    st = j.statement("as-fast", BASE.key, subj.key)
    if st is not None:
        text += f"; {flip_phrase(st.breakeven)}"
    unc = _uncertainty_phrase(p)
    if unc:
        text += f"; {unc}"
    text += (f". {diff}. Per write: {exits_text(door)}, {walk_clause(door)}; "
             f"{_entry_clause(door)}.")
    if door.per.get("kvm.emulate"):
        text += f" The write is emulated ({_n(door.per['kvm.emulate'])} x86_emulate_insn)."
    if door.status != OK:
        text += f" Its checks FAIL: {door.reason}."
    return Finding("doorbell", text, {
        "subject": subj.key, "variant": subj.variant, "route": subj.route,
        "cycles": door.cycles, "pio_cycles": pio.cycles, "ratio": p.ratio,
        "walk_refs": door.walk_refs, "tlb_misses": door.tlb_misses, "exits": door.exits,
        "ept_entry": door.run.ept_entry, "as_fast": p.as_fast, "judged": p.judged, **dvals})


def as_fast_finding(j: Judgement, sc: Scenario, profile: Profile) -> Finding:
    groups = j.lists(sc.key)
    subs = {s.key: s for s in j.subjects}

    def item(key: str) -> str:
        p = j.point(key, sc.key)
        s = f"{subs[key].label} ({p.ratio:.2f}x"
        unc = _uncertainty_phrase(p, detail=False)
        if unc:
            s += f"; {unc}"
        st = j.statement("as-fast", sc.key, key)
        if st is not None:
            s += f"; {flip_phrase(st.breakeven)}"
        if sc.nested != "off" and not subs[key].is_pio:
            s += f"; {skip_rule(subs[key].variant)}"
        return s + ")"

    pio = j.point("pio", sc.key)
    head = (f"Is MMIO as fast as port I/O? ({sc.label}; PIO ioeventfd {pio.cycles:,.0f} "
            f"cycles; 'as fast' = within {j.tolerance:.0%}) ")
    parts = [f"yes for {', '.join(item(k) for k in groups[AS_FAST])}" if groups[AS_FAST]
             else "no MMIO doorbell is"]
    if groups[SLOWER]:
        parts.append(f"no for {', '.join(item(k) for k in groups[SLOWER])}")
    if groups[INCORRECT]:
        def bad(k: str) -> str:
            r = j.point(k, sc.key).ratio
            what = f"{r:.2f}x" if r is not None else "its run fails"
            if sc.nested != "off":
                what += f"; {skip_rule(subs[k].variant)}"
            return f"{subs[k].label} ({what})"
        parts.append("incorrect (checks fail): " + ", ".join(bad(k) for k in groups[INCORRECT]))
    if groups[NA]:
        parts.append(f"not applicable: {', '.join(subs[k].label for k in groups[NA])}")
    return Finding("as-fast", head + "; ".join(parts) + ".",
                   {"scenario": sc.key, "tolerance": j.tolerance,
                    "as_fast": [subs[k].label for k in groups[AS_FAST]],
                    "slower": [subs[k].label for k in groups[SLOWER]],
                    "incorrect": [subs[k].label for k in groups[INCORRECT]]})


def ordering_finding(j: Judgement, profile: Profile) -> Finding | None:
    orders = [st for st in j.statements if st.kind == "ordering"]
    if not orders:
        return None
    subs = {s.key: s for s in j.subjects}
    first = orders[0].subject
    chain = [f"{subs[first].label} ({j.point(first).cycles:,.0f})"]
    flips = []
    for st in orders:
        b = subs[st.other]
        chain.append(f"{b.label} ({j.point(st.other).cycles:,.0f})")
        if st.value == 0 and st.breakeven is None:
            continue
        flips.append(f"{subs[st.subject].label} before {b.label} "
                     f"({st.value:+,.0f} cycles): {flip_phrase(st.breakeven)}")
    text = (f"Ordering of the doorbells ({BASE.label}), cheapest first: "
            + " <= ".join(chain) + ".")
    if flips:
        text += " Each step: " + "; ".join(flips) + "."
    return Finding("ordering", text, {"order": [orders[0].subject] + [s.other for s in orders]})


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
    if sc.nested != "off":
        ept12 = max((c.per.get("nested.ept12.ref", 0) for c in cells), default=0)
        causes.append(f"every exit goes through L0 {sc.nested} (fastmmio.sim.nested): the L2 "
                      "exit, for EPT exits L0's software walk of KVM's EPT12 (up to "
                      f"{_n(ept12)} references), the exit L0 synthesizes for KVM, KVM's "
                      "VMRESUME trapped and L2 entered again, each priced as nested.*")
    if sc.caches != BASE.caches:
        more = [c.walk_refs - b.walk_refs for c, b in zip(cells, base_cells)
                if c.pricing and b.pricing]
        if more and max(more) > 0:
            causes.append(f"the {sc.caches} caches keep less, so walks grow by up to "
                          f"{_n(max(more))} references per notification")
    return causes


def scenario_finding(j: Judgement, sc: Scenario) -> Finding:
    items, same, vals = [], [], {}
    for s in j.subjects:
        p, b = j.point(s.key, sc.key), j.point(s.key, BASE.key)
        if math.isnan(p.cycles) or (p.ratio is None and not s.is_pio):
            continue
        vals[s.key] = {"cycles": p.cycles, "walk_refs": p.walk_refs, "ratio": p.ratio}
        if p.cycles == b.cycles and p.walk_refs == b.walk_refs:
            same.append(s.label)
            continue
        seg = (f"{s.label}: {p.cycles:,.0f} cycles (was {b.cycles:,.0f}), "
               f"{_n(p.walk_refs)} walk refs (was {_n(b.walk_refs)})")
        if not s.is_pio and p.ratio is not None and b.ratio is not None:
            seg += f", {p.ratio:.2f}x PIO (was {b.ratio:.2f}x)"
        items.append(seg)
    here = [j.cells[(s.key, sc.key)] for s in j.subjects]
    base = [j.cells[(s.key, BASE.key)] for s in j.subjects]
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


def correctness_findings(main: Iterable[Cell]) -> list[Finding]:
    out = []
    by_variant: dict[str, list[Cell]] = {}
    for c in main:
        by_variant.setdefault(c.variant, []).append(c)
    for v, cells in by_variant.items():
        failed = [c for c in cells if c.status not in (OK, NA)]
        na = [c for c in cells if c.status == NA]
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
            out.append(Finding("correctness", f"Correctness, {label(v)}: "
                               + " | ".join(descs) + ".",
                               {"variant": v, "failed": [c.route for c in failed]}))
        else:
            out.append(Finding("correctness", f"Correctness, {label(v)}: every applicable "
                               f"route passes its checks ({len(cells) - len(na)} routes"
                               + (f"; not applicable: {', '.join(c.route for c in na)}"
                                  if na else "") + ").",
                               {"variant": v, "failed": [], "na": [c.route for c in na]}))
    return out


def demand_fault_finding(main: Iterable[Cell]) -> Finding | None:
    touch = [c for c in main if c.route == "page-touch" and c.pricing is not None]
    if not touch:
        return None
    parts, vals = [], {}
    for c in touch:
        faults = c.per.get("exit.EPT_VIOLATION", 0.0)
        bus = c.per.get("kvm.bus.lookup.KVM_FAST_MMIO_BUS", 0.0)
        vals[c.variant] = {"faults": faults, "fast_bus_lookups": bus, "cycles": c.cycles}
        if faults:
            parts.append(f"{label(c.variant)} {_n(bus / faults)} "
                         f"KVM_FAST_MMIO_BUS look-ups per fault ({c.cycles:,.0f} cycles per "
                         "iteration)")
    if not parts:  # the warm-up batch took the faults: fastmmio.review measures them
        return None
    return Finding("demand-faults", "Demand faults (page-touch, each an EPT violation): "
                   + "; ".join(parts) + ".", vals)


def review_summary(rv) -> list[Finding]:
    """One sentence per variant: which of the review's properties it lacks, and the
    measurement that shows it."""
    out = []
    by_variant: dict[str, list] = {}
    for r in rv:
        by_variant.setdefault(r.variant, []).append(r)
    for v, checks in by_variant.items():
        lacking = [r for r in checks if r.passed is False]
        if lacking:
            text = (f"Review checks (fastmmio.review, on the RFC's doorbell ro-write-eventfd "
                    f"and its read ro-read-eventfd), {label(v)}: lacks " + "; ".join(
                f"'{r.claim}' ({r.source}: {r.detail})" for r in lacking) + ".")
        else:
            n = len([r for r in checks if r.passed is not None])
            text = (f"Review checks (fastmmio.review), {label(v)}: has "
                    + ("the one applicable property" if n == 1 else
                       f"all {n} applicable properties") + " the review asked for")
            na = [r.name for r in checks if r.passed is None]
            text += f" (not applicable: {', '.join(na)})." if na else "."
        out.append(Finding("review", text, {"variant": v,
                                            "lacking": [r.name for r in lacking]}))
    return out


def bottom_line(j: Judgement, rv) -> Finding:
    groups = j.bottom()
    subs = {s.key: s for s in j.subjects}
    parts = []
    if groups["fast_everywhere"]:
        parts.append("as fast as port I/O under every setting: "
                     + ", ".join(subs[k].label for k in groups["fast_everywhere"]))
    if groups["fast_base_only"]:
        descs = []
        for k in groups["fast_base_only"]:
            where = [(f"{j.point(k, sc.key).ratio:.2f}x" if j.point(k, sc.key).ratio is not None
                      else "incorrect") + f" {sc.key}" for sc in j.scenarios
                     if j.judged(k, sc.key) not in (AS_FAST, NA)]
            descs.append(f"{subs[k].label} (but {', '.join(where)})")
        parts.append(f"as fast under {BASE.label}, not under every setting: " + ", ".join(descs))
    if groups["slow"]:
        parts.append("slower than port I/O already there: " + ", ".join(
            f"{subs[k].label} ({j.point(k).ratio:.2f}x)" for k in groups["slow"]))
    if groups["incorrect"]:
        parts.append("incorrect for some guest access: "
                     + ", ".join(label(v) for v in groups["incorrect"]))
    cached = [label(r.variant) for r in rv if r.name == "write-translation-cached" and r.passed]
    if rv:
        parts.append("a doorbell write served by a cached translation (the RFC's premise): "
                     + (", ".join(cached) if cached else "under no variant"))
    return Finding("bottom-line", f"Bottom line (tolerance {j.tolerance:.0%}): "
                   + "; ".join(parts) + ".",
                   {"fast_everywhere": [subs[k].label for k in groups["fast_everywhere"]],
                    "fast_base_only": [subs[k].label for k in groups["fast_base_only"]],
                    "slow": [subs[k].label for k in groups["slow"]],
                    "incorrect": [label(v) for v in groups["incorrect"]]})


def findings(j: Judgement, profile: Profile, main: list[Cell], rv, *, nested_priced: bool
             ) -> list[Finding]:
    """Every sentence, in order."""
    out = [pio_finding(j)]
    out += [doorbell_finding(j, s, profile) for s in j.subjects if not s.is_pio]
    out += [as_fast_finding(j, sc, profile) for sc in j.scenarios]
    order = ordering_finding(j, profile)
    if order is not None:
        out.append(order)
    out += [scenario_finding(j, sc) for sc in j.scenarios[1:]]
    if not nested_priced:
        out.append(Finding("scenario", f"KVM nested: not priced: profile {profile.name} has "
                           "no [nested] table.", {}))
    out += correctness_findings(main)
    df = demand_fault_finding(main)
    if df is not None:
        out.append(df)
    out += review_summary(rv)
    out.append(bottom_line(j, rv))
    return out
