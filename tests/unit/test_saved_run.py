"""Results as data (issue 13, point 7): results.json records how, when and in which units a
run was made and the whole profile; ``fastmmio report`` re-renders and re-prices a saved run
from its stored events without simulating; ``fastmmio diff`` says what changed, marking KVM
medians that moved inside their spread as noise."""

from __future__ import annotations

import copy
import io
import json
from datetime import datetime
from pathlib import Path

import pytest
from rich.console import Console

from fastmmio import __version__
from fastmmio.cli import main
from fastmmio.compare.core import Comparison
from fastmmio.compare.run import CompareOptions, run_compare
from fastmmio.compare.saved import load_run
from fastmmio.costs import CostModel, load_profile
from fastmmio.costs.profile import profile_from_json, profile_to_json
from fastmmio.errors import UsageError
from fastmmio.report.compare import render, write_outputs
from fastmmio.report.diff import diff_results
from fastmmio.result import HostInfo, RunResult, Spread

ROUTES = ("pio-eventfd-len1", "mmio-eventfd-len0", "cpuid")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, object]:
    """A small compare run (no KVM, no review) and its results.json."""
    run = run_compare(CompareOptions(routes=ROUTES, variants=("upstream", "rfc-2015"),
                                     kvm=False, review=False))
    out = tmp_path_factory.mktemp("saved")
    write_outputs(run, out)
    return out / "results.json", run


def _text(run) -> str:
    c = Console(width=200, record=True, file=io.StringIO())
    render(c, run)
    return c.export_text()


def test_results_json_records_version_time_command_line_and_units(saved):
    path, run = saved
    doc = json.loads(path.read_text())
    r = doc["run"]
    assert r["fastmmio"] == __version__
    assert datetime.fromisoformat(r["time_utc"]).utcoffset().total_seconds() == 0
    assert isinstance(r["argv"], list) and r["argv"] == run.argv
    assert {"simulated", "kvm"} <= set(r["units"])
    assert "model cycles" in r["units"]["simulated"] and "TSC ticks" in r["units"]["kvm"]
    assert {x["unit"] for x in doc["simulated"]} == {"model cycles"}
    # every simulation of the run is kept (the calibration's too): re-pricing needs none
    stored = {(x["route"], x["extra"]["variant"], x["extra"]["caches"], x["extra"]["vpid"],
               x["extra"]["nested"]) for x in doc["simulated"] + doc["simulated_other"]}
    assert stored == {k[:5] for k in run.comparison.runs()}


def test_the_saved_profile_is_the_whole_profile():
    p = load_profile("skylake-sp")
    q = profile_from_json(json.loads(json.dumps(profile_to_json(p))))
    assert (q.prices, q.free, q.sources, q.nested, q.fit) == (
        p.prices, p.free, p.sources, p.nested, p.fit)
    some = next(iter(p.prices.values()))
    d = profile_to_json(p)["prices"][some.key]
    assert {"cycles", "basis", "source", "low", "high"} <= set(d)


def test_kvm_records_carry_their_unit_spread_and_host_kind(saved, tmp_path):
    _, run = saved
    spread = Spread(runs=9, median=100.0, min=90.0, max=130.0, q1=95.0, q3=110.0,
                    iqr_rel=0.15, ci_low=96.0, ci_high=104.0, ci_rel=0.04, confidence=0.95,
                    median_moved=0.01, stable=True, reason="stable")
    run.kvm.status = "measured"
    run.kvm.host = HostInfo("cpu", 2_600_000, "6.1", "pvm", True, 3, "PVM")
    run.kvm.results = [RunResult("cpuid", "kvm", 100.0, (90.0, 130.0), 64, 0, 0, True,
                                 spread=spread)]
    try:
        write_outputs(run, tmp_path)
    finally:
        run.kvm.status, run.kvm.host, run.kvm.results = "skipped", None, []
    rec = json.loads((tmp_path / "results.json").read_text())["kvm"][0]
    assert (rec["unit"], rec["host_kind"]) == ("TSC ticks", "pvm")
    assert rec["spread"]["ci_low"] == 96.0 and rec["spread"]["runs"] == 9


def test_a_saved_run_renders_as_it_did_without_simulating(saved, monkeypatch):
    path, run = saved

    def no_simulation(*_a, **_k):
        raise AssertionError("fastmmio report simulated")

    monkeypatch.setattr(Comparison, "_simulate", no_simulation)
    again = load_run(path)
    assert _text(again) == _text(run)
    assert again.origin["time_utc"] == run.started_utc


