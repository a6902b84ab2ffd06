"""Errors that used to come late, or as a traceback, now come first and in one line.

Each check is made before any simulation (the tests make the simulation itself fail loudly
if it is reached), the output goes to standard output for ``-``, a full disk or a closed pipe
on standard output is one line, and a misspelt name gets a "did you mean".
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import one_line, run_cli

from fastmmio.costs import parse_profile
from fastmmio.errors import ProfileError, UsageError, did_you_mean


@pytest.fixture
def no_simulation(monkeypatch):
    """Fail the test if a command gets as far as simulating."""
    def refuse(*_a, **_k):
        raise AssertionError("the check came after the work started")

    import fastmmio.commands.compare as compare_cmd
    import fastmmio.commands.explain as explain_cmd
    import fastmmio.commands.sweep as sweep_cmd

    monkeypatch.setattr(compare_cmd, "run_compare", refuse)
    monkeypatch.setattr(sweep_cmd, "run_sweep", refuse)
    monkeypatch.setattr(explain_cmd, "explain", refuse)


# -- compare: the out folder, the cwd, the device, the profile ------------------------------


def test_compare_unwritable_out_before_the_work(tmp_path, capsys, no_simulation):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    status, _, err = run_cli(["compare", "--no-kvm", "--out", str(blocker / "out"), "empty"],
                             capsys)
    assert status == 2
    assert "cannot create output folder" in one_line(err)
    status, _, err = run_cli(["compare", "--no-kvm", "--out", str(blocker), "empty"], capsys)
    assert status == 2 and "not a directory" in one_line(err)


def test_compare_unwritable_cwd_for_the_default_out(monkeypatch, capsys, no_simulation):
    monkeypatch.chdir("/proc")  # no folder can be created in procfs, even by root
    status, _, err = run_cli(["compare", "--no-kvm", "empty"], capsys)
    assert status == 2
    line = one_line(err)
    assert "fastmmio-out" in line and "/proc" in line


def test_compare_device_named_explicitly_must_be_usable(tmp_path, capsys, no_simulation):
    """The README's promise: an unusable device is exit status 2, not a skipped column."""
    status, _, err = run_cli(["compare", "--device", "/dev/null", "--out",
                              str(tmp_path / "o"), "empty"], capsys)
    assert status == 2
    assert "/dev/null is not a KVM device" in one_line(err)
    assert not (tmp_path / "o").exists()


def test_compare_profile_without_a_price_before_the_work(tmp_path, capsys, no_simulation):
    from importlib import resources

    text = resources.files("fastmmio").joinpath("costs/profiles/skylake-sp.toml").read_text()
    broken = tmp_path / "broken.toml"
    broken.write_text(text.replace('[price."kvm.eventfd.signal"]', '[price."kvm.eventfdx"]'))
    for argv in (["compare", "--no-kvm", "--out", str(tmp_path / "o"), "--profile",
                  str(broken), "empty"],
                 ["sweep", "--param", "tlb-size", "--values", "1", "--out",
                  str(tmp_path / "o"), "--profile", str(broken)],
                 ["explain", "empty", "--profile", str(broken)]):
        status, _, err = run_cli(argv, capsys)
        assert status == 2, argv
        assert "no price for event 'kvm.eventfd.signal'" in one_line(err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("cycles,reason", [("1e300", "sanity bound"), ("2e7", "sanity bound"),
                                           ("inf", "finite"), ("nan", "finite")])
def test_price_above_the_bound_or_not_finite_is_refused(cycles, reason):
    text = f"""
[profile]
name = "p"
description = "d"
cpu = "c"
[price."exit"]
cycles = {cycles}
component = "exit"
basis = "estimate"
source = "a guess for the test"
"""
    with pytest.raises(ProfileError, match=reason):
        parse_profile(text)


def test_price_at_the_bound_is_accepted():
    parse_profile("""
[profile]
name = "p"
description = "d"
cpu = "c"
[price."exit"]
cycles = 1e7
component = "exit"
basis = "estimate"
source = "a guess for the test"
""")


# -- two runs into one folder ----------------------------------------------------------------


def test_second_run_into_a_locked_folder_is_refused(tmp_path, capsys, no_simulation):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)  # another run holding the folder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        status, _, err = run_cli(["compare", "--no-kvm", "--out", str(out), "empty"], capsys)
    finally:
        os.close(fd)
    assert status == 2
    assert "another fastmmio run is writing into" in one_line(err)
    assert list(out.iterdir()) == []


# -- standard output: '-', a full disk, a closed pipe -----------------------------------------


def _fastmmio(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastmmio", *argv], text=True, timeout=120,
                          **kw)


@pytest.mark.parametrize("argv", [["explain", "empty"], ["bench", "--list"],
                                  ["explain", "empty", "--json", "-"], ["compare", "--help"]])
