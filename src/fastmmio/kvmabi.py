"""The KVM ioeventfd ABI, in one place: flags, valid lengths, registration checks, collisions.

Every rule here is the kernel's (include/uapi/linux/kvm.h, virt/kvm/eventfd.c); the real
backend (:mod:`fastmmio.real.objects`, which passes the flags to ``KVM_IOEVENTFD``), the KVM
model (:mod:`fastmmio.sim.kvm.eventfd`, which applies the checks) and the fuzz generator
(:mod:`fastmmio.fuzz.programs`, which draws only sets the kernel accepts) all call this module,
so that a rule corrected here is corrected for all three.

* ``kvm_assign_ioeventfd`` refuses, in this order: a length other than 0, 1, 2, 4 or 8
  (EINVAL; 0 only with ``KVM_CAP_IOEVENTFD_NO_LENGTH``, commit f848a5a8, Linux 3.18); an
  ``addr + len`` that wraps past 2**64 (EINVAL); a flag outside
  ``KVM_IOEVENTFD_VALID_FLAG_MASK`` (EINVAL); length 0 with DATAMATCH (EINVAL); before
  Linux 4.4 (``KVM_CAP_IOEVENTFD_ANY_LENGTH``, Jason Wang) also length 0 with PIO: the check
  from f848a5a8 to Linux 4.3 was ``!len && flags & (PIO | DATAMATCH)``.
* ``ioeventfd_check_collision``: an ioeventfd collides (EEXIST) with one on the same bus and
  address when either has length 0, or when both have the same length and either is a
  wildcard or both match the same datamatch value.
* ``ioeventfd_bus_from_flags``: PIO flag -> ``KVM_PIO_BUS``, VIRTIO_CCW_NOTIFY ->
  ``KVM_VIRTIO_CCW_NOTIFY_BUS``, otherwise ``KVM_MMIO_BUS``.

This module imports nothing from the project: both backends stand on it.
"""

from __future__ import annotations

from typing import NamedTuple

U64_MAX = (1 << 64) - 1

# include/uapi/linux/kvm.h: enum kvm_ioeventfd_flag_nr_* shifted into flag bits.
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY = 1 << 3
KVM_IOEVENTFD_FLAG_FAST_MMIO = 1 << 4  # defined in the uapi, inside the valid mask, unused on x86
KVM_IOEVENTFD_VALID_FLAG_MASK = (1 << 5) - 1  # kvm_ioeventfd_flag_nr_max == 5

# kvm_assign_ioeventfd's switch on args->len
IOEVENTFD_LENGTHS = (0, 1, 2, 4, 8)
IOEVENTFD_LENGTHS_WITHOUT_NO_LENGTH = (1, 2, 4, 8)  # KVM before KVM_CAP_IOEVENTFD_NO_LENGTH

# The registration rules of virt/kvm/eventfd.c, in words.
RULE_LENGTH = "length must be 0, 1, 2, 4 or 8 (kvm_assign_ioeventfd)"
RULE_LENGTH_NO_LENGTH_CAP = "length must be 1, 2, 4 or 8 (kvm_assign_ioeventfd; no KVM_CAP_IOEVENTFD_NO_LENGTH)"
RULE_WRAP = "address + length wraps around the end of the address space (kvm_assign_ioeventfd)"
RULE_FLAGS = "unknown flag bits (kvm_assign_ioeventfd: KVM_IOEVENTFD_VALID_FLAG_MASK)"
RULE_LEN0_DATAMATCH = "length 0 (any width) cannot be combined with DATAMATCH (kvm_assign_ioeventfd)"
RULE_LEN0_PIO = ("length 0 (any width) cannot be combined with PIO (kvm_assign_ioeventfd before "
                 "Linux 4.4: no KVM_CAP_IOEVENTFD_ANY_LENGTH)")
RULE_DUPLICATE = "an identical ioeventfd is already registered (ioeventfd_check_collision)"
RULE_DATAMATCH_ON_WILDCARD = (
    "a DATAMATCH ioeventfd on the address of a wildcard one with the same length collides "
    "(ioeventfd_check_collision)"
)
RULE_WILDCARD_ON_DATAMATCH = (
    "a wildcard ioeventfd on the address of a DATAMATCH one with the same length collides "
    "(ioeventfd_check_collision)"
)
RULE_LENGTH0_COLLISION = (
    "a length-0 ioeventfd collides with any other on the same bus and address "
    "(ioeventfd_check_collision)"
)
RULE_UNKNOWN_DEASSIGN = (
    "no registered ioeventfd has this eventfd, bus, address, length and datamatch "
    "(kvm_deassign_ioeventfd_idx)"
)
RULE_NOT_EVENTFD = "the fd is not an open eventfd (eventfd_ctx_fdget)"
RULE_BUS_FULL = "the I/O bus has no room for another device (kvm_io_bus_register_dev)"

