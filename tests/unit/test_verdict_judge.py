"""The verdict's conclusions themselves, on synthetic cells (tests/unit/verdict_synth.py: a
hand-built profile and hand-written event vectors, nothing simulated): the exact lists of
"as fast" / "slower" / "incorrect" variants per setting under a tight and a loose tolerance,
every ratio against the same setting's PIO, the sentences, results.json and results.csv values,
the table's colours, and break-even points that flip the sentence when a price crosses them."""

from __future__ import annotations

import csv
import json
import re

import pytest
from verdict_synth import CYCLES, PROFILE, VARIANTS, main_cells, synthetic_comparison

from fastmmio.compare.core import Matrix, Timings, ratio, sim_options
from fastmmio.compare.run import CompareOptions, CompareRun, KvmSide
from fastmmio.report.compare import answer_table, write_outputs
from fastmmio.verdict import BASE, SCENARIOS, build_verdict
from fastmmio.verdict.judge import within

TIGHT, LOOSE = 0.03, 0.12

# By hand from verdict_synth.CYCLES: ratio = cycles / the same setting's PIO cycles.
EXPECTED = {
    TIGHT: {
        "sdm-max": {"as fast": [], "slower": ["upstream-2013", "upstream", "rfc-2015"]},
        "none": {"as fast": [], "slower": ["upstream-2013", "upstream", "rfc-2015"]},
        "nested": {"as fast": ["upstream", "rfc-2015"], "slower": ["upstream-2013"]},
    },
    LOOSE: {
        "sdm-max": {"as fast": ["upstream", "rfc-2015"], "slower": ["upstream-2013"]},
        "none": {"as fast": ["upstream"], "slower": ["upstream-2013", "rfc-2015"]},
        "nested": {"as fast": ["upstream", "rfc-2015"], "slower": ["upstream-2013"]},
    },
}
EXPECTED[TIGHT]["skylake-sp"] = EXPECTED[TIGHT]["vpid-off"] = EXPECTED[TIGHT]["sdm-max"]
EXPECTED[LOOSE]["skylake-sp"] = EXPECTED[LOOSE]["vpid-off"] = EXPECTED[LOOSE]["sdm-max"]


def verdict_for(tolerance, profile_text=PROFILE, samples=0):
    comp = synthetic_comparison(profile_text)
    return comp, build_verdict(comp, VARIANTS, main_cells(comp), tolerance=tolerance,
                               review=False, samples=samples, seed=1)


@pytest.fixture(scope="module", params=[TIGHT, LOOSE], ids=["tight", "loose"])
def tv(request):
    comp, v = verdict_for(request.param)
    return request.param, comp, v


def _finding(v, topic, **match):
    for f in v.findings:
        if f.topic == topic and all(f.values.get(k) == x for k, x in match.items()):
            return f
    raise AssertionError(f"no {topic} finding with {match}")


def test_the_lists_per_setting_are_exactly_the_hand_worked_ones(tv):
    tol, _, v = tv
    for sc in SCENARIOS:
        got = v.judgement.lists(sc.key)
        want = EXPECTED[tol][sc.key]
        assert got["as fast"] == want["as fast"], sc.key
        assert got["slower"] == want["slower"], sc.key
        assert got["incorrect"] == ["rfc-2015-fixed"], sc.key  # its checks fail everywhere
        assert got["n/a"] == []


def test_every_ratio_is_the_cell_over_the_same_settings_pio(tv):
    _, comp, v = tv
    j = v.judgement
    for (subj, sc), p in j.points.items():
        assert p.cycles == pytest.approx(CYCLES[sc][subj])
        assert p.pio_cycles == pytest.approx(CYCLES[sc]["pio"])
        assert j.pio_cells[(subj, sc)].run.options == j.cells[(subj, sc)].run.options
        assert p.ratio == pytest.approx(CYCLES[sc][subj] / CYCLES[sc]["pio"])
        assert comp.ratio_to_pio(j.cells[(subj, sc)]) == pytest.approx(p.ratio)


