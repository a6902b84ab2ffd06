"""The verdict: the 2015 thread's question answered from the numbers of one compare run.

"[PATCH RFC 1/3] vmx: allow ioeventfd for EPT violations" claimed that letting an ioeventfd
sit on a read-only memslot, and signalling it at the top of ``handle_ept_violation``, lets the
processor cache the doorbell's translation, "which finally makes MMIO as fast as port IO".
Xiao Guangrong's review said the EPT entry stays not present (so nothing is cached), that even
a read-only entry would not help a write, that reads would signal the eventfd, and that every
demand fault would pay a bus look-up.

Every sentence is computed from the run's figures: for every variant of the thread its MMIO
doorbell is simulated next to the port-I/O ioeventfd under several machine settings, and the
text says the cycles, ratios, exits, walk references, TLB outcomes, the doorbell's EPT entry,
and how far the estimated prices would have to move to change each answer.

Layout: data flows down once, one module per step.

* :mod:`.scenarios`: *what to simulate*: variants, their doorbells, the machine settings;
  :func:`required` is the plan a compare run simulates.
* :mod:`.judge`: *judgement*: collects the cells once, takes every ratio against the same
  setting's PIO cell, applies the tolerance rule (written once: :func:`judge.within`),
  classifies each doorbell (as fast / slower / incorrect / n/a), and adds break-even points and
  the sampled uncertainty (the linear algebra is :mod:`fastmmio.costs.linear`).
* :mod:`.text`: *sentences* from the judgement; the tables and files
  (:mod:`fastmmio.report.compare`) read the same judgement. Neither simulates nor re-judges.
* :mod:`.build`: :func:`build_verdict` runs the three (and the review checks) in order.

The package stays ``fastmmio.verdict`` rather than moving under ``compare/``: compare's core
(simulate, price) is below it, and the report above it; keeping it a sibling keeps the
dependencies pointing one way (compare.core <- verdict <- compare.run, report).
"""

from fastmmio.verdict.build import (
    ReviewFinding,
    Verdict,
    build_verdict,
    rebuild_verdict,
    review_findings,
)
from fastmmio.verdict.judge import (
    AS_FAST,
    DEFAULT_TOLERANCE,
    INCORRECT,
    SLOWER,
    Judgement,
    Point,
    Statement,
    classify,
    within,
)
from fastmmio.verdict.scenarios import (
    BASE,
    LABELS,
    SCENARIOS,
    Scenario,
    Subject,
    doorbell_route,
    required,
    scenarios_for,
    subjects,
)
from fastmmio.verdict.text import Finding

__all__ = ["AS_FAST", "BASE", "DEFAULT_TOLERANCE", "INCORRECT", "LABELS", "SCENARIOS",
           "SLOWER", "Finding", "Judgement", "Point", "ReviewFinding", "Scenario", "Statement",
           "Subject", "Verdict", "build_verdict", "rebuild_verdict", "classify", "doorbell_route", "required",
           "review_findings", "scenarios_for", "subjects", "within"]
