"""The simulator's per-exit shortcuts change how fast an exit is simulated, never what it does:

* the CPU's exit register file (:class:`fastmmio.sim.cpu.ExitRegisters`) reads a register
  from unicorn when first used, behaves as the complete register file, and writes back only
  what the handler changed;
* KVM's model works on that file directly (:meth:`KvmVcpu._run_handler`): same registers and
  events as with a plain dict copied in and out;
* ``kvm_io_bus_get_first_dev`` (virt/kvm/kvm_main.c) keeps its answers until a device is
  registered or unregistered: the index and the ranges compared are those of a new search;
* the VM-exit information of an EPT violation or misconfiguration (SDM 27.2.1) is built once
  per distinct exit.
"""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmmio.routes import build_machine, get_route
from fastmmio.sim.backend import SimBackend, SimOptions
from fastmmio.sim.cpu import GPRS, ExitRegisters
from fastmmio.sim.kvm.eventfd import EventFd
from fastmmio.sim.kvm.iobus import KvmBus, KvmIoBus, KvmIoDevice
from fastmmio.sim.kvm.vm import KvmVm
from fastmmio.sim.vmx.exits import EXIT_EPT_MISCONFIG, EXIT_IO_INSTRUCTION, ExitInfo, io_qualification
from fastmmio.sim.vmx.memory import HostMemory
from fastmmio.sim.vmx.processor import Processor
from fastmmio.sim.vmx.walker import Fault

NAMES = GPRS + ("rip", "rflags")


def _file(values):
    """An ExitRegisters over ``values`` (name -> value), counting the reads it makes."""
    from unicorn import x86_const as X

    by_id = {getattr(X, f"UC_X86_REG_{n.upper()}"): n for n in NAMES}
    reads = []

    def read(uc_id):
        reads.append(by_id[uc_id])
        return values[by_id[uc_id]]

    return ExitRegisters(read), reads


def test_exit_registers_read_on_first_use_only():
    values = {n: i * 0x1111 for i, n in enumerate(NAMES)}
    regs, reads = _file(values)
    assert regs["rax"] == values["rax"] and regs["rax"] == values["rax"]
    assert reads == ["rax"]  # once
    assert regs.get("rbx") == values["rbx"] and "r15" in regs and "cr9" not in regs
    assert reads == ["rax", "rbx"]
    with pytest.raises(KeyError):
        regs["cr9"]


def test_exit_registers_behave_as_the_complete_file():
    values = {n: i for i, n in enumerate(NAMES)}
    regs, _ = _file(values)
    assert len(regs) == len(NAMES) and set(regs) == set(NAMES)
    assert dict(regs.items()) == values and regs == values and regs.copy() == values


def test_exit_registers_changes_are_what_the_handler_wrote():
    values = {n: 7 for n in NAMES}
    regs, _ = _file(values)
    regs["rip"] += 3  # read, then changed
    regs["rax"] = 7  # written, same value as at the exit: still written back
    regs["rbx"]  # read only
    regs.more = (frozenset({"cr0"}), lambda name: 0x80000011)
    assert regs["cr0"] == 0x80000011  # the model's own key: never a register change
    assert regs.changes() == {"rip": 10, "rax": 7}
    assert not regs.moved_only("rip", 10)  # RAX was written too


@pytest.mark.parametrize("writes, expect", [
    ({"rip": 10}, True), ({"rip": 7}, False), ({}, False), ({"rip": 10, "rbx": 7}, True),
    ({"rip": 10, "rbx": 8}, False), ({"rip": 10, "rcx": 7}, False), ({"rip": 11}, False)])
def test_moved_only_is_changes_equal_to_one_register(writes, expect):
    """moved_only(name, value) is changes() == {name: value}, without building it."""
    regs, _ = _file({n: 7 for n in NAMES})
    regs["rbx"]
    regs.more = (frozenset({"cr0"}), lambda name: 1)
    regs["cr0"]
    for k, v in writes.items():
        regs[k] = v
    assert regs.moved_only("rip", 10) is expect
    assert (regs.changes() == {"rip": 10}) is expect


def test_exit_registers_of_a_closed_cpu_raise_instead_of_reading():
    with SimBackend(SimOptions()).open(build_machine(get_route("pio-eventfd-len1"), 0)) as s:
        s.run_batch(2)
        regs = s.cpu._exit_regs()
    with pytest.raises(RuntimeError, match="closed"):
        regs["rax"]