def test_the_tolerance_rule_is_inclusive_and_nothing_else():
    assert within(1.05, 0.05) and not within(1.0501, 0.05) and within(0.5, 0.01)


def test_as_fast_sentences_name_exactly_the_judged_variants(tv):
    tol, _, v = tv
    for sc in SCENARIOS:
        f = _finding(v, "as-fast", scenario=sc.key)
        assert f"within {tol:.0%})" in f.text
        yes = re.search(r"\) (yes for .*?|no MMIO doorbell is)(; no for|; incorrect|\.$)",
                        f.text).group(1)
        labels = {"upstream": "upstream fast MMIO", "rfc-2015": "RFC as posted",
                  "upstream-2013": "upstream 2013, no fast MMIO bus"}
        for key in EXPECTED[tol][sc.key]["as fast"]:
            assert labels[key] + " (" in yes, (sc.key, key)
        for key in EXPECTED[tol][sc.key]["slower"]:
            assert labels[key] + " (" not in yes, (sc.key, key)
        assert "incorrect (checks fail): RFC as the review asked" in f.text


def test_bottom_line_all_settings_means_all(tv):
    tol, _, v = tv
    b = _finding(v, "bottom-line").values
    if tol == TIGHT:
        assert b["fast_everywhere"] == [] and b["fast_base_only"] == []
        assert b["slow"] == ["upstream 2013, no fast MMIO bus", "upstream fast MMIO",
                             "RFC as posted"]
    else:
        assert b["fast_everywhere"] == ["upstream fast MMIO"]
        assert b["fast_base_only"] == ["RFC as posted"]
        assert b["slow"] == ["upstream 2013, no fast MMIO bus"]
    assert b["incorrect"] == ["RFC as the review asked"]
    assert f"Bottom line (tolerance {tol:.0%})" in _finding(v, "bottom-line").text


def _run(comp, v, tol, tmp_path):
    opts = CompareOptions(routes=("pio-eventfd-len1",), variants=tuple(VARIANTS),
                          profile="synth.toml", kvm=False, tolerance=tol, review=False)
    matrix = Matrix(tuple(VARIANTS), ("pio-eventfd-len1",))
    for var in VARIANTS:
        matrix.cells[(var, "pio-eventfd-len1")] = comp.cell("pio-eventfd-len1",
                                                            sim_options(var))
    return CompareRun(opts, comp.profile, comp, matrix, KvmSide("skipped", "--no-kvm"), v,
                      None, Timings())


