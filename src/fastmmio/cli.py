"""``fastmmio`` command line: argument parsing and the one place errors become exit codes."""

from __future__ import annotations

import argparse
import importlib
import sys

from fastmmio import __version__
from fastmmio.commands import COMMAND_MODULES
from fastmmio.errors import FastmmioError


class _Parser(argparse.ArgumentParser):
    """argparse that exits with status 2 and one line on a bad argument (its default too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastmmio",
        description="What a guest's doorbell write (port I/O or MMIO) costs under KVM, "
        "on which path, and why.",
    )
    parser.add_argument("--version", action="version", version=f"fastmmio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that command is not built yet
                continue
            raise
        module.register(sub)
    return parser


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None, label: str) -> int:
    """Parse, run the chosen subcommand's ``func``, and turn a :class:`FastmmioError` into
    ``label: message`` on stderr and its exit status (2), an interrupt into 130."""
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except FastmmioError as exc:
        print(f"{label}: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"{label}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv, "fastmmio")


if __name__ == "__main__":
    raise SystemExit(main())
