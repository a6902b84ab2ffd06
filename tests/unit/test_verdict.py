"""The verdict is computed from the run's numbers: changing the machine (caches, VPID, the
nested setting, the tolerance) changes it where the SDM says it should, and every sentence
carries the figures it was generated from."""

from __future__ import annotations

import sys
import types

import pytest

from fastmmio.compare.core import Comparison, sim_options
from fastmmio.verdict import (
    BASE,
    DEFAULT_TOLERANCE,
    build_verdict,
    doorbell_route,
    scenarios_for,
)

VARIANTS = ["upstream-2013", "upstream", "rfc-2015", "rfc-2015-fixed"]


@pytest.fixture(scope="module")
def comparison():
    return Comparison("skylake-sp")


@pytest.fixture(scope="module")
def main_cells(comparison):
    return [comparison.cell(r, sim_options(v)) for v in VARIANTS
            for r in ("pio-eventfd-len1", "mmio-eventfd-len0", "ro-write-eventfd",
                      "ro-read-eventfd")]


@pytest.fixture(scope="module")
def verdict(comparison, main_cells):
    return build_verdict(comparison, VARIANTS, main_cells, review=False)


def _finding(verdict, topic, **match):
    for f in verdict.findings:
        if f.topic == topic and all(f.values.get(k) == v for k, v in match.items()):
            return f
    raise AssertionError(f"no {topic} finding with {match}")


def test_each_variant_offers_the_doorbell_its_capabilities_allow():
    """upstream: length-0 ioeventfd on KVM_FAST_MMIO_BUS (f848a5a8, 68c3b4d1); 2013: length 1
    (no KVM_CAP_IOEVENTFD_NO_LENGTH); the RFC and its alternatives: an ioeventfd over a
    read-only memslot (KVM_CAP_IOEVENTFD_PF, RFC patch 3/3)."""
    assert doorbell_route("upstream") == "mmio-eventfd-len0"
    assert doorbell_route("upstream-2013") == "mmio-eventfd-len1"
    for v in ("rfc-2015", "rfc-2015-fixed", "bad-page", "reserved-write-mostly"):
        assert doorbell_route(v) == "ro-write-eventfd"


def test_sentences_carry_the_computed_figures(verdict):
    for f in verdict.findings:
        if f.topic == "doorbell" and "cycles" in f.values:
            assert f"{f.values['cycles']:,.0f} cycles" in f.text
            assert f"{f.values['ratio']:.2f}x the PIO ioeventfd" in f.text
            assert f"({f.values['pio_cycles']:,.0f})" in f.text


def test_rfc_as_posted_never_gets_a_present_doorbell_entry(verdict):
    """Objection 4 and SDM 28.3.2: the RFC returns before kvm_mmu_page_fault, so the doorbell's
    EPT entry stays not present and no mapping is ever created from it: every write walks."""
    f = _finding(verdict, "doorbell", variant="rfc-2015")
    assert f.values["ept_entry"] == "not present"
    assert f.values["walk_refs"] > 0 and f.values["tlb_misses"] >= 1
    assert "stays not present" in f.text and "28.3.2" in f.text
    assert "every write walks again" in f.text


def test_rfc_walk_references_are_split_between_both_sdm_rules(verdict):
    """The RFC's walk references: the leaves because nothing is cached from a not-present
    entry (SDM 28.3.2), the upper levels because its EPT violation invalidates the
    paging-structure-cache entries used to translate the address (SDM 28.3.3.1)."""
    from fastmmio.verdict.text import walk_split

    cell = verdict.judgement.cells[("rfc-2015", BASE.key)]
    upper, leaves = walk_split(cell)
    assert upper > 0 and leaves > 0 and upper + leaves == cell.walk_refs
    assert cell.per.get("inv.ept_violation", 0) >= 1
    text = _finding(verdict, "doorbell", variant="rfc-2015").text
    assert (f"of its {cell.walk_refs:g} walk references, {leaves:g} (the leaves)" in text)
    assert f"{upper:g} (the upper levels) from the EPT violation itself" in text
    assert "28.3.3.1" in text


def test_rfc_as_the_review_asked_caches_only_read_permission(verdict):
    """Objection 5 and SDM 28.3.3.1: a present read-only entry is installed, but a write
    through it is an EPT violation, which invalidates what was cached: the write still walks."""
    f = _finding(verdict, "doorbell", variant="rfc-2015-fixed")
    assert f.values["ept_entry"] == "read-only"
    assert f.values["walk_refs"] > 0
    assert "28.3.3.1" in f.text


def test_no_caching_raises_the_fast_mmio_walk_and_flips_as_fast(verdict):
    """A processor may cache less than the SDM allows (28.3.3.2): with no translation caching,
    upstream fast MMIO walks more per write, its ratio to PIO grows, and it is no longer as fast
    as port I/O within the tolerance."""
    base, none = verdict.point("upstream", "sdm-max"), verdict.point("upstream", "none")
    assert none.walk_refs > base.walk_refs
    assert none.ratio > base.ratio
    assert verdict.as_fast("upstream", "sdm-max") is True
    assert verdict.as_fast("upstream", "none") is False
    f = _finding(verdict, "as-fast", scenario="none")
    assert "upstream fast MMIO" in f.values["slower"]


