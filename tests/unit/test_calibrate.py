"""``fastmmio calibrate``: a profile fitted to kvm-unit-tests output, bench --json records or
an anchor set; residuals, the prices the figures cannot separate, the held ones; every bad
input is one line and exit status 2."""

from __future__ import annotations

import json

import pytest

from fastmmio.cli import main
from fastmmio.compare.calibration import calibrate, figure_set_from_anchor
from fastmmio.costs import load_profile
from fastmmio.costs.fit import Target, separable_prices
from fastmmio.kut import load_anchor

PCI_LOG = """\
enabling apic
paging enabled
cr0 = 80010011
cr3 = 1007000
cr4 = 20
pci-testdev at 0x10 membar febff000 iobar c000
mmio-no-eventfd:pci-mem 8796
mmio-wildcard-eventfd:pci-mem 3609
mmio-datamatch-eventfd:pci-mem 3685
portio-no-eventfd:pci-io 5287
portio-wildcard-eventfd:pci-io 1762
portio-datamatch-eventfd:pci-io 1777
SUMMARY: 6 tests
"""

# b7ffc44d5b2e's 'After' set as kvm-unit-tests prints it, with junk and without vmcall
TR_LOG = """\
PM timer port is 608
cpuid 1291
mov_from_cr8 11
mov_to_cr8 16
inl_from_pmtimer 6457
inl_from_qemu 6209
inl_from_kernel 2339
outl_to_kernel 1391
wbinvd 12345
tscdeadline_immed 9999
vmcall (skipped)
  ipi self_ipi 1234
"""


