"""argparse ``type=`` converters shared by every command: each turns a bad value into an
``argparse.ArgumentTypeError`` (one line, exit status 2), never a traceback."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def integer(text: str) -> int:
    """An integer in any base Python reads (``64``, ``0x40``, ``1_000``)."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def int_in_range(lo: int, hi: int) -> Callable[[str], int]:
    """A converter for integers in ``[lo, hi]``."""

    def convert(text: str) -> int:
        value = integer(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}")
        return value

    return convert


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text}")
    return value


def percent(text: str) -> float:
    """``5`` or ``5%`` -> 0.05; strictly between 0 and 100."""
    try:
        v = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < v < 100:
        raise argparse.ArgumentTypeError("must be between 0 and 100 (percent)")
    return v / 100.0


def cpu_number(text: str) -> int:
    """A CPU number (``--cpu``); whether this process may run there is checked by
    :func:`fastmmio.bench.check_cpu`."""
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a CPU number: {text}")
    return value


def on_off(text: str) -> bool:
    t = text.strip().lower()
    if t in ("on", "1", "yes", "true"):
        return True
    if t in ("off", "0", "no", "false"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, not {text!r}")


def csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def nested_l0(text: str) -> str:
    """``--nested`` value: ``off`` or an L0 model name (:data:`fastmmio.sim.nested.L0_MODELS`)."""
    from fastmmio.errors import UsageError
    from fastmmio.sim.nested import nested_setting

    try:
        return nested_setting(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
