"""Errors that reach the user as one clear line and exit status 2.

Every error a user can cause or meet (a missing /dev/kvm, an unsupported capability, a
rejected ioeventfd, a bad profile file or argument, a guest stopped by the watchdog when the
caller asked for a hard failure) derives from :class:`FastmmioError`; the CLI prints
``fastmmio: <message>`` and exits with :attr:`FastmmioError.exit_status`.
"""

from __future__ import annotations


class FastmmioError(Exception):
    """Base of every error the CLI reports without a traceback."""

    exit_status = 2


class HostError(FastmmioError):
    """This host cannot do what was asked: no /dev/kvm, no permission, a capability missing."""


class UsageError(FastmmioError):
    """A bad command-line argument or a bad input file (route name, profile field, ...)."""


class ProfileError(UsageError):
    """A CPU cost profile file is malformed; the message names the file and the field."""


class GuestError(FastmmioError):
    """The guest did something the run could not complete (shutdown, watchdog, KVM error)."""


class IoEventFdError(FastmmioError):
    """KVM_IOEVENTFD refused a registration (or the simulator's model of it did).

    ``errno_name`` is the kernel's answer (EINVAL, EEXIST, ENOENT); ``rule`` says in words which
    rule of ``kvm_assign_ioeventfd()`` / ``kvm_deassign_ioeventfd()`` was broken. Both backends
    raise this same type, so one set of test cases runs against both.
    """

    def __init__(self, errno_name: str, rule: str):
        self.errno_name = errno_name
        self.rule = rule
        super().__init__(f"ioeventfd rejected ({errno_name}): {rule}")


def did_you_mean(name: str, choices) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` to a misspelt ``name``
    (:func:`difflib.get_close_matches`), or ``""`` when none is close."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=2, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