KVM_PIO_BUS = "KVM_PIO_BUS"
KVM_MMIO_BUS = "KVM_MMIO_BUS"
KVM_VIRTIO_CCW_NOTIFY_BUS = "KVM_VIRTIO_CCW_NOTIFY_BUS"


def ioeventfd_flags(*, pio: bool, datamatch: bool, deassign: bool = False, extra: int = 0) -> int:
    """``struct kvm_ioeventfd.flags`` for a registration (``extra``: raw bits OR'ed in)."""
    flags = extra
    if pio:
        flags |= KVM_IOEVENTFD_FLAG_PIO
    if datamatch:
        flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
    if deassign:
        flags |= KVM_IOEVENTFD_FLAG_DEASSIGN
    return flags


def ioeventfd_bus_from_flags(flags: int) -> str:
    """``ioeventfd_bus_from_flags``: the name of the bus the registration goes on."""
    if flags & KVM_IOEVENTFD_FLAG_PIO:
        return KVM_PIO_BUS
    if flags & KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY:
        return KVM_VIRTIO_CCW_NOTIFY_BUS
    return KVM_MMIO_BUS


def assign_check(addr: int, length: int, flags: int, *, no_length: bool = True,
                 pio_no_length: bool = True) -> tuple[str, str] | None:
    """``kvm_assign_ioeventfd``'s argument checks, in the kernel's order: ``(errno name, rule
    with the offending value)`` for the first one broken, or None when the arguments pass
    (the collision check comes after, see :func:`collides`). ``no_length``: the kernel has
    ``KVM_CAP_IOEVENTFD_NO_LENGTH``; ``pio_no_length``: it has
    ``KVM_CAP_IOEVENTFD_ANY_LENGTH`` (Linux 4.4), so a length-0 PIO ioeventfd is accepted."""
    if length not in (IOEVENTFD_LENGTHS if no_length else IOEVENTFD_LENGTHS_WITHOUT_NO_LENGTH):
        return "EINVAL", f"{RULE_LENGTH if no_length else RULE_LENGTH_NO_LENGTH_CAP}; got {length}"
    if addr + length > U64_MAX:
        return "EINVAL", f"{RULE_WRAP}; {addr:#x}+{length}"
    if flags & ~KVM_IOEVENTFD_VALID_FLAG_MASK:
        return "EINVAL", f"{RULE_FLAGS}; flags {flags:#x}"
    if length == 0 and flags & KVM_IOEVENTFD_FLAG_DATAMATCH:
        return "EINVAL", RULE_LEN0_DATAMATCH
    if length == 0 and flags & KVM_IOEVENTFD_FLAG_PIO and not pio_no_length:
        return "EINVAL", RULE_LEN0_PIO
    return None


class IoEventFdKey(NamedTuple):
    """What ``ioeventfd_check_collision`` compares: bus, address, length and the datamatch
    value (None for a wildcard). ``bus`` is any value equal for the same bus."""

    bus: object
    addr: int
    length: int
    datamatch: int | None


def collides(a: IoEventFdKey, b: IoEventFdKey) -> bool:
    """``ioeventfd_check_collision``: same bus and address, and a length 0 on either side, or
    the same length with a wildcard on either side or equal datamatch values."""
    return (a.bus == b.bus and a.addr == b.addr
            and (not a.length or not b.length
                 or (a.length == b.length
                     and (a.datamatch is None or b.datamatch is None or a.datamatch == b.datamatch))))


def collision_rule(new: IoEventFdKey, existing: IoEventFdKey) -> str:
    """Which branch of ``ioeventfd_check_collision`` refuses ``new`` beside ``existing``
    (the two collide, see :func:`collides`)."""
    if 0 in (new.length, existing.length) and not (
            new.length == existing.length and new.datamatch == existing.datamatch):
        return RULE_LENGTH0_COLLISION
    if new.datamatch is not None and existing.datamatch is None:
        return RULE_DATAMATCH_ON_WILDCARD
    if new.datamatch is None and existing.datamatch is not None:
        return RULE_WILDCARD_ON_DATAMATCH
    return RULE_DUPLICATE
