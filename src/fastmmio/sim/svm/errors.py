"""Errors of :mod:`fastmmio.sim.svm` for bad input (architectural events are results)."""

from __future__ import annotations

from fastmmio.errors import UsageError
from fastmmio.sim.vmx.errors import VmxError


class SvmError(VmxError, UsageError):
    """Bad input to the SVM processor model (a reserved TLB_CONTROL encoding, an unknown
    configuration or assumption value, a value out of range). A subclass of the VMX
    model's base error because both share the walker, memory and layouts, whose misuse
    raises that base."""
