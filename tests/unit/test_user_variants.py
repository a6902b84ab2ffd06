"""The user's own KVM variants: ``--variant-file PATH.py`` and the ``fastmmio.variants``
entry-point group (fastmmio.sim.kvm.plugins, docs/variants.md), through every command that
takes a variant; the worked example examples/variants/rfc_writes_only.py run through explain
and compare; every bad file one line and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_run import one_line, run_cli

from fastmmio.compare.core import Comparison, sim_options
from fastmmio.errors import UsageError
from fastmmio.sim.kvm import variants as V
from fastmmio.sim.kvm.plugins import load_variant_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "variants" / "rfc_writes_only.py"
BUNDLED = ["upstream-2013", "upstream", "rfc-2015", "rfc-2015-posted", "rfc-2015-fixed",
           "bad-page", "reserved-write-mostly", "svm-pre-7.0", "svm", "rfc-2015-svm"]


@pytest.fixture
def registry():
    """The variant registry, put back as it was after the test."""
    saved = V.snapshot_variants()
    yield V.VARIANTS
    V.restore_variants(saved)


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# -- the registry ------------------------------------------------------------------------------


def test_bundled_variants_are_registered_through_register_variant():
    assert list(V.ALL_VARIANTS) == BUNDLED
    assert list(V.VARIANTS) + list(V.SVM_VARIANTS) == BUNDLED  # by arch
    assert all(V.variant_origin(n) == "fastmmio" for n in BUNDLED)


def test_register_variant_refuses_a_taken_name_and_a_missing_one(registry):
    class Mine(V.Variant):
        name = "upstream"
        summary = "a clash"

    with pytest.raises(UsageError, match="already taken by fastmmio"):
        V.register_variant(Mine, "test")

    class Nameless(V.Variant):
        summary = "inherits upstream's name"

    with pytest.raises(UsageError, match="needs its own name"):
        V.register_variant(Nameless, "test")
    with pytest.raises(UsageError, match="not a subclass"):
        V.register_variant(int, "test")  # type: ignore[arg-type]
    V.register_variant(V.Rfc2015)  # the same class again: harmless
    assert list(V.ALL_VARIANTS) == BUNDLED


# -- the worked example ------------------------------------------------------------------------


def test_the_example_registers_one_variant(registry):
    assert load_variant_file(EXAMPLE) == ["rfc-writes-only"]
    cls = V.VARIANTS["rfc-writes-only"]
    assert issubclass(cls, V.Variant2015) and V.variant_origin("rfc-writes-only").endswith(
        "rfc_writes_only.py")


def test_the_example_answers_objection_1_only(registry):
    """Under the example, a read of the doorbell page no longer signals the eventfd (it is
    mapped read-only by the normal fault path and then served by memory), while the write
    doorbell still skips the MMU: no SPTE, the same walk as the RFC as posted. The bundled
    rfc-2015-fixed, which also installs the SPTE, walks into it."""
    load_variant_file(EXAMPLE)
    comparison = Comparison("skylake-sp", iterations=32)

    def cell(route, variant):
        return comparison.cell(route, sim_options(variant))

    read_rfc, read_mine = cell("ro-read-eventfd", "rfc-2015"), cell("ro-read-eventfd", "rfc-writes-only")
    assert read_rfc.status == "fail" and "eventfd" in read_rfc.reason
    assert read_mine.status == "ok" and read_mine.exits == 0
    write_rfc = cell("ro-write-eventfd", "rfc-2015")
    write_mine = cell("ro-write-eventfd", "rfc-writes-only")
    write_fixed = cell("ro-write-eventfd", "rfc-2015-fixed")
    assert write_mine.status == "ok" and write_mine.exits == 1
    assert write_mine.walk_refs == write_rfc.walk_refs
    assert write_mine.cycles == pytest.approx(write_rfc.cycles)
    assert write_mine.run.ept_entry == write_rfc.run.ept_entry == "not present"
    assert write_fixed.run.ept_entry == "read-only" and write_fixed.walk_refs > write_mine.walk_refs


def test_explain_runs_the_example(capsys):
    status, out, err = run_cli(["explain", "ro-write-eventfd", "--variant-file", str(EXAMPLE),
                                "--variant", "rfc-writes-only", "--json", "-"], capsys)
    assert status == 0, err
    doc = json.loads(out)
    assert doc["sim"].startswith("rfc-writes-only")
    steps = [s["what"] for s in doc["steps"]]
    assert any("rfc-writes-only:fast_mmio_bus" in w for w in steps), steps
    assert "rfc-writes-only" not in V.VARIANTS  # unloaded after the command


def test_compare_runs_the_example_with_the_bundled_variants(tmp_path, capsys):
    out = tmp_path / "out"
    status, _, err = run_cli(["compare", "--no-kvm", "--no-review", "--variant-file",
                              str(EXAMPLE), "--variants", "rfc-2015,rfc-writes-only",
                              "-n", "32", "--out", str(out), "ro-write-eventfd",
                              "ro-read-eventfd"], capsys)
    assert status == 0, err
    doc = json.loads((out / "results.json").read_text())
    text = json.dumps(doc)
    assert "sim:rfc-writes-only" in text and "sim:rfc-2015" in text


def test_compare_records_a_partial_profile_and_its_price_overrides(tmp_path, capsys):
    profile = ROOT / "examples" / "profiles" / "skylake-sp-exit-2017.toml"
    out = tmp_path / "out"
    status, _, err = run_cli(["compare", "--no-kvm", "--no-verdict", "--variants", "upstream",
                              "-n", "16", "--profile", str(profile), "--price",
                              "kvm.eventfd.signal=120", "--out", str(out), "pio-eventfd-len1"],
                             capsys)
    assert status == 0, err
    doc = json.loads((out / "results.json").read_text())
    assert doc["profile"]["name"] == "skylake-sp-exit-2017"
    assert doc["profile"]["extends"] == ["skylake-sp.toml"]
    assert doc["profile"]["origin"].endswith("with --price kvm.eventfd.signal=120")
    (cell,) = doc["simulated"]
    assert cell["breakdown"]["eventfd"] == 120


def test_sweep_and_calibrate_take_a_variant_file(tmp_path, capsys):
    status, _, err = run_cli(["sweep", "--param", "vpid", "--values", "on,off", "--routes",
                              "ro-write-eventfd", "--variant-file", str(EXAMPLE), "-n", "16",
                              "--out", str(tmp_path / "sw")], capsys)
    assert status == 0, err
    rows = (tmp_path / "sw" / "sweep.csv").read_text() if (tmp_path / "sw" / "sweep.csv").exists() \
        else "".join(p.read_text() for p in (tmp_path / "sw").glob("*.csv"))
    assert "rfc-writes-only" in rows  # the default variants plus the file's
    kut = write(tmp_path, "kut.txt", "cpuid 1050\nvmcall 1400\noutl_to_kernel 1600\n")
    status, _, err = run_cli(["calibrate", "--kut", str(kut), "--variant-file", str(EXAMPLE),
                              "--variant", "rfc-writes-only", "--fit", "exit"], capsys)
    assert status == 0, err


# -- bad files: one line, exit status 2 ----------------------------------------------------------

BAD = {
    "syntax.py": ("class X(:\n", "syntax error at line 1"),
    "raises.py": ("raise RuntimeError('boom')\n", "importing it raised RuntimeError: boom"),
    "exits.py": ("import sys\nsys.exit(3)\n", "importing it raised SystemExit"),
    "none.py": ("X = 1\n", "defines no variant"),
    "imported_only.py": ("from fastmmio.sim.kvm.variants import Rfc2015\n", "defines no variant"),
    "clash.py": ("from fastmmio.sim.kvm.variants import Variant\n"
                 "class Mine(Variant):\n    name = 'rfc-2015'\n    summary = 's'\n",
                 "'rfc-2015' (Mine) is already taken by fastmmio"),
    "twice.py": ("from fastmmio.sim.kvm.variants import Variant\n"
                 "class A(Variant):\n    name = 'a'\n    summary = 's'\n"
                 "class B(Variant):\n    name = 'a'\n    summary = 's'\n",
                 "two variant classes are both named 'a'"),
    "badname.py": ("from fastmmio.sim.kvm.variants import Variant\n"
                   "class A(Variant):\n    name = 'Has Space'\n    summary = 's'\n",
                   "needs its own name"),
    "nosummary.py": ("from fastmmio.sim.kvm.variants import Variant\n"
                     "class A(Variant):\n    name = 'a'\n    summary = ''\n",
                     "summary must be one non-empty line"),
    "notpy.txt": ("", "not a Python file"),
}


@pytest.mark.parametrize("command", [
    ["explain", "pio-eventfd-len1"],
    ["compare", "--no-kvm", "pio-eventfd-len1"],
    ["sweep", "--param", "vpid", "--values", "on"],
    ["calibrate", "--anchors", "pci-testdev-2013"],
])
@pytest.mark.parametrize("fname", sorted(BAD))
def test_a_bad_variant_file_is_one_line(tmp_path, capsys, command, fname, monkeypatch):
    import fastmmio.commands.compare as compare_cmd
    import fastmmio.commands.explain as explain_cmd
    import fastmmio.commands.sweep as sweep_cmd

    def refuse(*_a, **_k):
        raise AssertionError("the variant file was checked after the work started")

    for mod, fn in ((compare_cmd, "run_compare"), (sweep_cmd, "run_sweep"),
                    (explain_cmd, "explain")):
        monkeypatch.setattr(mod, fn, refuse)
    text, why = BAD[fname]
    path = write(tmp_path, fname, text)
    before = list(V.ALL_VARIANTS)
    status, _, err = run_cli(command + ["--variant-file", str(path), "--out", str(tmp_path / "o")]
                             if command[0] in ("compare", "sweep") else
                             command + ["--variant-file", str(path)], capsys)
    assert status == 2
    line = one_line(err)
    assert f"--variant-file {path}: " in line and why in line, line
    assert list(V.ALL_VARIANTS) == before


@pytest.mark.parametrize("path,why", [("/nonexistent/v.py", "no such file"),
                                      ("/", "not a Python file"),
                                      ("/dev/null.py", "no such file")])
def test_a_missing_variant_file_is_one_line(capsys, path, why):
    status, _, err = run_cli(["explain", "pio-eventfd-len1", "--variant-file", path], capsys)
    assert status == 2 and why in one_line(err)


def test_a_directory_named_like_a_module_is_refused(tmp_path, capsys):
    d = tmp_path / "pkg.py"
    d.mkdir()
    status, _, err = run_cli(["explain", "pio-eventfd-len1", "--variant-file", str(d)], capsys)
    assert status == 2 and "not a regular file" in one_line(err)


def test_a_variant_the_file_does_not_define_gets_did_you_mean(capsys):
    status, _, err = run_cli(["explain", "ro-write-eventfd", "--variant-file", str(EXAMPLE),
                              "--variant", "rfc-write-only"], capsys)
    assert status == 2
    assert "did you mean 'rfc-writes-only'" in one_line(err)


# -- installed plug-ins: the fastmmio.variants entry-point group ---------------------------------


def _plugin(tmp_path: Path, body: str, target: str) -> dict[str, str]:
    """A distribution on a private sys.path entry declaring one fastmmio.variants entry
    point (what pip installs for a package with that entry point)."""
    site = tmp_path / "site"
    (site / "myplug-0.1.dist-info").mkdir(parents=True)
    (site / "myplug-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: myplug\nVersion: 0.1\n")
    (site / "myplug-0.1.dist-info" / "entry_points.txt").write_text(
        f"[fastmmio.variants]\nmine = {target}\n")
    (site / "myplug.py").write_text(textwrap.dedent(body))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(site) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PLUGIN = """
    from fastmmio.sim.kvm.variants import Upstream2013

    class Slow(Upstream2013):
        name = "plugged-2013"
        summary = "upstream-2013, installed as a plug-in"
