"""``fastmmio diff A.json B.json``: what changed between two saved compare runs, per route and
variant (cycles, ratio to PIO, exits, walk references, status), the verdict's words, and the
measured KVM medians with changes inside the measured spread marked as noise
(:mod:`fastmmio.report.diff`).

Exit status: 0 (whether or not anything changed); 2 for a usage error, one line on stderr.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.text import Text

from fastmmio.commands.compare import stdout_console
from fastmmio.outputs import check_writable_file, is_stdout, write_text


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "diff",
        help="what changed between two saved compare runs (results.json)",
        description="Compare two results.json files of fastmmio compare (A before, B after): "
        "per route and variant the cycles, ratio to PIO, exits, walk references and status "
        "that changed; the verdict's words that changed; and the measured KVM medians, a "
        "change inside the runs' spread marked as noise.",
    )
    p.add_argument("a", type=Path, metavar="A.json", help="the earlier run's results.json")
    p.add_argument("b", type=Path, metavar="B.json", help="the later run's results.json")
    p.add_argument("--json", default=None, metavar="FILE|-",
                   help="also write the differences as JSON ('-': standard output, instead "
                   "of the tables)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastmmio.compare.saved import read_results
    from fastmmio.report.diff import diff_results, kvm_table, sim_table, summary, words_table

    if args.json is not None:
        check_writable_file(Path(args.json))
    a, b = read_results(args.a), read_results(args.b)
    d = diff_results(a, b)
    if args.json is not None:
        text = json.dumps(d.to_json(), indent=2) + "\n"
        if is_stdout(args.json):
            print(text, end="")
            return 0
        write_text(Path(args.json), text)
    out = stdout_console()
    for who, doc, path in (("A", a, args.a), ("B", b, args.b)):
        r = doc.get("run") or {}
        out.print(Text(f"{who}: {path}: fastmmio {doc.get('fastmmio')}, "
                       f"{r.get('time_utc') or 'time not recorded'}, profile "
                       f"{(doc.get('profile') or {}).get('name')}"
                       + (f": {' '.join(r['argv'])}" if r.get("argv") else "")))
    for n in d.notes:
        out.print(Text("Note: " + n, style="yellow"))
    for t in (words_table(d), sim_table(d), kvm_table(d)):
        if t is not None:
            out.print(t)
    out.print(Text(summary(d), style="bold"))
    return 0
