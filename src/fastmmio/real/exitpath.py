"""The run loop's per-exit host path, compiled: an optional C extension and its selection.

:mod:`fastmmio.real._exitpath` (``_exitpath.c``, built by pip at install time when a C
compiler is there; ``optional=True`` in setup.py, so an install without one still succeeds)
runs KVM_RUN, the ``kvm_run`` decode, the device model's answers, the coalesced-ring drain,
the exit histogram and the exit sample in C, with the GIL released for the whole batch. It
hands back to Python only what needs Python: the done OUT, KVM_RUN returning EINTR (the
watchdog's ``immediate_exit`` plus ``pthread_kill``, or another signal whose handler then
runs), an exit reason the device model does not serve, a full histogram table.

The pure-Python loop of :class:`fastmmio.real.runloop.RunLoop` stays the reference and the
fallback: both give identical BatchResults (tests/kvm/test_exitpath.py). Which one runs:
``engine="auto"`` (the default) takes the compiled path when the extension imports,
``"python"`` the pure-Python loop, ``"c"`` insists on the compiled one. The environment
variable ``FASTMMIO_RUN_ENGINE`` (same three values) overrides ``"auto"``.

Every offset the C code reads comes from :mod:`fastmmio.real.binding` (:func:`layout`), so the
uapi is described once.
"""

from __future__ import annotations

import ctypes
import os

from fastmmio.errors import UsageError
from fastmmio.real import binding as B

try:
    from fastmmio.real import _exitpath as compiled
except ImportError:  # no compiler at install time, or a source tree without a build
    compiled = None  # type: ignore[assignment]

ENGINES = ("auto", "c", "python")
ENV = "FASTMMIO_RUN_ENGINE"


def available() -> bool:
    return compiled is not None


def choose(engine: str = "auto") -> str:
    """``"c"`` or ``"python"``: the loop a RunLoop asked for ``engine`` uses on this install."""
    if engine == "auto":
        engine = os.environ.get(ENV, "auto") or "auto"
    if engine not in ENGINES:
        raise UsageError(f"run-loop engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "c" and compiled is None:
        raise UsageError(
            "run-loop engine 'c': the compiled extension fastmmio.real._exitpath is not built "
            "(reinstall with a C compiler and the Python headers present)"
        )
    if engine == "auto":
        return "c" if compiled is not None else "python"
    return engine


def layout() -> tuple[int, ...]:
    """The request number, exit reasons and byte offsets the C engine reads, in its order."""
    u = B.kvm_run.u.offset
    io, mmio = B._kvm_run_io, B._kvm_run_mmio
    ent = B.kvm_coalesced_mmio
    return (
        B.KVM_RUN,
        B.kvm_run.exit_reason.offset,
        B.KVM_EXIT_IO,
        B.KVM_EXIT_MMIO,
        B.KVM_EXIT_IO_OUT,
        u + io.direction.offset,
        u + io.size.offset,
        u + io.port.offset,
        u + io.count.offset,
        u + io.data_offset.offset,
        u + mmio.phys_addr.offset,
        u + mmio.data.offset,
        u + mmio.len.offset,
        u + mmio.is_write.offset,
        ctypes.sizeof(B.kvm_coalesced_mmio_ring),
        ctypes.sizeof(ent),
        ent.phys_addr.offset,
        ent.len.offset,
        ent.pio.offset,
        ent.data.offset,
    )
