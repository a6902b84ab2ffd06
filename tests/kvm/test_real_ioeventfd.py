"""KVM_IOEVENTFD on the real kernel: the shared case table (tests/ioeventfd_cases.py) and the
rule each refusal names (virt/kvm/eventfd.c: kvm_assign_ioeventfd, ioeventfd_check_collision,
kvm_deassign_ioeventfd_idx). The simulator runs the same table against its model."""

from __future__ import annotations

import os

import pytest

from ioeventfd_cases import MATCH_CASES, REGISTRATION_CASES, Call, run_registration_case
from fastmmio import layout
from fastmmio.errors import IoEventFdError
from fastmmio.guest.build import build_image
from fastmmio.guest.program import Access, AccessKind
from fastmmio.machine import IoEventFdSpec, Machine, MachineSpec, MemSlot
from fastmmio.real import objects as O
from fastmmio.real.backend import RealBackend

A, P = layout.DOORBELL_GPA, layout.DOORBELL_PORT


@pytest.fixture
def vm(kvm_device):
    with O.Kvm(kvm_device) as kvm, kvm.create_vm() as vm:
        vm.add_memslot(0, 0, layout.RAM_SIZE)
        yield vm


def _caller(vm: O.Vm):
    """Perform a case-table Call on ``vm``; calls with the same fd index share one eventfd."""
    fds: dict[int, int] = {}

    def call(c: Call) -> None:
        if c.fd not in fds:
            fds[c.fd] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        ev = O.IoEventFd(f"fd{c.fd}", c.pio, c.addr, c.len, c.datamatch, eventfd=fds[c.fd],
                         extra_flags=c.extra_flags)
        if c.op == "assign":
            vm.assign_ioeventfd(ev)
        else:
            vm.deassign_ioeventfd(ev)

    def close() -> None:
        for fd in fds.values():
            os.close(fd)

    return call, close


@pytest.mark.parametrize("case", REGISTRATION_CASES, ids=[c.name for c in REGISTRATION_CASES])
def test_registration_case(vm, case):
    """Each call gets the errno the case table says the kernel answers (source: case.source)."""
    call, close = _caller(vm)
    try:
        assert run_registration_case(case, call) == []
    finally:
        vm.close()  # deassigns nothing by hand: destroying the VM drops the registrations
        close()


# (what is registered first, the refused registration, errno, words the rule must contain)
RULE_CASES = [
    ((), dict(pio=True, addr=P, length=3), "EINVAL", "length must be 0, 1, 2, 4 or 8"),
    ((), dict(pio=False, addr=A, length=16), "EINVAL", "length must be 0, 1, 2, 4 or 8"),
    ((), dict(pio=False, addr=A, length=0, datamatch=0), "EINVAL", "length 0"),
    ((), dict(pio=False, addr=(1 << 64) - 2, length=4), "EINVAL", "wraps"),
    ((dict(pio=True, addr=P, length=2),), dict(pio=True, addr=P, length=2), "EEXIST",
     "identical ioeventfd is already registered"),
    ((dict(pio=True, addr=P, length=2),), dict(pio=True, addr=P, length=2, datamatch=1),
     "EEXIST", "DATAMATCH ioeventfd on the address of a wildcard"),
    ((dict(pio=True, addr=P, length=2, datamatch=1),), dict(pio=True, addr=P, length=2),
     "EEXIST", "wildcard ioeventfd on the address of a DATAMATCH"),
    ((dict(pio=False, addr=A, length=0),), dict(pio=False, addr=A, length=4), "EEXIST",
     "length-0 ioeventfd collides"),
]


@pytest.mark.parametrize("before,refused,errno_name,words", RULE_CASES,
                         ids=[f"{c[2]}-{i}" for i, c in enumerate(RULE_CASES)])
def test_refusal_names_the_rule(vm, before, refused, errno_name, words):
    """kvm_assign_ioeventfd / ioeventfd_check_collision: the IoEventFdError says which rule."""
    for i, kw in enumerate(before):
        vm.add_ioeventfd(f"first{i}", **kw)
    with pytest.raises(IoEventFdError) as info:
        vm.add_ioeventfd("second", **refused)
    assert info.value.errno_name == errno_name
    assert words in info.value.rule
    assert "(kvm_" in info.value.rule or "(ioeventfd_" in info.value.rule


def test_unknown_flag_names_the_rule(vm):
    """kvm_assign_ioeventfd: flags outside KVM_IOEVENTFD_VALID_FLAG_MASK are EINVAL."""
    with O.IoEventFd("x", False, A, 4, extra_flags=1 << 5) as ev, pytest.raises(IoEventFdError) as info:
        vm.assign_ioeventfd(ev)
    assert info.value.errno_name == "EINVAL" and "unknown flag" in info.value.rule


def test_deassign_unknown_names_the_rule(vm):
    """kvm_deassign_ioeventfd_idx: nothing registered with that eventfd/bus/addr/len is ENOENT."""
    with O.IoEventFd("never", True, P, 2) as ev, pytest.raises(IoEventFdError) as info:
        vm.deassign_ioeventfd(ev)
    assert info.value.errno_name == "ENOENT"
    assert "no registered ioeventfd" in info.value.rule


def test_refused_registration_leaks_no_eventfd(kvm_device, open_fds):
    """Vm.add_ioeventfd closes the eventfd it made when KVM refuses the registration."""
    before = open_fds()
    with O.Kvm(kvm_device) as kvm, kvm.create_vm() as vm:
        for _ in range(3):
            with pytest.raises(IoEventFdError):
                vm.add_ioeventfd("bad", True, P, 3)
        assert vm.ioeventfds == []
    assert open_fds() == before


def _match_machine(case, cpl: int) -> Machine:
    kind = AccessKind.OUT if case.pio else AccessKind.WRITE
    image = build_image(Access(kind, case.width, case.addr, case.value), cpl=cpl)
    names = [r.fd for r in case.registrations]
    assert len(set(names)) == len(names), "match cases register one eventfd per registration"
    spec = MachineSpec(
        memslots=(MemSlot(0, 0, layout.RAM_SIZE),),
        ioeventfds=tuple(
            IoEventFdSpec(f"fd{r.fd}", r.pio, r.addr, r.len, r.datamatch) for r in case.registrations
        ),
    )
    return Machine(image, spec)



@pytest.mark.parametrize("case", MATCH_CASES, ids=[c.name for c in MATCH_CASES])
def test_match_case(kvm_device, guest_cpl, case):
    """One guest write: exactly the listed ioeventfds fire once; with none, the write exits to
    userspace as KVM_EXIT_IO / KVM_EXIT_MMIO (ioeventfd_in_range, kvm_io_bus_cmp)."""
    with RealBackend(kvm_device, watchdog_s=10).open(_match_machine(case, guest_cpl)) as session:
        res = session.run_batch(1)
    expected = {f"fd{r.fd}": (1 if r.fd in case.fires else 0) for r in case.registrations}
    assert res.eventfd_signals == expected
    if case.fires:
        assert res.user_exits == 0
    else:
        assert res.user_exits == 1
        (rec,) = res.exits
        assert (rec.kind, rec.addr, rec.size, rec.is_write, rec.data) == (
            "io" if case.pio else "mmio", case.addr, case.width, True, case.value,
        )