def _run(capsys, *argv):
    status = main(["calibrate", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_the_2013_log_reproduces_the_bundled_pci_testdev_fit(tmp_path, capsys):
    """The six figures of QEMU 22773d60 as a kvm-unit-tests log (era pci-testdev-2013, the
    upstream-2013 variant) fit the same four prices to the same values as the bundled
    pci-testdev-2013 profile, whose [fit] table was made from them."""
    log = tmp_path / "vmexit.log"
    log.write_text(PCI_LOG)
    out_toml = tmp_path / "mine.toml"
    status, out, err = _run(capsys, "--kut", str(log), "--era", "pci-testdev-2013",
                            "--variant", "upstream-2013", "--base", "pci-testdev-2013",
                            "--out", str(out_toml))
    assert status == 0, err
    mine = load_profile(out_toml)
    bundled = load_profile("pci-testdev-2013")
    for k in bundled.fit.free:
        assert mine.prices[k].cycles == pytest.approx(bundled.prices[k].cycles, abs=0.02)
        assert mine.prices[k].basis == "fitted"
        assert "fitted by fastmmio calibrate" in mine.prices[k].source
    assert mine.name == "mine"
    assert "mmio-wildcard-eventfd:pci-mem" in out and "mmio-eventfd-len1" in out
    assert "not separable" in out and "kvm.skip.vmcs_length" in out
    # held prices keep the base's value and say why
    held = mine.prices["kvm.eventfd.signal"]
    assert held.cycles == bundled.prices["kvm.eventfd.signal"].cycles
    assert "held at" in held.note


def test_a_log_from_stdin_with_junk_and_missing_tests(monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(TR_LOG))
    status, out, err = _run(capsys, "--kut", "-", "--era", "vmx-in-emulated")
    assert status == 0, err
    assert "outl_to_kernel" in out and "pio-out-kernel" in out
    assert "vmcall" not in out  # missing from the log: no row, no price of its own
    # unknown tests and tests with no route are listed, not fitted
    assert "wbinvd: not a kvm-unit-tests test" in out
    assert "inl_from_pmtimer: KVM has no in-kernel ACPI PM timer" in out
    assert "inl_from_kernel: in this era" in out


def test_anchor_set_fit_and_its_residuals():
    base = load_profile("skylake-sp")
    res = calibrate(base, figure_set_from_anchor("tr-reload-2017"))
    rows = {r.kut: r for r in res.rows}
    assert set(rows) == {"cpuid", "vmcall", "mov_from_cr8", "mov_to_cr8", "outl_to_kernel"}
    assert rows["outl_to_kernel"].published == 1391
    assert all(abs(r.percent) < 10 for r in res.rows)
    # the VMCS-length skip happens once per exit in every figure: it cannot be told apart
    assert res.tied["kvm.skip.vmcs_length"] == ("exit",)
    for k, v in res.fit.parameters.items():
        assert v >= 0 and res.profile.prices[k].basis == "fitted"


def test_bench_json_records(tmp_path, capsys):
    recs = [{"host": {"cpu_model": "Test CPU", "kvm_kind": "vmx", "guest_cpl": 0}},
            {"route": "cpuid", "cycles": 1100.0, "correct": True},
            {"route": "pio-eventfd-len1", "cycles": 1300.0, "correct": True},
            {"route": "mmio-eventfd-len0", "cycles": 1350.0, "correct": True},
            {"route": "pio-user", "cycles": 5000.0, "correct": False},
            {"route": "no-such-route", "cycles": 10.0, "correct": True}]
    f = tmp_path / "bench.json"
    f.write_text(json.dumps(recs))
    status, out, err = _run(capsys, "--bench", str(f))
    assert status == 0, err
    assert "mmio-wildcard-eventfd:pci-mem" in out  # today's name for mmio-eventfd-len0
    assert "pio-user: failed its checks" in out
    assert "no-such-route: not a route of the catalogue" in out


def test_list_anchors(capsys):
    status, out, _ = _run(capsys, "--list-anchors")
    assert status == 0
    assert "tr-reload-2017" in out and "b7ffc44d5b2e" in out and "22773d60" in out


def test_separable_prices_finds_what_moves_together():
    prof = load_profile("skylake-sp")
    t = [Target("cpuid", 1100, {"exit.CPUID": 1, "kvm.handler.cpuid": 1,
                                "kvm.skip.vmcs_length": 1, "guest.insn": 3})]
    sep = separable_prices(prof, t)
    assert sep.chosen == ("exit",) and sep.rank == 1
    assert set(sep.tied) == {"kvm.handler.cpuid", "kvm.skip.vmcs_length", "guest.insn"}


@pytest.mark.parametrize("content,args,match", [
    ("wbinvd 100\nipi 2000\n", [], "no test name maps to a route"),
    ("hello\nno numbers here\n", [], "no 'NAME CYCLES' lines"),
    ("cpuid 1100\n", ["--fit", "exit,kvm.skip.vmcs_length"], "under-determined"),
    ("cpuid 1100\n", ["--base", "no-such-profile"], "unknown profile"),
    ("cpuid 1100\n", ["--fit", "no.such.price"], "not a \\[price\\] key"),
    ("cpuid 1100\n", ["--era", "1999"], "unknown era"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, args, match):
    f = tmp_path / "log"
    f.write_text(content)
    status, out, err = _run(capsys, "--kut", str(f), *args)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    import re
    assert re.search(match, lines[0]), lines[0]


@pytest.mark.parametrize("what", ["missing", "directory", "binary"])
def test_unreadable_files_are_one_line_and_exit_2(tmp_path, capsys, what):
    f = tmp_path / "x"
    if what == "directory":
        f.mkdir()
    elif what == "binary":
        f.write_bytes(b"\xff\xfe\x00cpuid")
    for opt in ("--kut", "--bench"):
        status, out, err = _run(capsys, opt, str(f))
        assert status == 2 and len(err.strip().splitlines()) == 1 and "cannot read" in err


def test_bad_bench_json_and_unknown_anchor_set(tmp_path, capsys):
    f = tmp_path / "b.json"
    f.write_text("{not json")
    assert _run(capsys, "--bench", str(f))[0] == 2
    f.write_text(json.dumps([{"host": {}}]))
    status, _, err = _run(capsys, "--bench", str(f))
    assert status == 2 and "no route record" in err
    status, _, err = _run(capsys, "--anchors", "no-such-set")
    assert status == 2 and "unknown anchor set" in err and len(err.strip().splitlines()) == 1
    status, _, err = _run(capsys, "--anchors", "pmu-elide-2025", "--out", str(tmp_path / "nodir" / "x.toml"))
    assert status == 2 and "cannot write" in err


def test_anchor_figures_are_those_of_the_log_era_mapping():
    a = load_anchor("pci-testdev-2013")
    fs = figure_set_from_anchor("pci-testdev-2013")
    assert {f.kut: f.cycles for f in fs.calibration.figures} == a.figures
    assert fs.calibration.variant == "upstream-2013"
