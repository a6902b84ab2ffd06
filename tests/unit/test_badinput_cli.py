"""Bad input on the command line: one line on stderr, exit status 2, never a traceback.

Covers every argument of ``fastmmio bench`` and of ``python -m fastmmio.fuzz`` with values a
user can mistype. None of these needs /dev/kvm: each is refused before a device is used, or
names a device that is not one (a missing path, /dev/null, a directory, a regular file).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastmmio import cli
from fastmmio.fuzz import cli as fuzz_cli


def run_main(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """Status, stdout and stderr of an in-process CLI call (argparse's SystemExit included)."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_usage_error(status: int, err: str, *needles: str) -> None:
    assert status == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert re.match(r"fastmmio( [a-z]+)*: ", lines[0]), err  # fastmmio [COMMAND...]: message
    for needle in needles:
        assert needle in lines[0], err


@pytest.fixture
def not_a_device(tmp_path: Path) -> Path:
    f = tmp_path / "plain-file"
    f.write_text("not a KVM device\n")
    return f


BENCH_CASES = [
    (["bench", "no-such-route"], "unknown route 'no-such-route'"),
    (["bench", ""], "unknown route ''"),
    (["bench", "empty", "no-such-route"], "unknown route 'no-such-route'"),
    (["bench", "--cpl", "2"], "invalid choice: 2"),
    (["bench", "--cpl", "x"], "--cpl"),
    (["bench", "--iterations", "0"], "must be at least 1: 0"),
    (["bench", "--iterations", "-1"], "must be at least 1: -1"),
    (["bench", "--iterations", "abc"], "not an integer: 'abc'"),
    (["bench", "--iterations", "1.5"], "not an integer"),
    (["bench", "--iterations", ""], "not an integer"),
    (["bench", "-n", str(2**29), "empty"], "iterations must be between 1 and"),
    (["bench", "--runs", "0"], "must be at least 1: 0"),
    (["bench", "--runs", "-3"], "must be at least 1"),
    (["bench", "--runs", "1e3"], "not an integer"),
    (["bench", "--target-ticks", "bad"], "not an integer: 'bad'"),
    (["bench", "--target-ticks", "0"], "must be at least 1"),
    (["bench", "--target-ticks", str(2**80)], "at most 2^40"),
    (["bench", "-n", "5", "--target-ticks", "5"], "not allowed with"),
    (["bench", "--format", "bad"], "invalid choice: 'bad'"),
    (["bench", "--json", "/nonexistent-dir/x.json", "empty"], "is not a directory"),
    (["bench", "--json", "/proc/fastmmio-badinput.json", "empty"], "cannot write /proc/fastmmio-badinput.json"),
    (["bench", "--no-such-flag"], "unrecognized arguments"),
    (["bench", "--runs"], "expected one argument"),
    (["bench", "--device", "/nonexistent/kvm", "empty"], "cannot open /nonexistent/kvm (ENOENT)"),
    (["bench", "--device", "/dev/null", "empty"], "/dev/null is not a KVM device"),
    (["no-such-command"], "invalid choice"),
]


@pytest.mark.parametrize("argv,needle", BENCH_CASES, ids=[" ".join(a) or "(empty)" for a, _ in BENCH_CASES])
def test_bench_bad_argument(argv, needle, capsys):
    status, out, err = run_main(cli.main, argv, capsys)
    assert_one_line_usage_error(status, err, needle)
    assert out == ""


def test_bench_json_to_a_directory_is_refused_before_running(tmp_path, capsys):
    """--json naming a directory: refused up front (before the device is even opened, so the
    error is about the path although the device is bogus too)."""
    status, out, err = run_main(cli.main, ["bench", "--json", str(tmp_path), "--device", "/dev/null", "empty"], capsys)
    assert_one_line_usage_error(status, err, "is a directory")


def test_bench_json_probe_leaves_no_file_behind(tmp_path, capsys):
    """The up-front writability probe of --json removes the file it created when the command
    then fails (here: the device is not a KVM device)."""
    target = tmp_path / "out.json"
    status, out, err = run_main(cli.main, ["bench", "--json", str(target), "--device", "/dev/null", "empty"], capsys)
    assert_one_line_usage_error(status, err, "not a KVM device")
    assert not target.exists()


def test_bench_device_is_a_directory(tmp_path, capsys):
    status, out, err = run_main(cli.main, ["bench", "--device", str(tmp_path), "empty"], capsys)
    assert_one_line_usage_error(status, err, "EISDIR")


def test_bench_device_is_a_regular_file(not_a_device, capsys):
    """KVM_GET_API_VERSION on a plain file fails (ENOTTY): 'not a KVM device'."""
    status, out, err = run_main(cli.main, ["bench", "--device", str(not_a_device), "empty"], capsys)
    assert_one_line_usage_error(status, err, "is not a KVM device")


def test_no_command_prints_help_and_exits_2(capsys):
    status, out, err = run_main(cli.main, [], capsys)
    assert status == 2 and "usage:" in err and "Traceback" not in err


FUZZ_CASES = [
    (["hostile", "--runs", "0"], "must be at least 1"),
    (["hostile", "--runs", "x"], "not an integer"),
    (["hostile", "--seconds", "-1"], "must be a positive number of seconds"),
    (["hostile", "--seconds", "nan"], "must be a positive number of seconds"),
    (["hostile", "--seconds", "inf"], "must be a positive number of seconds"),
    (["hostile", "--seconds", "soon"], "not a number of seconds"),
    (["hostile", "--watchdog", "0"], "must be a positive number of seconds"),
    (["hostile", "--watchdog", "1e20"], "at most 600 s"),
    (["hostile", "--cpl", "2"], "guest CPLs must be 0 or 3"),
    (["hostile", "--cpl", ""], "comma-separated list"),
    (["hostile", "--cpl", "3,x"], "comma-separated list"),
    (["hostile", "--kind", "bogus"], "invalid choice: 'bogus'"),
    (["hostile", "--seed", "x"], "invalid int value"),
    (["hostile", "--device", "/dev/null", "--runs", "1"], "/dev/null is not a KVM device"),
    (["hostile", "--device", "/nonexistent/kvm", "--runs", "1"], "cannot open /nonexistent/kvm"),
    (["soak", "--notifications", "0"], "must be at least 1"),
    (["soak", "--batch", "-5"], "must be at least 1"),
    (["soak", "--cpl", "1"], "invalid choice: 1"),
    (["soak", "no-such-route"], "unknown route 'no-such-route'"),
    (["soak", "--device", "/dev/null", "pio-user"], "pio-user is not an in-kernel ioeventfd route"),
    (["soak", "--device", "/dev/null", "pio-eventfd-len1"], "/dev/null is not a KVM device"),
    (["bogus"], "invalid choice"),
]


@pytest.mark.parametrize("argv,needle", FUZZ_CASES, ids=[" ".join(a) for a, _ in FUZZ_CASES])
def test_fuzz_bad_argument(argv, needle, capsys):
    status, out, err = run_main(fuzz_cli.main, argv, capsys)
    assert_one_line_usage_error(status, err, needle)


@pytest.mark.parametrize("argv", [
    [sys.executable, "-m", "fastmmio", "bench", "--cpl", "2"],
    [sys.executable, "-m", "fastmmio", "bench", "--device", "/dev/null", "empty"],
    [sys.executable, "-m", "fastmmio.fuzz", "hostile", "--runs", "0"],
    [sys.executable, "-m", "fastmmio.fuzz", "soak", "--device", "/dev/null"],
])
def test_real_entry_points_exit_2_without_traceback(argv):
    """The same through the installed entry points, in a subprocess."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONFAULTHANDLER": ""})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr
