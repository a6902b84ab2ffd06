"""ioeventfd cases shared by the real-KVM tests and the simulator tests.

One table, two backends: every case here must give the same answer from ``/dev/kvm`` and from
:mod:`fastmmio.sim.kvm.eventfd`. Both take the registration rules from :mod:`fastmmio.kvmabi`
(the real backend to name the rule the kernel applied, the model to apply it), so this table
holds that one module to the kernel. The rules come from virt/kvm/eventfd.c
(``kvm_assign_ioeventfd``, ``ioeventfd_check_collision``, ``kvm_deassign_ioeventfd_idx``,
``ioeventfd_in_range``) and virt/kvm/kvm_main.c (``kvm_io_bus_cmp``); the real-KVM tests check
them on this project's host.

REGISTRATION_CASES: a sequence of ``KVM_IOEVENTFD`` calls on a fresh VM; each call says the
errno name the kernel answers (``None`` = success). ``fd`` is an index: calls with the same
index use the same eventfd, so a deassign with another index names another eventfd.
``extra_flags`` are raw flag bits OR'ed in (used only for the "unknown flag" rule; a backend
API that cannot pass raw flags skips those calls, see :func:`needs_raw_flags`).

MATCH_CASES: ioeventfds registered, then one guest write (``out`` for PIO, a MOV store for
MMIO) of ``width`` bytes of ``value`` at ``addr``; ``fires`` lists the ``fd`` indices whose
counter goes up by one (every other stays 0). An empty ``fires`` means no ioeventfd took it:
the write exits to userspace (``KVM_EXIT_IO`` / ``KVM_EXIT_MMIO``) on both backends. MMIO
addresses are in the MMIO hole (no memslot).

Use :func:`run_registration_case` with a backend's ``call(Call)`` function that performs the
call and raises :class:`fastmmio.errors.IoEventFdError` when it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from fastmmio.errors import IoEventFdError
from fastmmio.layout import DOORBELL_GPA, DOORBELL_PORT

U64_MAX = (1 << 64) - 1
A = DOORBELL_GPA
P = DOORBELL_PORT


@dataclass(frozen=True)
class Call:
    """One KVM_IOEVENTFD call (fields of ``struct kvm_ioeventfd``) and its expected errno."""

    op: str  # "assign" | "deassign"
    addr: int
    len: int
    pio: bool = False
    datamatch: int | None = None  # None = wildcard (no KVM_IOEVENTFD_FLAG_DATAMATCH)
    fd: int = 0
    extra_flags: int = 0
    expect: str | None = None  # errno name, or None for success


def assign(addr: int, len: int, **kw) -> Call:  # noqa: A002 - mirrors struct field
    return Call("assign", addr, len, **kw)


def deassign(addr: int, len: int, **kw) -> Call:  # noqa: A002
    return Call("deassign", addr, len, **kw)


@dataclass(frozen=True)
class RegistrationCase:
    name: str
    source: str  # kernel function / rule the case checks
    calls: tuple[Call, ...]


@dataclass(frozen=True)
class MatchCase:
    name: str
    source: str
    registrations: tuple[Call, ...]
    pio: bool
    addr: int
    width: int
    value: int
    fires: tuple[int, ...] = field(default=())


def needs_raw_flags(case: RegistrationCase) -> bool:
    return any(c.extra_flags for c in case.calls)


REGISTRATION_CASES: tuple[RegistrationCase, ...] = (
    *(RegistrationCase(f"mmio-length-{n}-accepted", "kvm_assign_ioeventfd: len 0/1/2/4/8",
                       (assign(A, n),)) for n in (0, 1, 2, 4, 8)),
    *(RegistrationCase(f"pio-length-{n}-accepted", "kvm_assign_ioeventfd: len 0/1/2/4/8",
                       (assign(P, n, pio=True),)) for n in (0, 1, 2, 4, 8)),
    *(RegistrationCase(f"length-{n}-einval", "kvm_assign_ioeventfd: other lengths EINVAL",
                       (assign(A, n, expect="EINVAL"),)) for n in (3, 5, 16)),
    RegistrationCase("length-0-datamatch-einval",
                     "kvm_assign_ioeventfd: no length 0 with DATAMATCH",
                     (assign(A, 0, datamatch=0, expect="EINVAL"),
                      assign(P, 0, pio=True, datamatch=1, expect="EINVAL"))),
    RegistrationCase("wrap-einval", "kvm_assign_ioeventfd: addr + len must not wrap",
                     (assign(U64_MAX - 7, 8, expect="EINVAL"),
                      assign(U64_MAX - 1, 4, expect="EINVAL"),
                      assign(U64_MAX - 8, 8))),
    RegistrationCase("unknown-flag-einval",
                     "kvm_assign_ioeventfd: flags outside KVM_IOEVENTFD_VALID_FLAG_MASK",
                     (assign(A, 4, extra_flags=1 << 5, expect="EINVAL"),
                      assign(A, 4, extra_flags=1 << 31, expect="EINVAL"))),
    RegistrationCase("duplicate-wildcard-eexist", "ioeventfd_check_collision",
                     (assign(A, 4), assign(A, 4, fd=1, expect="EEXIST"))),
    RegistrationCase("datamatch-on-wildcard-eexist", "ioeventfd_check_collision",
                     (assign(A, 4), assign(A, 4, datamatch=1, fd=1, expect="EEXIST"))),
    RegistrationCase("wildcard-on-datamatch-eexist", "ioeventfd_check_collision",
                     (assign(P, 2, pio=True, datamatch=1),
                      assign(P, 2, pio=True, fd=1, expect="EEXIST"))),
    RegistrationCase("equal-datamatch-eexist", "ioeventfd_check_collision",
                     (assign(P, 2, pio=True, datamatch=7),
                      assign(P, 2, pio=True, datamatch=7, fd=1, expect="EEXIST"))),
    RegistrationCase("different-datamatch-accepted", "ioeventfd_check_collision",
                     (assign(P, 2, pio=True, datamatch=0), assign(P, 2, pio=True, datamatch=1, fd=1),
                      assign(P, 2, pio=True, datamatch=2, fd=1))),
    RegistrationCase("length-0-collides-with-any-length", "ioeventfd_check_collision: !len",
                     (assign(A, 0), assign(A, 4, fd=1, expect="EEXIST"),
                      assign(A, 1, datamatch=3, fd=1, expect="EEXIST"),
                      assign(A, 0, fd=1, expect="EEXIST"))),
    RegistrationCase("any-length-blocks-length-0", "ioeventfd_check_collision: !len",
                     (assign(A, 2, datamatch=1), assign(A, 0, fd=1, expect="EEXIST"))),
    RegistrationCase("different-lengths-same-address", "ioeventfd_check_collision",
                     (assign(A, 4), assign(A, 2, fd=1), assign(A, 8, fd=2))),
    RegistrationCase("neighbouring-address-accepted", "ioeventfd_check_collision: same addr only",
                     (assign(A, 0), assign(A + 1, 0, fd=1), assign(A + 4, 4, fd=2))),
    RegistrationCase("pio-and-mmio-are-separate-buses", "ioeventfd_check_collision: same bus only",
                     (assign(0xE000, 0, pio=True), assign(0xE000, 0, fd=1))),
    RegistrationCase("deassign-unknown-enoent", "kvm_deassign_ioeventfd_idx",
                     (deassign(A, 4, expect="ENOENT"),)),
    RegistrationCase("deassign-other-eventfd-enoent", "kvm_deassign_ioeventfd_idx: p->eventfd",
                     (assign(A, 4), deassign(A, 4, fd=1, expect="ENOENT"), deassign(A, 4))),
    RegistrationCase("deassign-other-length-enoent", "kvm_deassign_ioeventfd_idx: p->length",
                     (assign(A, 4), deassign(A, 2, expect="ENOENT"), deassign(A, 4))),
    RegistrationCase("deassign-other-datamatch-enoent", "kvm_deassign_ioeventfd_idx: datamatch",
                     (assign(P, 1, pio=True, datamatch=5),
                      deassign(P, 1, pio=True, datamatch=6, expect="ENOENT"),
                      deassign(P, 1, pio=True, expect="ENOENT"),
                      deassign(P, 1, pio=True, datamatch=5))),
    RegistrationCase("deassign-twice-enoent", "kvm_deassign_ioeventfd_idx",
                     (assign(A, 8), deassign(A, 8), deassign(A, 8, expect="ENOENT"))),
    RegistrationCase("length-0-mmio-reassign-after-deassign",
                     "kvm_deassign_ioeventfd: length-0 MMIO leaves KVM_FAST_MMIO_BUS too",
                     (assign(A, 0), deassign(A, 0), assign(A, 0, fd=1), deassign(A, 0, fd=1))),
)


MATCH_CASES: tuple[MatchCase, ...] = (
    MatchCase("length-0-any-width", "ioeventfd_in_range: !p->length", (assign(A, 0),),
              False, A, 4, 0xDEAD, (0,)),
    MatchCase("length-0-byte", "ioeventfd_in_range: !p->length", (assign(A, 0),),
              False, A, 1, 1, (0,)),
    MatchCase("length-0-quad", "ioeventfd_in_range: !p->length", (assign(A, 0),),
              False, A, 8, 1, (0,)),
    MatchCase("length-0-exact-address", "kvm_io_bus_cmp: len 0 matches the exact address",
              (assign(A, 0),), False, A + 4, 4, 1, ()),
    MatchCase("wildcard-same-length", "ioeventfd_in_range: wildcard", (assign(A, 4),),
              False, A, 4, 0x1234, (0,)),
    MatchCase("wildcard-shorter-access", "ioeventfd_in_range: len != p->length",
              (assign(A, 4),), False, A, 2, 0x1234, ()),
    MatchCase("wildcard-inside-not-at-start", "ioeventfd_in_range: addr != p->addr",
              (assign(A, 4),), False, A + 2, 2, 0x1234, ()),
    MatchCase("wildcard-longer-access", "kvm_io_bus_cmp: the access must lie inside the range",
              (assign(A, 4),), False, A, 8, 0x1234, ()),
    MatchCase("datamatch-equal", "ioeventfd_in_range: datamatch",
              (assign(A, 4, datamatch=0x55AA),), False, A, 4, 0x55AA, (0,)),
    MatchCase("datamatch-different", "ioeventfd_in_range: datamatch",
              (assign(A, 4, datamatch=0x55AA),), False, A, 4, 0x55AB, ()),
    MatchCase("datamatch-wider-than-access-never-matches",
              "ioeventfd_in_range: value zero-extended from the access width vs u64 datamatch",
              (assign(A, 1, datamatch=0x1FF),), False, A, 1, 0xFF, ()),
    MatchCase("datamatch-second-device-tried", "__kvm_io_bus_write: devices tried in order",
              (assign(A, 2, datamatch=1), assign(A, 2, datamatch=2, fd=1)),
              False, A, 2, 2, (1,)),
    MatchCase("pio-length-0", "ioeventfd_in_range: !p->length (PIO)",
              (assign(P, 0, pio=True),), True, P, 2, 0, (0,)),
    MatchCase("pio-datamatch-queue-index", "ioeventfd_in_range: datamatch (QEMU PIO notify)",
              (assign(P, 2, pio=True, datamatch=0), assign(P, 2, pio=True, datamatch=1, fd=1)),
              True, P, 2, 1, (1,)),
    MatchCase("pio-datamatch-miss", "ioeventfd_in_range: datamatch",
              (assign(P, 2, pio=True, datamatch=0),), True, P, 2, 3, ()),
    MatchCase("pio-does-not-see-mmio", "separate buses",
              (assign(P, 1),), True, P, 1, 0, ()),
    MatchCase("different-lengths-pick-by-width", "ioeventfd_in_range: len == p->length",
              (assign(A, 4), assign(A, 2, fd=1), assign(A, 1, fd=2)), False, A, 2, 9, (1,)),
)


def run_registration_case(case: RegistrationCase, call: Callable[[Call], None]) -> list[str]:
    """Perform every call; return a list of mismatches (empty when the backend agrees)."""
    problems: list[str] = []
    for i, c in enumerate(case.calls):
        got: str | None
        try:
            call(c)
            got = None
        except IoEventFdError as e:
            got = e.errno_name
        if got != c.expect:
            problems.append(f"{case.name} call {i} ({c}): expected {c.expect}, got {got}")
    return problems
