"""What the user brings to a command: their own KVM variants (``--variant-file PATH.py``, and
installed ``fastmmio.variants`` plug-ins), their own routes (``--routes-file FILE.toml``) and
their own prices (``--price EVENT=CYCLES``). Not a command itself: the commands that take a
variant, a route or a profile add these options and wrap their ``run`` in
:func:`with_extensions`, which loads what was asked before the command's own checks and
unloads it afterwards (a command run in-process leaves the registries as it found them).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from pathlib import Path
from typing import Any, Callable, Iterator

from fastmmio.costs import Profile, load_profile, override_prices
from fastmmio.errors import UsageError, did_you_mean


def price_arg(text: str) -> tuple[str, float]:
    """``EVENT=CYCLES`` -> (event, cycles); the bounds are :func:`override_prices`'s."""
    key, eq, value = text.rpartition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected EVENT=CYCLES (a price key of the profile "
                                         f"and a number of cycles), not {text!r}")
    try:
        cycles = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: {value!r} is not a number of cycles") from None
    return key.strip(), cycles


def add_variant_file_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant-file", action="append", type=Path, default=[], metavar="PATH.py",
                   help="a Python file defining KVM variants (subclasses of "
                   "fastmmio.sim.kvm.variants.Variant, each with its own name; docs/variants.md); "
                   "repeatable. Installed fastmmio.variants plug-ins are loaded too")


def add_routes_file_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--routes-file", type=Path, metavar="FILE.toml",
                   help="more routes, in the schema of the bundled catalogue "
                   "(src/fastmmio/data/routes.toml): added to it, names must be new")


def add_price_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--price", action="append", type=price_arg, default=[], metavar="EVENT=CYCLES",
                   help="override one price of the profile (a key fastmmio profile show "
                   "lists; nested:KEY for a [nested.price]); basis 'user'; repeatable")


def profile_from_args(args: argparse.Namespace, attr: str = "profile") -> Profile:
    """The profile named by ``args.<attr>`` with the ``--price`` overrides applied."""
    profile = load_profile(getattr(args, attr))
    return override_prices(profile, getattr(args, "price", []) or [])


def _check_route_variants(routes) -> None:
    from fastmmio.sim.kvm.variants import ALL_VARIANTS as VARIANTS

    for r in routes:
        if r.variant is not None and r.variant not in VARIANTS:
            raise UsageError(f"route {r.name} needs variant {r.variant!r}, which is not "
                             f"known{did_you_mean(r.variant, VARIANTS)} (variants: "
                             f"{', '.join(VARIANTS)})")


@contextlib.contextmanager
def extensions(args: argparse.Namespace) -> Iterator[None]:
    """Within the block: installed variant plug-ins and ``--variant-file`` variants are
    registered (``args.user_variants`` lists the files' names), the ``--routes-file`` routes
    are in the catalogue; every problem is one :class:`UsageError` line."""
    from fastmmio.routes import user_routes
    from fastmmio.sim.kvm.plugins import load_installed_variants, load_variant_file
    from fastmmio.sim.kvm.variants import restore_variants, snapshot_variants

    saved = snapshot_variants()
    try:
        load_installed_variants()
        names: list[str] = []
        for path in getattr(args, "variant_file", None) or []:
            names += load_variant_file(path)
        args.user_variants = names
        with contextlib.ExitStack() as stack:
            routes_file = getattr(args, "routes_file", None)
            if routes_file is not None:
                _check_route_variants(stack.enter_context(user_routes(routes_file)))
            yield
    finally:
        restore_variants(saved)


def with_extensions(run: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], Any]:
    """``run`` inside :func:`extensions`."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> Any:
        with extensions(args):
            return run(args)

    return wrapped
