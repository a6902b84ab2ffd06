"""``fastmmio report RESULTS.json``: a saved compare run's tables, verdict, plots and files
again, without simulating; ``--profile`` re-prices its stored events with another profile
(the verdict is judged again from the re-priced cells: :mod:`fastmmio.compare.saved`).

Exit status: 0; 2 for a usage error (an unreadable or foreign file, a profile that needs a
simulation the saved run lacks), one line on stderr.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.text import Text

from fastmmio.commands.compare import stdout_console
from fastmmio.costs import list_profiles, load_profile
from fastmmio.outputs import OutputFolder

DEFAULT_OUT = Path("fastmmio-report")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="re-render (and re-price) a saved compare run from its results.json",
        description="Read a results.json written by fastmmio compare and print its tables and "
        "verdict again, writing results.json, results.csv and the plots into --out. With "
        "--profile, every stored simulation is priced again with that profile and the verdict "
        "judged again from the new figures; nothing is simulated.",
    )
    p.add_argument("results", type=Path, metavar="RESULTS.json",
                   help="a results.json written by fastmmio compare")
    p.add_argument("--profile", default=None, metavar="NAME|FILE.toml",
                   help=f"price with this profile instead of the saved run's (bundled: "
                   f"{', '.join(list_profiles())}; or a .toml path)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                   help=f"output folder (default ./{DEFAULT_OUT})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastmmio.compare.saved import load_run
    from fastmmio.report.compare import render, write_outputs

    profile = load_profile(args.profile) if args.profile else None  # ProfileError: exit 2
    with OutputFolder(args.out) as folder:
        result = load_run(args.results, profile)
        result.argv = list(getattr(args, "command_line", result.argv))
        write_outputs(result, args.out)
        out = stdout_console()
        o = result.origin or {}
        out.print(Text(f"fastmmio report: {args.results} (fastmmio {o.get('fastmmio')}, "
                       f"{o.get('time_utc') or 'time not recorded'}; profile "
                       f"{o.get('profile')}"
                       + (f", re-priced with {result.profile.name}" if profile else "")
                       + "; nothing simulated)", style="bold"))
        render(out, result)
        out.print()
        paths = folder.commit()
    out.print(Text(f"Written: {', '.join(str(p) for p in paths)}"))
    return 0
