"""``fastmmio fuzz hostile|soak|diff``: reliability runs on this host's KVM (see
:mod:`fastmmio.fuzz.cli`; ``python -m fastmmio.fuzz`` is the same command)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from fastmmio.fuzz.cli import add_subcommands

    p = subparsers.add_parser(
        "fuzz",
        help="reliability on this host's KVM: hostile guests, the ioeventfd soak, "
        "differential fuzzing against the simulator",
        description="Reliability runs on real KVM: hostile guests (hostile), a great many "
        "notifications through every ioeventfd route (soak), and random programs on the "
        "simulator and on KVM side by side (diff).",
    )
    sub = p.add_subparsers(dest="fuzz_command", metavar="SUBCOMMAND",
                           parser_class=subparsers._parser_class)
    add_subcommands(sub)
    p.set_defaults(func=None, help_parser=p)
