"""``fastmmio bench`` errors: one line on stderr and exit status 2, before any KVM work."""

from __future__ import annotations

import pytest

from fastmmio.cli import main

MISSING = "/nonexistent/fastmmio-test/kvm"


def run_cli(capsys, *argv):
    try:
        status = main(["bench", *argv])
    except SystemExit as exc:  # argparse errors
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def test_missing_device_is_one_line_exit_2(capsys):
    status, out, err = run_cli(capsys, "--device", MISSING, "-n", "10", "empty")
    assert status == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastmmio bench: ") and MISSING in lines[0]


def test_unknown_route_lists_the_valid_ones(capsys):
    status, out, err = run_cli(capsys, "--device", MISSING, "mmio-teleport")
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert "mmio-teleport" in lines[0] and "mmio-eventfd-len0" in lines[0] and "pio-user" in lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["--runs", "0"],
        ["--iterations", "-3"],
        ["--iterations", "ten"],
        ["--iterations", "5", "--target-ticks", "9"],
        ["--cpl", "1"],
        ["--format", "csv"],
    ],
)
def test_bad_arguments_exit_2(capsys, argv):
    status, out, err = run_cli(capsys, "--device", MISSING, *argv)
    assert status == 2
    assert len(err.strip().splitlines()) == 1


def test_json_into_a_missing_directory_is_refused_first(capsys):
    status, _, err = run_cli(capsys, "--device", MISSING, "--json", "/nonexistent/dir/out.json")
    assert status == 2 and "/nonexistent/dir" in err and MISSING not in err


def test_list_needs_no_device(capsys):
    status, out, _ = run_cli(capsys, "--device", MISSING, "--list")
    assert status == 0
    assert "mmio-eventfd-len0" in out and "[mmio-wildcard-eventfd:pci-mem]" in out


def test_watchdog_covers_the_batch_the_options_ask_for():
    """The watchdog must not stop a batch the user asked for: calibration overshoots the goal
    by up to 2x; a fixed N is bounded by the slowest access measured (an exit to userspace)."""
    import argparse

    from fastmmio.commands.bench import WORST_TICKS_PER_ACCESS, watchdog_seconds
    from fastmmio.real.backend import DEFAULT_WATCHDOG_S

    ns = argparse.Namespace(iterations=None, target_ticks=1 << 28)
    assert watchdog_seconds(ns, 2_300_000) == DEFAULT_WATCHDOG_S
    ns.target_ticks = 1 << 36  # ~30 s per batch at 2.3 GHz
    assert watchdog_seconds(ns, 2_300_000) > 2 * (1 << 36) / 2.3e9
    ns = argparse.Namespace(iterations=1_000_000, target_ticks=1 << 28)
    assert watchdog_seconds(ns, 2_300_000) > 1_000_000 * WORST_TICKS_PER_ACCESS / 2.3e9
    assert watchdog_seconds(ns, None) >= watchdog_seconds(ns, 2_300_000)
