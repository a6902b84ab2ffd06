"""Running the ``fastmmio`` command line in-process in a test, and the one-line error rule."""

from __future__ import annotations

import re

from fastmmio import cli

LINE = re.compile(r"fastmmio( [a-z]+)*: ")  # the one error style: fastmmio COMMAND: message


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``fastmmio ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        status = cli.main(argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    return status, out, err


def one_line(err: str) -> str:
    """The single line of ``err``, which must be ``fastmmio COMMAND: message``."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert LINE.match(lines[0]), err
    return lines[0]
