"""``fastmmio`` command line: argument parsing and the one place errors become exit codes.

Every command reports a problem as one line, ``fastmmio COMMAND: message`` (``fastmmio fuzz
hostile: ...`` for a nested one), and exits with:

* 0 on success; 1 when the command's own checks failed (see each command); 2 for a usage or
  host error (:class:`~fastmmio.errors.FastmmioError`, or argparse's own complaint);
* 130 after Ctrl-C or SIGTERM (see :mod:`fastmmio.interrupts`): one line, nothing written;
* 1 when standard output cannot be written (a closed pipe, a full disk): one line.

This module imports only the standard library at the top, so that the signal handlers are in
place before the heavy imports (numpy, matplotlib, unicorn) of the commands.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys
from typing import Any

from fastmmio import interrupts


class StdoutError(Exception):
    """Standard output could not be written (a closed pipe, a full disk)."""

    def __init__(self, exc: OSError):
        self.errno = exc.errno
        super().__init__(exc.strerror or str(exc))


class _Stdout:
    """``sys.stdout`` whose write errors become :class:`StdoutError` (so that they are told
    apart from the command's own file errors and reported in one line)."""

    def __init__(self, inner: Any):
        self._inner = inner

    def write(self, text: str) -> int:
        try:
            return self._inner.write(text)
        except OSError as exc:
            raise StdoutError(exc) from None

    def flush(self) -> None:
        try:
            self._inner.flush()
        except OSError as exc:
            raise StdoutError(exc) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null so that the interpreter's last flush of what is
    still buffered cannot fail again (it would print "Exception ignored ...")."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.close(fd)
    except OSError:
        pass


_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


class _Parser(argparse.ArgumentParser):
    """argparse that exits with status 2 and one line, ``PROG: message``, on a bad argument."""

    def error(self, message: str) -> None:  # type: ignore[override]
        m = _INVALID_CHOICE.search(message)
        if m:
            from fastmmio.errors import did_you_mean

            choices = [c.strip().strip("'") for c in m.group(2).split(",")]
            message = message[:m.end(1) + 1] + did_you_mean(m.group(1), choices) + \
                message[m.end(1) + 1:]
        self.exit(2, f"{self.prog}: {message}\n")


def _label_tree(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command's namespace its error label (its ``prog``, e.g. ``fastmmio
    fuzz hostile``); the deepest parser's default wins."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                sub.set_defaults(error_label=sub.prog)
                _label_tree(sub)


def build_parser() -> argparse.ArgumentParser:
    from fastmmio import __version__
    from fastmmio.commands import COMMAND_MODULES

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
    _label_tree(parser)
    return parser


def _guarded(label: str, fn) -> int:
    """``fn()``, with every way it can end turned into an exit status and at most one line
    on stderr labelled ``label``."""
    from fastmmio.errors import FastmmioError

    try:
        status = int(fn() or 0)
        sys.stdout.flush()
        return status
    except FastmmioError as exc:
        print(f"{label}: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt as exc:  # Interrupted, or Ctrl-C before the handler was in place
        signum = getattr(exc, "signum", None)
        what = "stopped by SIGTERM" if signum == interrupts.signal.SIGTERM else "interrupted"
        done = sys.modules.get("fastmmio.outputs")
        done = done.published() if done is not None else []
        kept = (f"; the {len(done)} file(s) written before it are complete" if done
                else "; nothing written")
        print(f"{label}: {what}{kept}", file=sys.stderr)
        return 130
    except StdoutError as exc:
        _silence_stdout()
        what = "it is closed" if exc.errno == errno.EPIPE else exc
        print(f"{label}: cannot write to standard output: {what}", file=sys.stderr)
        return 1


def dispatch(parser_factory, argv: list[str] | None, label: str) -> int:
    """Install the signal handlers, parse (``parser_factory()`` builds the parser), run the
    chosen subcommand's ``func`` and turn every way it can end into an exit status and at
    most one line on stderr (see the module docstring)."""
    interrupts.install()
    outputs = sys.modules.get("fastmmio.outputs")
    if outputs is not None:  # an earlier in-process run (tests)
        outputs.forget_published()
    real_stdout = sys.stdout
    sys.stdout = _Stdout(real_stdout)
    try:
        parsed: list[argparse.Namespace] = []

        def parse() -> int:
            parser = parser_factory()
            args, extra = parser.parse_known_args(argv)
            if extra:  # said by the subcommand's parser, not the top one's
                print(f"{getattr(args, 'error_label', label)}: unrecognized arguments: "
                      f"{' '.join(extra)}", file=sys.stderr)
                return 2
            # The command line as typed (results.json records it): the program's name and
            # the arguments parsed.
            args.command_line = [label.split()[0], *(sys.argv[1:] if argv is None else argv)]
            parsed.append(args)
            if getattr(parsed[0], "func", None) is None:
                getattr(parsed[0], "help_parser", parser).print_help(sys.stderr)
                return 2
            return 0

        status = _guarded(label, parse)
        if status or not parsed:
            return status
        args = parsed[0]
        return _guarded(getattr(args, "error_label", label), lambda: args.func(args))
    finally:
        sys.stdout = real_stdout
        # From here on the process is exiting: a late signal is ignored rather than turned
        # into a traceback at shutdown (tests calling main() restore the defaults).
        interrupts.finished()


def exit_now_if_interrupted(status: int, argv: list[str] | None) -> int:
    """After an interrupt of the real command line (``argv`` None: ``sys.argv``), leave at
    once: the interpreter's tidy shutdown of numpy, matplotlib and unicorn takes ~0.4 s on
    a busy machine and there is nothing left to save (temporary files are already gone)."""
    if status == 130 and argv is None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        os._exit(130)
    return status


def main(argv: list[str] | None = None) -> int:
    return exit_now_if_interrupted(dispatch(build_parser, argv, "fastmmio"), argv)


if __name__ == "__main__":
    raise SystemExit(main())