def test_another_profile_reprices_the_stored_events(saved, monkeypatch):
    path, run = saved
    monkeypatch.setattr(Comparison, "_simulate", lambda *_a: pytest.fail("simulated"))
    other = load_profile("pci-testdev-2013")
    again = load_run(path, other)
    model = CostModel(other)
    for key, cell in run.matrix.cells.items():
        new = again.matrix.cells[key]
        if cell.pricing is None:
            continue
        ev = cell.run.result.events
        assert new.cycles == pytest.approx(model.price(ev, cell.run.result.iterations).cycles)
    assert any(again.matrix.cells[k].cycles != c.cycles for k, c in run.matrix.cells.items()
               if c.pricing is not None)
    # the verdict is judged again from the re-priced cells
    p0 = run.verdict.point("upstream")
    p1 = again.verdict.point("upstream")
    assert p1.ratio == pytest.approx(
        again.matrix.cells[("upstream", "mmio-eventfd-len0")].cycles
        / again.matrix.cells[("upstream", "pio-eventfd-len1")].cycles)
    assert p1.cycles != p0.cycles


def test_a_saved_run_without_a_needed_simulation_is_refused(saved, tmp_path):
    path, _ = saved
    doc = json.loads(path.read_text())
    doc["simulated"] = [r for r in doc["simulated"]
                        if not (r["route"] == "pio-eventfd-len1" and r["extra"]["nested"] != "off")]
    p = tmp_path / "cut.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(UsageError, match="has no simulation of pio-eventfd-len1"):
        load_run(p)


def test_report_command_writes_the_folder(saved, tmp_path, capsys, monkeypatch):
    # wide enough that the header, which holds the saved file's path (longer in a pytest-xdist
    # worker's temporary folder), is not wrapped into the words looked for below
    monkeypatch.setenv("COLUMNS", "400")
    path, _ = saved
    out = tmp_path / "rep"
    assert main(["report", str(path), "--profile", "pci-testdev-2013", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "re-priced with pci-testdev-2013" in printed and "nothing simulated" in printed
    doc = json.loads((out / "results.json").read_text())
    assert doc["profile"]["name"] == "pci-testdev-2013"
    assert doc["run"]["argv"] == ["fastmmio", "report", str(path), "--profile",
                                  "pci-testdev-2013", "--out", str(out)]
    assert doc["run"]["rendered_from"]["file"] == str(path)
    for name in ("results.csv", "breakdown.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize("content,message", [
    (None, "cannot read"),
    ("not json", "not valid JSON"),
    ("{}", "not a results.json of fastmmio compare"),
    ('{"simulated": [{"route": "cpuid"}], "options": {}, "profile": {"full": {}}}',
     "malformed"),
])
def test_report_bad_input_is_one_line_and_exit_2(content, message, tmp_path, capsys):
    p = tmp_path / "r.json"
    if content is not None:
        p.write_text(content)
    assert main(["report", str(p), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing written


# ------------------------------------------------------------------------------------------
# diff
# ------------------------------------------------------------------------------------------


def _kvm(route: str, median: float, lo: float, hi: float) -> dict:
    return {"route": route, "cycles": median, "cycles_spread": [lo - 10, hi + 10],
            "spread": {"ci_low": lo, "ci_high": hi, "min": lo - 10, "max": hi + 10}}


def test_diff_marks_kvm_moves_inside_the_spread_as_noise(saved):
    path, _ = saved
    a = json.loads(path.read_text())
    b = copy.deepcopy(a)
    a["kvm"] = [_kvm("cpuid", 100, 95, 105), _kvm("pio-eventfd-len1", 200, 190, 210)]
    b["kvm"] = [_kvm("cpuid", 103, 99, 108), _kvm("pio-eventfd-len1", 260, 250, 270)]
    d = diff_results(a, b)
    by = {c.route: c for c in d.kvm}
    assert by["cpuid"].noise and not by["pio-eventfd-len1"].noise
    assert not d.sim and not d.words  # nothing simulated changed


def test_diff_names_changed_cycles_and_verdict_words(saved):
    path, _ = saved
    a = json.loads(path.read_text())
    b = copy.deepcopy(a)
    rec = next(r for r in b["simulated"] if r["route"] == "mmio-eventfd-len0"
               and r["extra"]["variant"] == "upstream" and r["extra"]["scenario"] == "main")
    rec["cycles"] *= 2
    pt = next(p for p in b["verdict"]["points"] if p["subject"] == "upstream")
    pt["judged"] = "slower" if pt["judged"] != "slower" else "as fast"
    d = diff_results(a, b)
    assert [(c.route, c.variant) for c in d.sim] == [("mmio-eventfd-len0", "upstream")]
    assert d.sim[0].figures["cycles"][1] == pytest.approx(2 * d.sim[0].figures["cycles"][0])
    assert [(w.subject, w.b) for w in d.words] == [("upstream", pt["judged"])]
    assert d.same_sim == len(a["simulated"]) - 1


def test_diff_command(saved, tmp_path, capsys):
    path, _ = saved
    assert main(["diff", str(path), str(path)]) == 0
    assert "No change" in capsys.readouterr().out
    assert main(["diff", str(path), str(path), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["unchanged_simulated"] > 0
    assert main(["diff", str(path), str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and len(err.strip().splitlines()) == 1