def test_results_json_and_csv_carry_the_judged_values(tv, tmp_path):
    tol, comp, v = tv
    run = _run(comp, v, tol, tmp_path)
    write_outputs(run, tmp_path)
    doc = json.loads((tmp_path / "results.json").read_text())
    vd = doc["verdict"]
    assert vd["tolerance"] == tol
    for p in vd["points"]:
        subj, sc = p["subject"], p["scenario"]
        if subj == "pio":
            assert p["as_fast"] is None
            continue
        if subj == "rfc-2015-fixed":
            assert p["judged"] == "incorrect" and p["as_fast"] is False
            continue
        assert p["as_fast"] is (subj in EXPECTED[tol][sc]["as fast"]), (subj, sc)
        assert p["ratio"] == pytest.approx(CYCLES[sc][subj] / CYCLES[sc]["pio"])
    for sc in SCENARIOS:
        assert vd["lists"][sc.key]["as fast"] == EXPECTED[tol][sc.key]["as fast"]
    door = _finding(v, "doorbell", variant="upstream")
    assert door.values["as_fast"] is ("upstream" in EXPECTED[tol]["sdm-max"]["as fast"])
    recs = {(r["extra"]["variant"], r["route"], r["extra"]["scenario"]): r
            for r in doc["simulated"]}
    with (tmp_path / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows
    for row in rows:
        sc = {"main": "sdm-max"}.get(row["scenario"], row["scenario"])
        subj = "pio" if row["route"] == "pio-eventfd-len1" else row["variant"]
        want = CYCLES[sc][subj] / CYCLES[sc]["pio"]
        assert float(row["ratio_to_pio"]) == pytest.approx(want, abs=1e-4), row
        assert float(row["cycles"]) == pytest.approx(CYCLES[sc][subj])
        rec = recs[(row["variant"], row["route"], row["scenario"])]
        assert rec["extra"]["ratio_to_pio"] == pytest.approx(want)


def test_the_answer_table_words_and_colours_follow_the_judgement(tv, tmp_path):
    tol, comp, v = tv
    table = answer_table(_run(comp, v, tol, tmp_path), width=200)
    words = table.columns[[c.header for c in table.columns].index("verdict")]._cells
    rows = [(s.key, sc.key) for s in v.subjects if not s.is_pio for sc in v.scenarios]
    assert len(words) == len(rows)
    for cell, (key, sc) in zip(words, rows):
        style = str(cell.style)
        if key == "rfc-2015-fixed":
            assert (str(cell), style) == ("incorrect", "bold red")
        elif key in EXPECTED[tol][sc]["as fast"]:
            assert (str(cell), style) == ("as fast", "green"), (key, sc)
        else:
            assert (str(cell), style) == ("slower", "yellow"), (key, sc)


# ------------------------------------------------------------------------------------------
# break-even: crossing the value flips the sentence
# ------------------------------------------------------------------------------------------


def _with_price(text: str, key: str, cycles: float) -> str:
    head = f'[price."{key}"]\ncycles = '
    i = text.index(head) + len(head)
    j = text.index("\n", i)
    return text[:i] + f"{cycles}" + text[j:]


def test_break_even_value_is_where_the_answer_flips():
    """upstream at 5%: margin 1.05 x 1,310 - 1,368 = 7.5 cycles; kvm.handler.ept_misconfig
    enters the doorbell once, so the answer flips above 157.5; kvm.handler.io enters PIO
    (x1.05) so it flips below 100 - 7.5/1.05 = 92.86."""
    _, v = verdict_for(0.05)
    st = v.judgement.statement("as-fast", BASE.key, "upstream")
    assert st.holds and st.breakeven.margin == pytest.approx(7.5)
    singles = {s.price: s for s in st.breakeven.singles}
    assert singles["kvm.handler.ept_misconfig"].value == pytest.approx(157.5)
    assert singles["kvm.handler.ept_misconfig"].direction == "above"
    assert singles["kvm.handler.io"].value == pytest.approx(100 - 7.5 / 1.05)
    assert singles["kvm.handler.io"].direction == "below"
    text = _finding(v, "doorbell", variant="upstream").text
    assert ("flips if `kvm.handler.io` is below 93 cycles (derived 100, interval 50-300)"
            in text)
    assert ("`kvm.handler.ept_misconfig` is above 158 cycles (estimate 150, interval 100-300)"
            in text)
    assert "yes for upstream fast MMIO (1.04x" in _finding(v, "as-fast", scenario="sdm-max").text

    below = _with_price(PROFILE, "kvm.handler.ept_misconfig", 157)
    _, v2 = verdict_for(0.05, below)
    assert "yes for upstream fast MMIO" in _finding(v2, "as-fast", scenario="sdm-max").text
    above = _with_price(PROFILE, "kvm.handler.ept_misconfig", 158)
    _, v3 = verdict_for(0.05, above)
    f = _finding(v3, "as-fast", scenario="sdm-max").text
    assert "yes for upstream fast MMIO" not in f and "upstream fast MMIO (1.05x" in f
    assert v3.as_fast("upstream") is False


def test_a_statement_no_interval_can_flip_says_so():
    """upstream-2013 at 3%: 2,368 against 1.03 x 1,310; kvm.emulate (900-1100) alone cannot
    make up 1,019 cycles, nor can every interval at its best end."""
    _, v = verdict_for(TIGHT)
    st = v.judgement.statement("as-fast", BASE.key, "upstream-2013")
    assert not st.holds and not st.breakeven.flips_within()
    assert not st.breakeven.combination.feasible
    text = _finding(v, "doorbell", variant="upstream-2013").text
    assert "no single price flips it within its interval; no combination" in text


def test_orderings_carry_their_break_even():
    """upstream (1,368) before rfc-2015 (1,438): the gap is ept_violation - ept_misconfig +
    5 walk references (20) = 70; it flips when kvm.handler.ept_violation is below 130."""
    _, v = verdict_for(0.05)
    st = v.judgement.statement("ordering", BASE.key, "upstream", "rfc-2015")
    assert st.value == pytest.approx(70)
    singles = {s.price: s for s in st.breakeven.singles}
    assert singles["kvm.handler.ept_violation"].value == pytest.approx(130)
    assert singles["kvm.handler.ept_violation"].direction == "below"
    f = _finding(v, "ordering")
    assert f.values["order"] == ["upstream", "rfc-2015", "upstream-2013"]
    assert "`kvm.handler.ept_violation` is below 130 cycles" in f.text


def test_estimate_share_follows_depends():
    """kvm.handler.io is derived from an estimate (kvm.handler.cpuid): the PIO side's handler
    counts as resting on estimates. Upstream's difference by price: ept_misconfig +150,
    io -100, walk.served +8 (measured): 250 of 258 cycles rest on estimates."""
    _, v = verdict_for(0.05)
    f = _finding(v, "doorbell", variant="upstream")
    assert "kvm.handler.io" in f.values["estimate_keys"]
    assert "kvm.handler.io, derived from kvm.handler.cpuid" in f.text
    # |150| + |-100| of |150| + |-100| + |8| (walks, measured)
    assert f.values["estimate_share"] == pytest.approx(250 / 258)


def test_rfc_walk_references_name_both_sdm_rules():
    """7 references: the 2 leaves because nothing is cached from a not-present entry (SDM
    28.3.2), the 5 upper levels because the EPT violation invalidated the paging-structure
    caches (SDM 28.3.3.1)."""
    _, v = verdict_for(0.05)
    text = _finding(v, "doorbell", variant="rfc-2015").text
    assert "of its 7 walk references, 2 (the leaves)" in text
    assert "5 (the upper levels) from the EPT violation itself" in text
    assert "28.3.2" in text and "28.3.3.1" in text


def test_uncertainty_reprices_every_cell_and_counts_the_as_fast_share():
    comp, v = verdict_for(0.05, samples=2000)
    u = v.judgement.uncertainty
    assert u.samples == 2000
    p = v.point("upstream")
    # only two prices with an interval enter this ratio (ept_misconfig, io); the share is the
    # fraction of samples with door / PIO <= 1.05, recomputed here from the same seed
    import numpy as np

    from fastmmio.costs.linear import PriceSpace, sample_prices

    space = PriceSpace.of(comp.profile)
    prices = sample_prices(space, 2000, 1, "uniform")
    idx = space.index
    door = (1000 + prices[:, idx["kvm.handler.ept_misconfig"]] + 40 + 150 + 20 + 8)
    pio = 1000 + prices[:, idx["kvm.handler.io"]] + 40 + 150 + 20
    share = float(np.mean(door / pio <= 1.05))
    assert p.uncertainty["share_as_fast"] == pytest.approx(share)
    assert p.uncertainty["ratio_median"] == pytest.approx(float(np.median(door / pio)))
    assert f"as fast in {share:.0%} of plausible price sets" in _finding(
        v, "doorbell", variant="upstream").text


def test_ratio_helper_is_none_without_a_priced_pio():
    comp = synthetic_comparison()
    cell = comp.cell("mmio-eventfd-len0", sim_options("upstream"))
    assert ratio(cell, comp.pio_cell(cell)) == pytest.approx(1368 / 1310)