def test_vpid_off_invalidates_at_every_exit_and_entry(comparison, verdict):
    """SDM 28.3.3.1: with "enable VPID" = 0, VM exits and entries invalidate the combined
    mappings of VPID 0; the doorbell write walks more than with VPID on, and the verdict
    names the rule with the count of invalidations."""
    on = comparison.cell("mmio-eventfd-len0", sim_options("upstream"))
    off = comparison.cell("mmio-eventfd-len0", sim_options("upstream", vpid=False))
    assert off.per.get("inv.vmexit_novpid") == 1 and off.per.get("inv.vmentry_novpid") == 1
    assert "inv.vmexit_novpid" not in on.per
    assert off.walk_refs > on.walk_refs
    assert verdict.point("upstream", "vpid-off").walk_refs > verdict.point("upstream").walk_refs
    f = _finding(verdict, "scenario", scenario="vpid-off")
    assert "28.3.3.1" in f.text and "VPID off" in f.text


def test_vpid_off_port_io_also_pays_re_walks(comparison):
    """SDM 28.3.3.1: with VPID off the VM entry after each OUT invalidates the combined
    mappings, so the loop's next instruction fetch must walk again."""
    off = comparison.cell("pio-eventfd-len1", sim_options("upstream", vpid=False))
    assert off.walk_refs > 0


def test_nested_changes_how_the_misconfiguration_is_skipped(verdict, comparison):
    """When KVM is itself a guest the EPT-misconfiguration exit is skipped by decoding
    (EMULTYPE_SKIP, d391f1207067): the verdict says so for upstream, and the nested prices
    apply (skylake-sp [nested])."""
    nested = comparison.cell("mmio-eventfd-len0", sim_options("upstream", nested=True), "nested")
    assert nested.per.get("kvm.skip.decode") == 1
    f = _finding(verdict, "scenario", scenario="nested")
    assert "kvm.skip.decode" in f.text
    assert verdict.point("pio", "nested").cycles > verdict.point("pio").cycles


def test_tolerance_is_stated_and_used(comparison, main_cells):
    tight = build_verdict(comparison, ["upstream"], main_cells, tolerance=0.01, review=False)
    assert tight.as_fast("upstream") is False
    assert "within 1%" in _finding(tight, "as-fast", scenario="sdm-max").text
    loose = build_verdict(comparison, ["upstream"], main_cells, review=False)
    assert loose.tolerance == DEFAULT_TOLERANCE and loose.as_fast("upstream") is True


def test_correctness_findings_name_the_rfc_read_of_the_doorbell(verdict):
    """Objection 1: under the RFC as posted a read of the doorbell region signals the eventfd
    and skips the load; the route's own checks catch it."""
    f = _finding(verdict, "correctness", variant="rfc-2015")
    assert f.values["failed"] == ["ro-read-eventfd"]
    assert "signalled once per access" in f.text and "load was skipped" in f.text
    ok = _finding(verdict, "correctness", variant="rfc-2015-fixed")
    assert ok.values["failed"] == []


def test_not_applicable_is_not_a_failure(verdict):
    """Length-0 ioeventfds did not exist before f848a5a8: under upstream-2013 those routes are
    not applicable, and the variant still passes every route it can run."""
    f = _finding(verdict, "correctness", variant="upstream-2013")
    assert f.values["failed"] == []
    assert set(f.values["na"]) == {"mmio-eventfd-len0", "ro-write-eventfd", "ro-read-eventfd"}


def test_a_profile_without_nested_prices_leaves_the_nested_scenario_out():
    from dataclasses import replace as _replace

    from fastmmio.costs import load_profile
    c = Comparison(_replace(load_profile("pci-testdev-2013"), nested=None))
    assert "nested" not in {s.key for s in scenarios_for(c)}
    assert BASE in scenarios_for(c)


def test_review_checks_are_used_when_the_module_exists(comparison, main_cells, monkeypatch):
    """fastmmio.review's checks (the thread's objections) enter the verdict when present."""
    fake = types.ModuleType("fastmmio.review")

    class Check:
        def __init__(self, passed):
            self.name, self.source, self.claim = "read-not-skipped", "objection 1", "reads ok"
            self.passed, self.detail, self.numbers = passed, "1 signal per read", {"s": 1.0}

    seen = []
    fake.review_checks = lambda options: seen.append(options.variant) or [Check(False)]
    monkeypatch.setitem(sys.modules, "fastmmio.review", fake)
    v = build_verdict(comparison, ["upstream"], main_cells)
    assert seen == ["upstream"]
    assert [(r.name, r.passed) for r in v.review] == [("read-not-skipped", False)]
    assert "lacks 'reads ok'" in _finding(v, "review", variant="upstream").text


def test_verdict_works_without_the_review_module(comparison, main_cells, monkeypatch):
    import importlib

    real = importlib.import_module

    def no_review(name, *a, **kw):
        if name == "fastmmio.review":
            raise ModuleNotFoundError("No module named 'fastmmio.review'", name=name)
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", no_review)
    v = build_verdict(comparison, ["upstream"], main_cells)
    assert v.review == [] and "not in this build" in v.review_note
    assert _finding(v, "bottom-line").text.startswith("Bottom line")
