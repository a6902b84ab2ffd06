"""Errors raised by the processor model for bad input (not for architectural events).

Architectural outcomes (a guest #PF, an EPT violation, an EPT misconfiguration) are *results*
returned by the walker, never exceptions. These exceptions are for misuse: an unknown cache
configuration, a value that does not fit a field, a reference to host memory that nobody
backed.
"""

from __future__ import annotations

from fastmmio.errors import FastmmioError, UsageError
from fastmmio.x86.bits import LayoutError  # noqa: F401 - raised by the VMX layouts too


class VmxError(FastmmioError):
    """Base of every error raised by :mod:`fastmmio.sim.vmx`."""


class HostMemoryError(VmxError):
    """A host-physical access hit memory that nobody backed, or was misaligned / badly sized."""


class CacheConfigError(VmxError, UsageError):
    """An unknown cache-configuration name, or a malformed configuration."""