"""


@pytest.mark.parametrize("target", ["myplug:Slow", "myplug"])
def test_an_installed_plugin_variant_is_available(tmp_path, target):
    env = _plugin(tmp_path, PLUGIN, target)
    proc = subprocess.run([sys.executable, "-m", "fastmmio", "explain", "mmio-eventfd-len1",
                           "--variant", "plugged-2013", "--json", "-"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sim"].startswith("plugged-2013")


@pytest.mark.parametrize("body,target,why", [
    ("raise ImportError('no such thing')\n", "myplug:Slow", "cannot load it: ImportError"),
    ("X = 1\n", "myplug:X", "names neither a Variant subclass nor a module"),
    ("X = 1\n", "myplug", "the module defines no variant"),
    ("from fastmmio.sim.kvm.variants import Variant\nclass C(Variant):\n"
     "    name = 'upstream'\n    summary = 's'\n", "myplug:C", "is already taken"),
])
def test_a_broken_plugin_is_one_line(tmp_path, body, target, why):
    env = _plugin(tmp_path, body, target)
    proc = subprocess.run([sys.executable, "-m", "fastmmio", "explain", "pio-eventfd-len1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert "variant plug-in mine" in line and why in line, line


# -- a variant that counts an event of its own, priced by a partial profile ---------------------

COUNTING = """
    from fastmmio.sim.kvm.variants import Rfc2015


    class Audited(Rfc2015):
        name = "rfc-audited"
        summary = "the RFC as posted, with an audit hook on every EPT violation"
        events = ("kvm.audit.ept_violation",)

        def ept_violation_prelude(self, vcpu, info):
            vcpu.events["kvm.audit.ept_violation"] += 1
            return super().ept_violation_prelude(vcpu, info)
