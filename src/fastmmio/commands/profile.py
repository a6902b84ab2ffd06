"""``fastmmio profile list|show``: the CPU cost profiles, bundled or the user's.

``list`` names the bundled profiles with their CPU and description. ``show NAME|FILE`` prints
every price of one profile (after ``extends`` and any ``--price`` override): its key, cycles,
component, basis, interval when the profile gives one, and source; then the free events with
their reasons and the nested table.

Exit status: 0, or 2 for an unknown profile or a bad file (one line on stderr).
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fastmmio.commands.extensions import add_price_argument, profile_from_args
from fastmmio.costs import Price, Profile, list_profiles, load_profile


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile",
        help="list the bundled CPU cost profiles, or show one's prices and their sources",
        description="CPU cost profiles price the events the models count. 'list' names the "
        "bundled ones; 'show NAME|FILE' prints every price with its component, basis, "
        "interval and source (a profile file may extend another: see docs/variants.md).",
    )
    sub = p.add_subparsers(dest="profile_command", metavar="ACTION",
                           parser_class=subparsers._parser_class)
    p.set_defaults(func=None, help_parser=p)
    ls = sub.add_parser("list", help="the bundled profiles",
                        description="The bundled profiles: name, CPU, description.")
    ls.set_defaults(func=run_list)
    show = sub.add_parser("show", help="every price of a profile, with its source",
                          description="Every price of a profile (bundled name or .toml file, "
                          "with what it extends merged in) with component, basis, interval "
                          "and source; then its free events and its nested table.")
    show.add_argument("profile", metavar="NAME|FILE", help="a bundled name or a .toml path")
    add_price_argument(show)
    show.set_defaults(func=run_show)


def _console() -> Console:
    term = Console()
    return term if term.is_terminal else Console(width=200)


def run_list(args: argparse.Namespace) -> int:
    table = Table(title="bundled CPU cost profiles (fastmmio profile show NAME)",
                  title_justify="left")
    for col in ("name", "cpu", "nested", "description"):
        table.add_column(col, overflow="fold")
    for name in list_profiles():
        prof = load_profile(name)
        table.add_row(name, prof.cpu, "yes" if prof.nested is not None else "no",
                      prof.description)
    _console().print(table)
    return 0


def _interval(p: Price) -> str:
    interval = getattr(p, "interval", None)
    return f"{interval[0]:g}-{interval[1]:g}" if interval else ""


def price_table(title: str, prices: dict[str, Price]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("price key", no_wrap=True)
    table.add_column("cycles", justify="right", no_wrap=True)
    table.add_column("component", no_wrap=True)
    table.add_column("basis", no_wrap=True)
    table.add_column("interval", no_wrap=True)
    table.add_column("source", overflow="fold")
    for key in sorted(prices):
        p = prices[key]
        source = p.source + (f" [{p.source_ref}]" if p.source_ref else "")
        table.add_row(key + (" (exact)" if p.exact else ""), f"{p.cycles:,.6g}", p.component,
                      p.basis, _interval(p), Text(source))
    return table


def show_lines(prof: Profile) -> list[str]:
    lines = [f"profile {prof.name} ({prof.origin}): {prof.description}", f"cpu: {prof.cpu}"]
    if prof.extends:
        lines.append("extends: " + " -> ".join(prof.extends))
    if prof.notes:
        lines.append(f"notes: {prof.notes}")
    return lines


def run_show(args: argparse.Namespace) -> int:
    prof = profile_from_args(args)
    out = _console()
    for line in show_lines(prof):
        out.print(Text(line))
    out.print(price_table(f"{len(prof.prices)} prices", dict(prof.prices)))
    if prof.free:
        free = Table(title=f"{len(prof.free)} free events (priced at nothing)",
                     title_justify="left")
        free.add_column("key", no_wrap=True)
        free.add_column("why", overflow="fold")
        for key in sorted(prof.free):
            f = prof.free[key]
            free.add_row(key + (" (exact)" if f.exact else ""), Text(f.reason))
        out.print(free)
    if prof.nested is not None:
        n = prof.nested
        out.print(Text(f"nested (KVM as a guest): {n.description} [{n.source}]"))
        if n.scale:
            out.print(Text("  scale: " + ", ".join(f"{c} x{f:g}" for c, f in n.scale.items())))
        if n.prices:
            out.print(price_table(f"{len(n.prices)} nested prices (nested:KEY for --price)",
                                  dict(n.prices)))
    return 0