def test_full_disk_on_stdout_is_one_line(argv):
    with open("/dev/full", "w") as full:
        proc = _fastmmio(*argv, stdout=full, stderr=subprocess.PIPE)
    assert proc.returncode == 1, proc.stderr
    assert "cannot write to standard output: No space left on device" in one_line(proc.stderr)


def test_closed_pipe_on_stdout_is_one_line():
    proc = subprocess.Popen([sys.executable, "-m", "fastmmio", "bench", "--list"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader went away before the first line (as `| head -0`)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1, err
    assert "cannot write to standard output: it is closed" in one_line(err)


def test_explain_json_dash_is_stdout(tmp_path):
    proc = _fastmmio("explain", "empty", "--json", "-", capture_output=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.lstrip().startswith("{")
    assert not (tmp_path / "-").exists()


def test_explain_json_file_is_written_whole(tmp_path, capsys):
    target = tmp_path / "e.json"
    status, _, err = run_cli(["explain", "empty", "--json", str(target)], capsys)
    assert status == 0, err
    assert target.read_text().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["e.json"]  # no temporary file left


def test_explain_json_into_a_missing_folder_before_the_work(tmp_path, capsys, no_simulation):
    status, _, err = run_cli(["explain", "empty", "--json", str(tmp_path / "no" / "e.json")],
                             capsys)
    assert status == 2 and "is not a directory" in one_line(err)


# -- fuzz ------------------------------------------------------------------------------------


def test_fuzz_is_a_command_of_the_tree(capsys):
    status, _, err = run_cli(["fuzz", "hostile", "--runs", "0"], capsys)
    assert status == 2
    assert one_line(err).startswith("fastmmio fuzz hostile: ")


def test_python_m_fastmmio_fuzz_still_works():
    proc = subprocess.run([sys.executable, "-m", "fastmmio.fuzz", "soak", "--batch", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith("fastmmio fuzz soak: ")


def test_fuzz_hostile_only_needs_a_seed(capsys):
    status, _, err = run_cli(["fuzz", "hostile", "--only", "5", "--device", "/dev/null"],
                             capsys)
    assert status == 2
    assert "--seed" in one_line(err)


@pytest.mark.parametrize("make,needle", [
    (lambda t: (t / "f").write_text("x") and t / "f", "not a directory"),
    (lambda t: (t / "g").write_text("x") and t / "g" / "sub", "is not a directory"),
])
def test_fuzz_diff_save_dir_is_checked_first(tmp_path, capsys, make, needle):
    save = make(tmp_path)
    status, _, err = run_cli(["fuzz", "diff", "--save-dir", str(save), "--device",
                              "/dev/null"], capsys)
    assert status == 2
    line = one_line(err)
    assert needle in line and "KVM device" not in line  # before the device is looked at


def test_fuzz_diff_keeps_hypothesis_out_of_the_cwd(tmp_path, monkeypatch):
    from hypothesis import configuration

    from fastmmio.fuzz.differential import _hypothesis_home

    monkeypatch.delenv("HYPOTHESIS_STORAGE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(configuration, "_configuration__hypothesis_home_directory", None,
                        raising=False)
    before = configuration.storage_directory().home_directory
    try:
        _hypothesis_home()
        home = configuration.storage_directory().home_directory
        assert home == tmp_path / "cache" / "fastmmio" / "hypothesis"
    finally:
        configuration.set_hypothesis_home_dir(before)


# -- did you mean ------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,suggestion", [
    (["explain", "pio-evenfd-len1"], "'pio-eventfd-len1'"),
    (["explain", "empty", "--variant", "rfc-2105"], "'rfc-2015'"),
    (["explain", "empty", "--caches", "sdm-mx"], "'sdm-max'"),
    (["explain", "empty", "--profile", "skylake"], "'skylake-sp'"),
    (["compare", "--variants", "upstrem", "empty"], "'upstream'"),
    (["compare", "--caches", "golden-cov", "empty"], "'golden-cove'"),
    (["sweep", "--param", "tlb-sze", "--values", "1"], "'tlb-size'"),
    (["fuzz", "hostle"], "'hostile'"),
    (["compre"], "'compare'"),
])
def test_did_you_mean(argv, suggestion, capsys, no_simulation):
    status, _, err = run_cli(argv, capsys)
    assert status == 2
    assert f"did you mean {suggestion}" in one_line(err)


def test_did_you_mean_stays_quiet_when_nothing_is_close():
    assert did_you_mean("zzzz", ["upstream", "rfc-2015"]) == ""
    with pytest.raises(UsageError) as exc:
        from fastmmio.routes import get_route

        get_route("zzzz")
    assert "did you mean" not in str(exc.value)
