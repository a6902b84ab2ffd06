"""The interface both backends implement.

A backend opens a :class:`Session` on a :class:`~fastmmio.machine.Machine` (creating the VM or
the simulated one), runs batches of N accesses in it (the guest reads N from its mailbox, runs
the timed loop, writes its results and OUTs to the done port, then waits for the next batch),
and closes it, releasing every file descriptor and VM. Calibration (doubling N) and medians
live above this, in :mod:`fastmmio.bench`, so both backends are measured the same way.
"""

from __future__ import annotations

from typing import Protocol

from fastmmio.machine import Machine
from fastmmio.result import BatchResult


class Session(Protocol):
    def run_batch(self, iterations: int) -> BatchResult: ...

    def read_guest(self, gpa: int, size: int) -> bytes: ...

    def close(self) -> None: ...

    def __enter__(self) -> "Session": ...

    def __exit__(self, *exc: object) -> None: ...


class Backend(Protocol):
    name: str

    def open(self, machine: Machine) -> Session: ...