"""

PRICED = """
    [profile]
    name = "audited"
    extends = "skylake-sp"

    [price."kvm.audit"]
    cycles = 25
    component = "handler"
    basis = "estimate"
    source = "a guess for the test: a counter increment and a tracepoint"
"""


def test_a_variants_own_event_is_checked_before_the_run_and_priced_by_a_partial_profile(
        tmp_path, capsys, monkeypatch):
    variant = write(tmp_path, "audited.py", COUNTING)
    profile = write(tmp_path, "audited.toml", PRICED)
    argv = ["explain", "ro-write-eventfd", "--variant-file", str(variant), "--variant",
            "rfc-audited", "--json", "-"]
    status, out, err = run_cli(argv + ["--profile", str(profile)], capsys)
    assert status == 0, err
    doc = json.loads(out)
    audit = [s for s in doc["steps"] if s["event"] == "kvm.audit.ept_violation"]
    assert len(audit) == 1 and audit[0]["cycles"] == 25 and audit[0]["component"] == "handler"
    status, base, _ = run_cli(["explain", "ro-write-eventfd", "--variant", "rfc-2015", "--json",
                               "-"], capsys)
    assert doc["total_cycles"] == pytest.approx(json.loads(base)["total_cycles"] + 25)

    import fastmmio.commands.explain as explain_cmd

    def refuse(*_a, **_k):
        raise AssertionError("the unpriced event was found after the work started")

    monkeypatch.setattr(explain_cmd, "explain", refuse)
    status, _, err = run_cli(argv, capsys)  # skylake-sp does not price it
    assert status == 2
    assert "has no price for event 'kvm.audit.ept_violation'" in one_line(err)


def test_a_variants_events_must_be_event_names(tmp_path, capsys):
    path = write(tmp_path, "bad.py", COUNTING.replace('("kvm.audit.ept_violation",)',
                                                      '["not a name"]'))
    status, _, err = run_cli(["explain", "pio-eventfd-len1", "--variant-file", str(path)], capsys)
    assert status == 2 and "events must be a tuple of event names" in one_line(err)