def _vcpu():
    mem = HostMemory(46)
    vm = KvmVm(mem, events=Counter())
    vm.set_user_memory_region(0, 0, 0x200000)
    return vm, vm.create_vcpu(Processor(mem))


@pytest.mark.parametrize("port, hit", [(0xE000, True), (0xE004, False)])
def test_handler_on_the_cpu_file_matches_a_copied_dict(port, hit):
    """handle_io -> kvm_fast_pio on the CPU's register file (used in place) and on a plain
    dict (copied in and back): same registers afterwards, same events, same eventfd."""
    values = {n: 0x100 + i for i, n in enumerate(NAMES)}
    info = ExitInfo(EXIT_IO_INSTRUCTION, io_qualification(port, 1, False), instruction_length=1)
    outcomes = []
    for lazy in (True, False):
        vm, vcpu = _vcpu()
        fd = EventFd()
        vm.ioeventfds.assign(fd, 0xE000, 1, pio=True)
        if lazy:
            regs, _ = _file(dict(values))
        else:
            regs = dict(values)
        go_on = vcpu.io_exit(info, regs, port, 1, False, values["rax"] & 0xFF)
        after = regs.changes() if lazy else {k: v for k, v in regs.items() if values[k] != v}
        outcomes.append((go_on, after, +vm.events, fd.count))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][1] == ({"rip": values["rip"] + 1} if hit else {})


class _Dev(KvmIoDevice):
    def write(self, addr, length, value):
        return False


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["reg", "unreg", "look"]),
                          st.integers(0, 12), st.sampled_from([0, 1, 2, 4])), max_size=40))
def test_get_first_dev_kept_answers_equal_a_new_search(ops):
    """kvm_io_bus_get_first_dev: after any sequence of registrations, removals and look-ups,
    the kept answer (index, ranges compared) equals a fresh binary search's."""
    kept = KvmIoBus(KvmBus.KVM_MMIO_BUS, Counter())
    devs = []
    for op, addr, length in ops:
        if op == "reg":
            d = _Dev()
            devs.append(d)
            kept.register_dev(addr * 4, length, d)
        elif op == "unreg" and devs:
            kept.unregister_dev(devs.pop(addr % len(devs)))
        else:
            fresh = KvmIoBus(KvmBus.KVM_MMIO_BUS, Counter())
            fresh.range = list(kept.range)
            before = kept.events["kvm.bus.probe"]
            assert kept.get_first_dev(addr * 4, length) == fresh.get_first_dev(addr * 4, length)
            assert kept.events["kvm.bus.probe"] - before == fresh.events["kvm.bus.probe"]


def test_exit_information_is_built_once_per_exit():
    """SDM 27.2.1: the same misconfiguration gives the same exit information (one object);
    another GPA another."""
    p = Processor(HostMemory(46))
    f = Fault("ept_misconfig", linear=0x400000, gpa=0x400000, structure="ept", level=1)
    a, b = p.exit_info(f, 2), p.exit_info(Fault("ept_misconfig", linear=0x400000, gpa=0x400000), 2)
    assert a is b and a.reason == EXIT_EPT_MISCONFIG and a.guest_physical_address == 0x400000
    c = p.exit_info(Fault("ept_misconfig", linear=0x401000, gpa=0x401000), 2)
    assert c.guest_physical_address == 0x401000 and c is not a
    assert p.exit_info(f, None).instruction_length is None


@pytest.mark.parametrize("route", ["mmio-eventfd-len0", "mmio-eventfd-len4", "mmio-user",
                                   "pio-eventfd-len1"])
def test_native_sink_counts_what_the_python_sink_counts(route, monkeypatch):
    """The doorbell sink's callback in C (fastmmio.sim._hooks, when built) and in Python:
    the same events, batch after batch; without the C module the Python one serves."""
    from fastmmio.sim import cpu

    def run():
        with SimBackend(SimOptions()).open(build_machine(get_route(route), 0)) as s:
            return [dict(s.run_batch(n).events) for n in (1, 8, 8)], s.cpu.engine.native_sink

    native, used = run()
    assert used is (cpu._hooks is not None)
    monkeypatch.setattr(cpu, "_hooks", None)
    python, used = run()
    assert used is False and python == native
    with pytest.raises(RuntimeError, match="not built"):
        cpu.CpuEngine(native_sink=True)
