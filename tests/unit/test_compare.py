"""fastmmio compare and fastmmio sweep: a route priced with a hand-built profile costs what
was worked out by hand, routes a variant cannot run are not applicable (not failures), the output folder holds
what it should, bad input is one line and exit status 2."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace

import pytest

from fastmmio.cli import main
from fastmmio.compare.core import NA, OK, Comparison, ept_entry_state, sim_options
from fastmmio.compare.sweep import (
    Base,
    parse_values,
    psc_config,
    run_sweep,
    tlb_config,
    with_memory_latency,
)
from fastmmio.costs import load_profile
from fastmmio.costs.profile import COMPONENTS
from fastmmio.errors import UsageError
from fastmmio.routes import get_route, load_catalogue
from fastmmio.sim.vmx.caches import CONFIGS
from fastmmio.sim.vmx.layouts import EPT_R, EPT_W, EPT_X

ALL_ROUTES = [r.name for r in load_catalogue()]


@pytest.fixture(scope="module")
def comparison():
    return Comparison("skylake-sp")


def _price(key: str, cycles: float, component: str) -> str:
    return (f'[price."{key}"]\ncycles = {cycles}\ncomponent = "{component}"\n'
            'basis = "estimate"\nsource = "hand-built for the test"\n\n')


# A hand-built profile with round prices, so that a route's total can be worked out by hand
# from what KVM does for it; what it does not price is free.
HAND_PROFILE = (
    '[profile]\nname = "hand"\ndescription = "round prices"\ncpu = "none"\n\n'
    + _price("exit", 1000, "exit") + _price("kvm.handler", 100, "handler")
    + _price("kvm.bus", 10, "bus") + _price("kvm.skip", 7, "skip")
    + _price("kvm.eventfd", 300, "eventfd") + _price("kvm.user_exit", 5000, "userspace")
    + "".join(f'[free."{k}"]\nreason = "not priced in this test"\n\n'
              for k in ("kvm", "guest", "tlb", "walk", "vmentry"))
)


@pytest.mark.parametrize("route,total,breakdown", [
    # OUT at CPL3 to a port with no device in KVM: one IO_INSTRUCTION exit, handle_io, one
    # KVM_PIO_BUS look-up of an empty bus (no probe), the instruction skipped by its VMCS length, an
    # exit to userspace (kvm_fast_pio -> KVM_EXIT_IO).
    ("pio-user", 1000 + 100 + 10 + 7 + 5000,
     {"exit": 1000, "handler": 100, "bus": 10, "skip": 7, "userspace": 5000}),
    # the same OUT to an ioeventfd: the look-up with two probes of the bus's one range
    # (kvm_io_bus_get_first_dev's bsearch compares it, __kvm_io_bus_write tries it), one
    # eventfd_signal, no userspace exit.
    ("pio-eventfd-len1", 1000 + 100 + 3 * 10 + 7 + 300,
     {"exit": 1000, "handler": 100, "bus": 30, "skip": 7, "eventfd": 300}),
])
def test_a_route_is_priced_as_worked_out_by_hand(route, total, breakdown):
    """The price of a doorbell under a hand-built profile equals the total worked out by hand
    (events KVM counts for that write x the profile's prices), component by component: a
    wrong unit price, family match, component or per-notification division changes it."""
    from fastmmio.costs.profile import parse_profile

    comp = Comparison(parse_profile(HAND_PROFILE, "hand.toml"), iterations=16)
    cell = comp.cell(route, sim_options("upstream"))
    assert cell.status == OK
    assert cell.cycles == pytest.approx(total)
    assert {k: v for k, v in cell.breakdown.items() if v} == pytest.approx(breakdown)
    assert cell.to_result().cycles == pytest.approx(total)


def test_length_0_ioeventfds_are_not_applicable_before_f848a5a8(comparison):
    """KVM_CAP_IOEVENTFD_NO_LENGTH (f848a5a8, 2014): kvm_assign_ioeventfd of 2013 refused
    length 0, so those routes cannot run under upstream-2013: n/a with the rule, no figure."""
    cell = comparison.cell("mmio-eventfd-len0", sim_options("upstream-2013"))
    assert cell.status == NA and "KVM_CAP_IOEVENTFD_NO_LENGTH" in cell.reason
    assert math.isnan(cell.cycles) and comparison.ratio_to_pio(cell) is None
    assert comparison.cell("mmio-eventfd-len1", sim_options("upstream-2013")).status == OK


def test_a_route_written_for_another_variant_is_not_applicable(comparison):
    route = replace(get_route("ro-write-eventfd"), name="rfc-only", variant="rfc-2015")
    assert comparison.simulate(route, sim_options("upstream")).status == NA
    assert comparison.simulate(route, sim_options("rfc-2015")).status == OK


def test_ept_entry_state_reads_bits_2_0():
    """SDM 28.2.3.1: bits 2:0 = 000b not present; write without read (010b, 110b: KVM's MMIO
    SPTE is W|X) misconfigured."""
    assert ept_entry_state(0) == "not present"
    assert ept_entry_state(EPT_W | EPT_X) == "misconfigured"
    assert ept_entry_state(EPT_W) == "misconfigured"
    assert ept_entry_state(EPT_R | EPT_X) == "read-only"
    assert ept_entry_state(EPT_R | EPT_W | EPT_X) == "read/write"


def test_simulations_are_memoised_and_pricing_is_separate(comparison):
    a = comparison.cell("pio-eventfd-len1", sim_options("upstream"))
    n = comparison.timings.counts["simulate"]
    other = comparison.with_profile(load_profile("pci-testdev-2013"))
    b = other.cell("pio-eventfd-len1", sim_options("upstream"))
    assert comparison.timings.counts["simulate"] == n  # not simulated again
    assert a.run is b.run and a.cycles != b.cycles


def test_compare_writes_the_output_folder(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compare", "pio-eventfd-len1", "mmio-eventfd-len0", "ro-read-eventfd",
                 "--variants", "upstream,rfc-2015", "--no-kvm", "--no-review", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0  # rfc-2015 failing ro-read-eventfd is a finding, not an error
    for name in ("results.json", "results.csv", "breakdown.png", "breakdown.svg",
                 "headline.png", "headline.svg", "report.html"):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "results.json").read_text())
    assert doc["options"]["variants"] == ["upstream", "rfc-2015"]
    assert doc["profile"]["name"] == "skylake-sp"
    assert doc["host"]["status"] == "skipped"
    main_recs = [r for r in doc["simulated"] if r["extra"]["scenario"] == "main"]
    assert {(r["extra"]["variant"], r["route"]) for r in main_recs} >= {
        ("upstream", "mmio-eventfd-len0"), ("rfc-2015", "ro-read-eventfd")}
    for r in main_recs:
        assert set(r["breakdown"]) == set(COMPONENTS)
        assert r["extra"]["ratio_to_pio"] is not None
    bad = [r for r in main_recs if not r["correct"]]
    assert [(r["extra"]["variant"], r["route"]) for r in bad] == [("rfc-2015", "ro-read-eventfd")]
    assert doc["verdict"]["findings"] and doc["verdict"]["tolerance"] == 0.05
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {"cycles_exit", "walk_refs_per_notification", "ratio_to_pio"} <= set(rows[0])
    assert "Verdict" in printed and "Is MMIO as fast as port I/O?" in printed
    assert "not measured (--no-kvm)" in printed


BAD_COMPARE = [
    (["--variants", "upstream,nope"], "unknown KVM variant 'nope'"),
    (["--profile", "nope"], "unknown profile 'nope'"),
    (["--caches", "huge"], "unknown cache configuration 'huge'"),
    (["no-such-route"], "unknown route 'no-such-route'"),
    (["--vpid", "maybe"], "expected on or off"),
    (["--tolerance", "150"], "between 0 and 100"),
    (["--iterations", "0"], "between 1 and"),
    (["--nested", "vmware"], "unknown nested setting"),
    (["--uncertainty", "0"], "between 1 and"),
    (["--uncertainty", "many"], "many"),
    (["--seed", "-1"], "between 0 and"),
    (["--sampling", "normal"], "invalid choice: 'normal'"),
    (["--uncertainty", "10", "--no-verdict"], "--uncertainty needs the verdict"),
]


@pytest.mark.parametrize("args,message", BAD_COMPARE)
def test_bad_compare_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    code = _run_main(["compare", "--no-kvm", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err


def _run_main(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse errors exit from inside main
        return exc.code


def test_malformed_profile_file_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[profile]\nname = "x"\ndescription = "d"\ncpu = "c"\n'
                   '[price."exit"]\ncycles = -3\ncomponent = "exit"\nbasis = "estimate"\n'
                   'source = "a guess of mine"\n')
    code = _run_main(["compare", "--no-kvm", "--profile", str(bad), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "bad.toml" in err and "cycles" in err and "negative" in err


def test_output_folder_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code = _run_main(["compare", "empty", "--no-kvm", "--out", str(f)])
    assert code == 2 and "not a directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# sweep
# ------------------------------------------------------------------------------------------


def test_tlb_size_builds_a_config_variant():
    base = CONFIGS["skylake-sp"]
    none = tlb_config(base, 0)
    assert none.combined_tlb == () and none.guest_physical_tlb == base.guest_physical_tlb
    four = tlb_config(base, 4)
    assert four.combined_tlb[0].spec.entries == 4 and four.name == "skylake-sp+tlb4"
    assert four.combined_psc == base.combined_psc


def test_psc_levels_keep_the_lowest_levels():
    """SDM 4.10.3: PML4E, PDPTE and PDE caches; 1 level keeps the PDE cache only."""
    one = psc_config(CONFIGS["sdm-max"], 1)
    assert one.combined_psc["pde"] is not None
    assert one.combined_psc["pdpte"] is None and one.combined_psc["pml4e"] is None
    assert one.guest_physical_psc["pdpte"] is None
    zero = psc_config(CONFIGS["none"], 0)
    assert set(zero.combined_psc.values()) == {None}


def test_fewer_psc_levels_mean_more_walk_references():
    r = run_sweep([("psc-levels", [0, 3])], routes=["mmio-eventfd-len0"], variants=["upstream"])
    by = {p.values[0]: p.cell for p in r.points}
    assert by[0].walk_refs > by[3].walk_refs


def test_memory_latency_only_reprices():
    prof = load_profile("skylake-sp")
    p2 = with_memory_latency(prof, 500)
    assert p2.prices["walk.served.mem"].cycles == 500
    assert p2.prices["walk.served.l1"] == prof.prices["walk.served.l1"]
    r = run_sweep([("memory-latency", [100, 1000])], routes=["mmio-eventfd-len0"],
                  variants=["upstream"], base=Base(caches="none"))
    assert r.timings.counts["simulate"] == 1  # one simulation, priced twice


def test_extra_ioeventfds_lengthen_the_bus_search():
    """kvm_io_bus_get_first_dev: a binary search over the bus's sorted ranges, so more
    registered devices mean more probes per look-up."""
    r = run_sweep([("ioeventfds", [0, 64])], routes=["pio-eventfd-len1"], variants=["upstream"])
    by = {p.values[0]: p.cell for p in r.points}
    assert by[64].per["kvm.bus.probe"] > by[0].per["kvm.bus.probe"]
    assert by[64].correct and by[0].correct


def test_sweep_writes_plot_csv_and_json(tmp_path, capsys):
    code = main(["sweep", "--param", "caches", "--values", "sdm-max,none", "--param", "vpid",
                 "--values", "on,off", "--routes", "pio-eventfd-len1,mmio-eventfd-len0",
                 "--variants", "upstream", "--out", str(tmp_path)])
    assert code == 0
    for ext in ("png", "svg", "csv", "json"):
        assert (tmp_path / f"sweep-caches-vpid.{ext}").stat().st_size > 0
    doc = json.loads((tmp_path / "sweep-caches-vpid.json").read_text())
    assert len(doc["points"]) == 2 * 2 * 2
    assert "fastmmio sweep" in capsys.readouterr().out


BAD_SWEEP = [
    (["--param", "tlb-size", "--values", "x"], "not an integer"),
    (["--param", "psc-levels", "--values", "4"], "outside 0..3"),
    (["--param", "memory-latency", "--values", "-5"], ">= 0"),
    (["--param", "caches", "--values", "sdm-max,huge"], "unknown cache configuration"),
    (["--param", "vpid", "--values", "sometimes"], "on or off"),
    (["--param", "nested", "--values", "off,vmware"], "unknown nested setting"),
    (["--param", "tlb-size", "--values", "1", "--param", "vpid"], "--values"),
    (["--param", "warp", "--values", "1"], "invalid choice"),
    (["--param", "ioeventfds", "--values", "1", "--variants", "nope"], "unknown KVM variant"),
]


@pytest.mark.parametrize("args,message", BAD_SWEEP)
def test_bad_sweep_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    code = _run_main(["sweep", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_help_prints(command, capsys):
    assert _run_main([command, "--help"]) == 0
    assert "--variants" in capsys.readouterr().out


def test_parse_values_rejects_unknown_parameters():
    with pytest.raises(UsageError, match="unknown sweep parameter"):
        parse_values("speed", ["1"])


def test_compare_uncertainty_writes_the_sample_statistics(tmp_path, capsys):
    out = tmp_path / "u"
    code = main(["compare", "pio-eventfd-len1", "mmio-eventfd-len0", "--variants", "upstream",
                 "--no-kvm", "--no-review", "--uncertainty", "300", "--seed", "3",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    u = doc["verdict"]["uncertainty"]
    assert (u["samples"], u["seed"], u["method"]) == (300, 3, "uniform")
    door = [p for p in doc["verdict"]["points"] if p["subject"] == "upstream"]
    assert door and all(0 <= p["uncertainty"]["share_as_fast"] <= 1 for p in door)
    for p in door:
        q = p["uncertainty"]
        assert q["ratio_p05"] <= q["ratio_median"] <= q["ratio_p95"]
    recs = [r for r in doc["simulated"] if r["route"] == "mmio-eventfd-len0"]
    assert all(r["extra"]["uncertainty"]["cycles_p05"] <= r["cycles"] * 2 for r in recs)
    assert doc["verdict"]["statements"]  # break-even values, with or without sampling
    base = next(p for p in door if p["scenario"] == "sdm-max")
    assert f"as fast in {base['uncertainty']['share_as_fast']:.0%} of plausible price sets" \
        in " ".join(printed.split())
