"""The thread's question on AMD (part of the verdict package; its tolerance rule and ratio are
the package's own: :func:`fastmmio.verdict.judge.classify`, :func:`fastmmio.compare.core.ratio`): "Is MMIO as fast as port I/O?" under KVM on SVM, before and
after 01cde4eaaeca and under the RFC's 2/3, from the numbers of the same compare run.

For each SVM variant its MMIO doorbell (the length-0 ``KVM_FAST_MMIO_BUS`` ioeventfd for
``svm-pre-7.0`` and ``svm``; an ioeventfd over a read-only memslot for ``rfc-2015-svm``,
which advertises ``KVM_CAP_IOEVENTFD_PF``) is simulated next to the port-I/O ioeventfd under
the same machine setting (:data:`SVM_SCENARIOS`: the APM's maximum caching, Zen 4-sized
caches, no translation caching, and ``svm`` on a processor that leaves next RIP zero on #NPF,
as APM 15.7.1 reads), priced with the SVM profile, and the sentences are generated from
cycles, ratios, exits, walk references and the doorbell's NPT entry. ``rfc-2015-svm`` also
gets the checks :mod:`fastmmio.review` makes of 1/3: a read of the doorbell (route
``ro-read-eventfd``), the doorbell's NPT entry after steady-state writes, bus look-ups on
ordinary demand faults (route ``page-touch``).

RFC 2/3's body was not recovered; it is modelled as the exact analogue of 1/3
(:class:`fastmmio.sim.kvm.variants.Rfc2015Svm`), and the text says so.

The APM rules quoted: 15.7.1 (next RIP is reset to zero for intercepts it does not list,
#NPF among them), 15.25.6 (a reserved bit in a nested entry is a #NPF with RSV), 15.16 (no
TLB entry is said to be made from a not-present or reserved nested entry: the processor
model's named assumption, ``nested_fault_caching``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastmmio.compare.core import PIO_REFERENCE, Cell, Comparison, ratio, sim_options
from fastmmio.sim.backend import SimOptions
from fastmmio.sim.kvm.variants import SVM_VARIANTS
from fastmmio.verdict.build import review_findings
from fastmmio.verdict.judge import AS_FAST, INCORRECT, classify

LABELS = {
    "svm-pre-7.0": "KVM on SVM before 7.0 (no fast MMIO on SVM)",
    "svm": "KVM on SVM with 01cde4eaaeca (Linux 7.0)",
    "rfc-2015-svm": "RFC 2/3 (modelled as 1/3's analogue)",
}

ENTRY_CLAUSE = {
    "not present": "its NPT entry stays not present (no SPTE is installed for the page), so "
                   "every write walks both dimensions to the fault again",
    "reserved": "its NPT entry is KVM's MMIO SPTE (reserved bit set: every access is a #NPF "
                "with RSV, APM 15.25.6), from which nothing is cached",
    "read-only": "its NPT entry is present but read-only",
    "read/write": "its NPT entry is present and writable",
}


@dataclass(frozen=True)
class SvmScenario:
    key: str
    label: str
    caches: str
    next_rip_on_npf: str = "yes"

    def options(self, variant: str) -> SimOptions:
        return sim_options(variant, self.caches, next_rip_on_npf=self.next_rip_on_npf)


SVM_SCENARIOS = (
    SvmScenario("apm-max", "APM maximum caching, next RIP on #NPF", "apm-max"),
    SvmScenario("zen4", "Zen 4-sized caches, next RIP on #NPF", "zen4"),
    SvmScenario("none", "no translation caching, next RIP on #NPF", "none"),
    SvmScenario("no-nrip", "APM maximum caching, next RIP zero on #NPF (APM 15.7.1)",
                "apm-max", "no"),
)


def doorbell_route(variant: str) -> str:
    return "ro-write-eventfd" if SVM_VARIANTS[variant].ioeventfd_pf_cap else "mmio-eventfd-len0"


def required(variants: list[str]) -> list[tuple[str, SimOptions, str]]:
    """The simulations the AMD answer needs: (route, options, scenario key)."""
    out = []
    for sc in SVM_SCENARIOS:
        for v in variants:
            out.append((doorbell_route(v), sc.options(v), f"svm:{sc.key}"))
            out.append((PIO_REFERENCE, sc.options(v), f"svm:{sc.key}"))
    return out


@dataclass
class SvmVerdict:
    tolerance: float
    lines: list[str] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance, "lines": self.lines, "points": self.points}


def _estimated_share(door: Cell, pio: Cell) -> tuple[float, list[str]]:
    """The part of the cycle difference priced by estimates, and those price keys."""
    def per_key(c: Cell) -> dict[str, tuple[float, str]]:
        out: dict[str, tuple[float, str]] = {}
        it = c.pricing.iterations if c.pricing else 1
        for i in (c.pricing.items if c.pricing else ()):
            cyc, _ = out.get(i.key, (0.0, i.basis))
            out[i.key] = (cyc + i.cycles / it, i.basis)
        return out

    d, p = per_key(door), per_key(pio)
    diff = door.cycles - pio.cycles
    est = 0.0
    keys = []
    for k in set(d) | set(p):
        delta = d.get(k, (0.0, ""))[0] - p.get(k, (0.0, ""))[0]
        basis = d.get(k, p.get(k, (0.0, "")))[1]
        if basis == "estimate" and delta:
            est += delta
            if delta > 0:
                keys.append(k)
    return (est / diff if diff > 0 else 0.0), sorted(keys)


def _components(door: Cell, pio: Cell) -> str:
    parts = []
    for comp, v in door.breakdown.items():
        delta = v - pio.breakdown.get(comp, 0.0)
        if abs(delta) >= 0.5:
            parts.append(f"{comp} {delta:+,.0f}")
    return ", ".join(parts) or "nothing"


def build_svm_verdict(comparison: Comparison, variants: list[str],
                      tolerance: float) -> SvmVerdict:
    """The sentences (see the module docstring); ``variants``: the SVM variants asked for."""
    v_out = SvmVerdict(tolerance)
    variants = [v for v in variants if v in SVM_VARIANTS]
    if not variants:
        return v_out
    prof = comparison.profile_for("svm").name
    for sc in SVM_SCENARIOS:
        yes, no = [], []
        pio_cycles = None
        for v in variants:
            door = comparison.cell(doorbell_route(v), sc.options(v), f"svm:{sc.key}")
            pio = comparison.cell(PIO_REFERENCE, sc.options(v), f"svm:{sc.key}")
            if door.pricing is None or pio.pricing is None:
                no.append(f"{LABELS[v]} (not run: {door.reason or pio.reason or door.price_error})")
                continue
            pio_cycles = pio.cycles
            r = ratio(door, pio)
            judged = classify(door.status, r, tolerance)  # the one tolerance rule
            fast = judged == AS_FAST
            (yes if fast else no).append(f"{LABELS[v]} ({r:.2f}x"
                                          + (", its checks fail)" if judged == INCORRECT else ")"))
            share, est_keys = _estimated_share(door, pio)
            point = {"scenario": sc.key, "variant": v, "route": door.route,
                     "cycles": door.cycles, "pio_cycles": pio.cycles, "ratio": r,
                     "judged": judged, "as_fast": fast, "exits": door.exits, "walk_refs": door.walk_refs,
                     "entry": door.run.ept_entry, "correct": door.correct,
                     "estimated_share": share, "profile": prof}
            v_out.points.append(point)
            if sc is SVM_SCENARIOS[0] or (sc.key == "no-nrip" and v == "svm"):
                reasons = ", ".join(f"{k.removeprefix('exit.')} x{n:g}"
                                    for k, n in door.exit_reasons().items()) or "no exit"
                steps = _path(door)
                text = (f"- {LABELS[v]} ({door.route}, variant {v}; {sc.label}): "
                        f"{door.cycles:,.0f} cycles per doorbell, {r:.2f}x the PIO "
                        f"ioeventfd ({pio.cycles:,.0f}), {door.cycles - pio.cycles:+,.0f} "
                        f"cycles ({_components(door, pio)})"
                        + ((f"; {share:.0%} of the difference rests on estimated prices"
                            + (f" ({', '.join(est_keys)})" if est_keys else ""))
                           if door.cycles > pio.cycles else "")
                        + f". Per write: {reasons}, {door.walk_refs:g} walk references; "
                        f"{steps}; " + ENTRY_CLAUSE.get(door.run.ept_entry or "",
                                                        f"its NPT entry is {door.run.ept_entry}")
                        + ".")
                if v == "rfc-2015-svm":
                    text += (" RFC 2/3's patch body was not recovered: this is the exact "
                             "analogue of 1/3 (a fast-bus write at the top of every #NPF).")
                if not door.correct:
                    text += f" Its checks failed: {'; '.join(door.failures())}."
                v_out.lines.append(text)
        if yes or no:
            head = (f"- Is MMIO as fast as port I/O on AMD? ({sc.label}; PIO ioeventfd "
                    f"{pio_cycles:,.0f} cycles; 'as fast' = within {tolerance:.0%}; profile "
                    f"{prof}) " if pio_cycles is not None else
                    f"- Is MMIO as fast as port I/O on AMD? ({sc.label}) ")
            body = []
            if yes:
                body.append("yes for " + ", ".join(yes))
            if no:
                body.append("no for " + ", ".join(no))
            v_out.lines.append(head + "; ".join(body) + ".")
    if "rfc-2015-svm" in variants:
        v_out.lines += _rfc_review()
    return v_out


def _path(door: Cell) -> str:
    ev = door.per
    if ev.get("kvm.handler.npf.prelude"):
        how = "next RIP" if ev.get("kvm.skip.next_rip") else "decoding"
        return f"the RFC's fast-bus write at the top of npf_interception and a skip by {how}"
    if ev.get("kvm.skip.next_rip") and ev.get("kvm.bus.lookup.KVM_FAST_MMIO_BUS") and not ev.get("kvm.emulate.decode"):
        return "KVM_FAST_MMIO_BUS write and a skip by next RIP, nothing decoded"
    if ev.get("kvm.emulate.decode"):
        how = ("with the VMCB's instruction bytes (decode assists, no fetch)"
               if ev.get("kvm.emulate.insn_bytes") else "after fetching the instruction")
        return (f"decoded and emulated {how}, the ioeventfd found on KVM_MMIO_BUS by the "
                "emulator's MMIO write")
    return "handled in the kernel"


def _rfc_review() -> list[str]:
    """:mod:`fastmmio.review`'s checks of 1/3, made of RFC 2/3 on the SVM machine (through
    the verdict's own :func:`~fastmmio.verdict.build.review_findings`)."""
    found, note = review_findings(["rfc-2015-svm"], SVM_SCENARIOS[0].options)
    out = []
    for c in found:
        verdict = {True: "holds", False: "fails", None: "not applicable"}[c.passed]
        out.append(f"- RFC 2/3 on AMD, {c.source}: '{c.claim}' {verdict}: {c.detail}.")
    if note:
        out.append(f"- RFC 2/3 on AMD: {note}.")
    return out
