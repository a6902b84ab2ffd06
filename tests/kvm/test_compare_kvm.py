"""fastmmio compare with this host's KVM: the upstream routes are measured next to the
simulator, each with the route's checks, and the host is described (needs /dev/kvm)."""

from __future__ import annotations

import json

from fastmmio.cli import main
from fastmmio.compare.run import CompareOptions, run_compare

ROUTES = ("pio-eventfd-len1", "mmio-eventfd-len0", "mmio-user", "ro-write-eventfd")


def test_compare_measures_the_upstream_routes_on_kvm(kvm_device):
    run = run_compare(CompareOptions(routes=ROUTES, variants=("upstream", "rfc-2015"),
                                     device=kvm_device, verdict=False, kvm_runs=8,
                                     kvm_target_ticks=1 << 22, kvm_seconds=10.0))
    k = run.kvm
    assert k.status == "measured" and k.host is not None
    assert {r.route for r in k.results} | {r for r, _ in k.skipped} == set(ROUTES)
    for r in k.results:
        assert r.backend == "kvm" and r.correct, r.checks
        assert r.cycles > 0
        # the measuring rule's record: runs, spread, a verdict and the rule that gave it
        s = r.spread
        assert s is not None and 1 <= s.runs <= 8 and s.runs == len(r.extra["runs_cycles"])
        assert s.min <= s.ci_low <= s.median <= s.ci_high <= s.max and s.median == r.cycles
        assert s.stopped_by in ("stable", "max runs", "time bound") and s.rule and s.reason
        assert s.stable == (s.stopped_by == "stable")
    pio = k.by_route()["pio-eventfd-len1"]
    # a ratio only from a settled median (this host may be too busy to settle one)
    assert k.ratio_to_pio("pio-eventfd-len1") == (None if pio.noisy else 1.0)
    assert k.comparable()  # says whether cycles or only ratios compare


def test_compare_cli_shows_kvm_columns_and_writes_them(kvm_device, tmp_path, capsys):
    code = main(["compare", *ROUTES, "--variants", "upstream", "--device", kvm_device,
                 "--no-verdict", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "KVM" in out and "This host's KVM:" in out
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["host"]["status"] == "measured" and doc["host"]["host"]["kvm_kind"]
    assert {r["route"] for r in doc["kvm"]} <= set(ROUTES) and doc["kvm"]
    for rec in doc["kvm"]:
        assert rec["spread"]["stable"] in (True, False) and rec["spread"]["runs"] >= 1
    assert "median +-" in out  # the spread column
