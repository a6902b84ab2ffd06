"""Partial profiles (``extends``), ``--price EVENT=CYCLES`` and ``fastmmio profile list|show``
(fastmmio.costs.profile: the module docstring's "Inheritance" section, override_prices;
fastmmio.commands.profile). Every bad input is one line and exit status 2."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
from cli_run import one_line, run_cli

from fastmmio.costs import MAX_PRICE, list_profiles, load_profile, override_prices, parse_profile
from fastmmio.errors import ProfileError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "profiles" / "skylake-sp-exit-2017.toml"


def write(folder: Path, name: str, text: str) -> Path:
    p = folder / name
    p.write_text(textwrap.dedent(text))
    return p


CHILD = """
    [profile]
    name = "child"
    extends = "{parent}"

    [sources]
    mine = "my measurement"

    [price."exit"]
    cycles = 1500
    basis = "measured"
    source = "mine"
"""


# -- extends -------------------------------------------------------------------------------------


def test_the_example_overrides_one_price_and_keeps_the_rest():
    parent, child = load_profile("skylake-sp"), load_profile(EXAMPLE)
    assert child.extends == ("skylake-sp.toml",)
    assert child.name == "skylake-sp-exit-2017" and child.cpu == parent.cpu
    assert set(child.prices) == set(parent.prices) and child.free == parent.free
    changed = {k for k in parent.prices if child.prices[k] != parent.prices[k]}
    assert changed == {"exit"}
    exit_ = child.prices["exit"]
    assert exit_.basis == "derived" and exit_.component == "exit" and exit_.note == ""
    assert exit_.cycles == 1169.5 and "b7ffc44d5b2e" in exit_.source
    assert child.sources == parent.sources
    assert child.nested == parent.nested and child.nested_default == parent.nested_default
    assert child.notes == ""  # the parent's notes describe the parent's figures


def test_a_chain_through_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "mid.toml", CHILD.format(parent="skylake-sp").replace(
        'name = "child"', 'name = "mid"'))
    leaf = write(tmp_path, "leaf.toml", """
        [profile]
        name = "leaf"
        extends = "sub/mid.toml"
        description = "two levels down"

        [price."kvm.eventfd.signal"]
        cycles = 99
        basis = "estimate"
        source = "a guess for the test"
    """)
    p = load_profile(leaf)
    assert p.extends == (str(tmp_path / "sub" / "mid.toml"), "skylake-sp.toml")
    assert p.prices["exit"].cycles == 1500 and p.prices["kvm.eventfd.signal"].cycles == 99
    assert p.description == "two levels down"
    assert p.sources == {**load_profile("skylake-sp").sources, "mine": "my measurement"}
    assert p.prices["exit"].source == "my measurement"  # [sources] merged down the chain
    assert p.prices["kvm.eventfd.signal"].component == "eventfd"  # kept from the grandparent


def test_a_child_without_cycles_adds_to_the_parents_figure(tmp_path):
    path = write(tmp_path, "c.toml", """
        [profile]
        name = "c"
        extends = "skylake-sp"

        [price."exit"]
        note = "checked against my own figure"
    """)
    p, parent = load_profile(path), load_profile("skylake-sp")
    assert p.prices["exit"].cycles == parent.prices["exit"].cycles
    assert p.prices["exit"].source == parent.prices["exit"].source
    assert p.prices["exit"].note == "checked against my own figure"


def test_moving_a_key_between_price_and_free(tmp_path):
    path = write(tmp_path, "c.toml", """
        [profile]
        name = "c"
        extends = "skylake-sp"

        [free."kvm.coalesced.append"]
        reason = "my VMM does not use coalesced MMIO"

        [price."tlb"]
        cycles = 1
        component = "walk"
        basis = "estimate"
        source = "a guess for the test"
    """)
    p = load_profile(path)
    assert "kvm.coalesced.append" in p.free and "kvm.coalesced.append" not in p.prices
    assert "tlb" in p.prices and "tlb" not in p.free


def test_the_parents_fit_record_is_dropped_when_a_fitted_price_changes(tmp_path):
    keep = write(tmp_path, "keep.toml", CHILD.format(parent="pci-testdev-2013").replace(
        '"exit"', '"kvm.bus.lookup"').replace('basis = "measured"', 'basis = "estimate"'))
    drop = write(tmp_path, "drop.toml", CHILD.format(parent="pci-testdev-2013"))
    assert load_profile("pci-testdev-2013").fit is not None
    assert load_profile(keep).fit == load_profile("pci-testdev-2013").fit
    assert load_profile(drop).fit is None


def test_nested_prices_merge(tmp_path):
    path = write(tmp_path, "n.toml", """
        [profile]
        name = "n"
        extends = "skylake-sp"

        [nested.price."exit"]
        cycles = 9000
        component = "exit"
        basis = "measured"
        source = "my nested measurement"
    """)
    p, parent = load_profile(path), load_profile("skylake-sp")
    assert p.nested.prices["exit"].cycles == 9000
    assert p.nested.description == parent.nested.description
    assert p.nested.scale == parent.nested.scale
    assert override_prices(p, [("nested:exit", 8000.0)]).nested.prices["exit"].basis == "user"


BAD = {
    "cycle-self": ({"a.toml": '[profile]\nname = "a"\nextends = "a.toml"\n'},
                   "inheritance cycle: {d}/a.toml -> {d}/a.toml"),
    "cycle-two": ({"a.toml": '[profile]\nname = "a"\nextends = "b.toml"\n',
                   "b.toml": '[profile]\nname = "b"\nextends = "a.toml"\n'},
                  "inheritance cycle: {d}/a.toml -> {d}/b.toml -> {d}/a.toml"),
    "unknown-parent": ({"a.toml": '[profile]\nname = "a"\nextends = "skylake-xp"\n'},
                       "profile.extends: unknown profile 'skylake-xp' (did you mean 'skylake-sp'?)"),
    "missing-file": ({"a.toml": '[profile]\nname = "a"\nextends = "nope.toml"\n'},
                     "profile.extends: cannot read profile"),
    "not-a-string": ({"a.toml": '[profile]\nname = "a"\nextends = 3\n'},
                     "profile.extends: must be a bundled profile name or a .toml path"),
    "no-source": ({"a.toml": '[profile]\nname = "a"\nextends = "skylake-sp"\n'
                             '[price."exit"]\ncycles = 5\nbasis = "measured"\n'},
                  'price."exit".source: missing: a price that overrides the inherited cycles'),
    "no-name": ({"a.toml": '[profile]\nextends = "skylake-sp"\n'}, "profile.name: missing"),
    "bad-parent": ({"a.toml": '[profile]\nname = "a"\nextends = "p.toml"\n',
                    "p.toml": '[profile]\nname = "p"\ndescription = "d"\ncpu = "c"\n'
                              '[price."exit"]\ncycles = -1\ncomponent = "exit"\n'
                              'basis = "measured"\nsource = "a b"\n'},
                   'profile {d}/p.toml: price."exit".cycles: must not be negative'),
    "above-bound": ({"a.toml": '[profile]\nname = "a"\nextends = "skylake-sp"\n'
                               '[price."exit"]\ncycles = 1e300\nbasis = "user"\nsource = "a b"\n'},
                    "above the sanity bound"),
    "unknown-field": ({"a.toml": '[profile]\nname = "a"\nextends = "skylake-sp"\ncolour = 1\n'},
                      "profile.colour: unknown field"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_partial_profile_is_one_line(tmp_path, capsys, case):
    files, why = BAD[case]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    path = tmp_path / "a.toml"
    with pytest.raises(ProfileError) as exc:
        load_profile(path)
    assert why.format(d=tmp_path) in str(exc.value)
    for command in (["profile", "show", str(path)],
                    ["explain", "pio-eventfd-len1", "--profile", str(path)]):
        status, _, err = run_cli(command, capsys)
        assert status == 2 and why.format(d=tmp_path) in one_line(err)


def test_parse_profile_text_resolves_extends_against_base_dir(tmp_path):
    write(tmp_path, "mid.toml", CHILD.format(parent="skylake-sp").replace('"child"', '"mid"'))
    p = parse_profile('[profile]\nname = "t"\nextends = "mid.toml"\n', "<test>", base_dir=tmp_path)
    assert p.prices["exit"].cycles == 1500 and p.extends[-1] == "skylake-sp.toml"


# -- --price ---------------------------------------------------------------------------------------


def test_override_prices_marks_the_price_user_with_the_command_line():
    base = load_profile("skylake-sp")
    p = override_prices(base, [("exit", 1200.0), ("nested.invept", 900.0)])
    e = p.prices["exit"]
    assert (e.cycles, e.basis, e.component) == (1200.0, "user", "exit")
    assert e.source == "the fastmmio command line: --price exit=1200"
    assert "928.5" in e.note
    assert p.prices["nested.invept"].cycles == 900 and p.prices["nested.invept"].basis == "user"
    assert {k for k in base.prices if p.prices[k] != base.prices[k]} == {"exit", "nested.invept"}
    assert "with --price exit=1200, nested.invept=900" in p.origin


def test_explain_with_a_price_changes_the_total_by_the_difference(capsys):
    def total(extra):
        status, out, err = run_cli(["explain", "pio-eventfd-len1", "--json", "-"] + extra, capsys)
        assert status == 0, err
        return json.loads(out)

    base, over = total([]), total(["--price", "exit=1000", "--price", "kvm.eventfd.signal=50"])
    exits = sum(s["count"] for s in base["steps"] if s["event"] and s["event"].startswith("exit"))
    signals = sum(s["count"] for s in base["steps"] if s["event"] == "kvm.eventfd.signal")
    sky = load_profile("skylake-sp")
    expect = (base["total_cycles"] + exits * (1000 - sky.prices["exit"].cycles)
              + signals * (50 - sky.prices["kvm.eventfd.signal"].cycles))
    assert exits >= 1 and signals == 1
    assert over["total_cycles"] == pytest.approx(expect)


def test_a_partial_profile_and_a_price_together(capsys):
    status, out, err = run_cli(["profile", "show", str(EXAMPLE), "--price",
                                "kvm.eventfd.signal=75"], capsys)
    assert status == 0, err
    assert "extends: skylake-sp.toml" in out
    row = next(line for line in out.splitlines() if line.startswith("│ kvm.eventfd.signal"))
    assert " 75 " in row and "user" in row


@pytest.mark.parametrize("arg,why", [
    ("exit", "expected EVENT=CYCLES"),
    ("=5", "expected EVENT=CYCLES"),
    ("exit=fast", "'fast' is not a number of cycles"),
    ("exit=1e300", "above the sanity bound of 1e+07"),
    (f"exit={MAX_PRICE * 1.5:g}", "above the sanity bound"),
    ("exit=inf", "must be finite"),
    ("exit=nan", "must be finite"),
    ("exit=-1", "must not be negative"),
    ("exitt=5", "'exitt' is not a price of the profile (did you mean 'exit'?)"),
    ("walk.ref=5", "'walk.ref' is a [free] key"),
    ("nested:kvm.emulate=5", "'nested:kvm.emulate' is not a price of the profile"),
])
@pytest.mark.parametrize("command", [
    ["explain", "pio-eventfd-len1"],
    ["compare", "--no-kvm", "pio-eventfd-len1"],
    ["sweep", "--param", "vpid", "--values", "on"],
    ["calibrate", "--anchors", "pci-testdev-2013"],
    ["profile", "show", "skylake-sp"],
])
def test_a_bad_price_is_one_line(tmp_path, capsys, arg, why, command):
    extra = ["--out", str(tmp_path / "o")] if command[0] in ("compare", "sweep") else []
    status, _, err = run_cli(command + ["--price", arg] + extra, capsys)
    assert status == 2
    assert why in one_line(err)
    assert not (tmp_path / "o").exists()


def test_the_bound_is_the_files_bound():
    p = load_profile("skylake-sp")
    assert override_prices(p, [("exit", MAX_PRICE)]).prices["exit"].cycles == MAX_PRICE
    with pytest.raises(ProfileError):
        override_prices(p, [("exit", math.nextafter(MAX_PRICE, math.inf))])


# -- fastmmio profile list | show ----------------------------------------------------------------


def test_profile_list_names_every_bundled_profile(capsys):
    status, out, err = run_cli(["profile", "list"], capsys)
    assert status == 0, err
    for name in list_profiles():
        assert name in out and load_profile(name).cpu.split()[0] in out


@pytest.mark.parametrize("name", list_profiles())
def test_profile_show_prints_every_price_with_its_basis_and_source(capsys, name):
    status, out, err = run_cli(["profile", "show", name], capsys)
    assert status == 0, err
    prof = load_profile(name)
    lines = out.splitlines()
    for key, p in prof.prices.items():
        row = next((line for line in lines if line.split("│")[1:2]
                    and line.split("│")[1].split()[:1] == [key]), None)
        assert row is not None, key
        cells = [c.strip() for c in row.split("│")]
        assert cells[2] == f"{p.cycles:,.6g}" and cells[3] == p.component
        assert cells[4] == p.basis
        assert p.source.split()[0] in cells[6]
        interval = getattr(p, "interval", None)
        if interval:
            assert cells[5] == f"{interval[0]:g}-{interval[1]:g}"
    for key in prof.free:
        assert key in out


@pytest.mark.parametrize("argv,why", [
    (["profile", "show", "skylake-xp"], "did you mean 'skylake-sp'?"),
    (["profile", "show", "/nonexistent/p.toml"], "cannot read profile"),
    (["profile", "show", "/dev/zero"], "not a regular file"),
    (["profile", "sho"], "did you mean 'show'?"),
    (["profile", "show"], "the following arguments are required"),
])
def test_profile_bad_input_is_one_line(capsys, argv, why):
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and why in one_line(err)


# -- what i9v's schema adds: intervals (low, high, why) and depends, carried by extends --------


def test_extends_carries_intervals_and_dependencies(tmp_path):
    """An inherited price keeps its interval, its why and its depends; a child that gives a
    new figure drops them (they sized the parent's figure) unless it gives its own; a child
    that gives only an interval puts it on the parent's figure, which must lie inside it."""
    parent = load_profile("skylake-sp")
    child = load_profile(EXAMPLE)
    for key, p in parent.prices.items():
        if key != "exit":
            assert child.prices[key].interval == p.interval and child.prices[key].why == p.why
            assert child.prices[key].depends == p.depends
    assert parent.prices["exit"].interval is not None
    assert child.prices["exit"].interval is None
    assert child.prices["exit"].depends == ("kvm.handler.cpuid", "kvm.skip.vmcs_length",
                                            "guest.insn")
    sig = parent.prices["kvm.eventfd.signal"].cycles
    ok = write(tmp_path, "ok.toml", f"""
        [profile]
        name = "ok"
        extends = "skylake-sp"

        [price."kvm.eventfd.signal"]
        low = {sig - 1}
        high = {sig + 1}
        why = "my own measurement's spread"
    """)
    p = load_profile(ok)
    assert p.prices["kvm.eventfd.signal"].interval == (sig - 1, sig + 1)
    assert p.prices["kvm.eventfd.signal"].source == parent.prices["kvm.eventfd.signal"].source
    bad = write(tmp_path, "bad.toml", f"""
        [profile]
        name = "bad"
        extends = "skylake-sp"

        [price."kvm.eventfd.signal"]
        low = {sig + 1}
        high = {sig + 2}
        why = "an interval that misses the inherited figure"
    """)
    with pytest.raises(ProfileError, match="does not contain cycles"):
        load_profile(bad)


def test_a_dependency_the_child_removes_is_an_error(tmp_path):
    path = write(tmp_path, "c.toml", """
        [profile]
        name = "c"
        extends = "skylake-sp"

        [free."kvm.handler.cpuid"]
        reason = "gone"
    """)
    with pytest.raises(ProfileError, match="'kvm.handler.cpuid' is not a key of \\[price\\]"):
        load_profile(path)


def test_a_price_override_drops_the_old_interval():
    base = load_profile("skylake-sp")
    assert base.prices["exit"].interval is not None
    p = override_prices(base, [("exit", 1000.0)])
    assert p.prices["exit"].interval is None and p.prices["exit"].depends == ()
