"""Soak the real backend: a million notifications through every in-kernel ioeventfd route.

    python benchmarks/soak_real.py [--notifications N] [--batch B] [ROUTE ...]

Per route: notifications, eventfd signals, lost signals (must be 0), userspace exits (must
be 0), in-kernel exits from KVM's binary stats, time and microseconds per notification. The
same as ``python -m fastmmio.fuzz soak`` (fastmmio.fuzz.soak); ``make soak`` runs it. Not a
``bench_*`` script: it checks reliability, it does not compare speeds.
"""

import sys

from fastmmio.fuzz.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["soak", *sys.argv[1:]]))
