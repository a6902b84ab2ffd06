"""Exit handlers (arch/x86/kvm/vmx/vmx.c handle_io, handle_ept_misconfig,
handle_ept_violation / __vmx_handle_ept_violation, skip_emulated_instruction; x86.c
kvm_fast_pio, complete_fast_pio_out/in, kvm_emulate_cpuid, kvm_emulate_halt), unit-level and
end to end on unicorn + the processor model for every upstream route of the catalogue."""

from collections import Counter

import pytest

from fastmmio import layout
from fastmmio.routes import build_machine, load_catalogue
from fastmmio.sim.kvm.eventfd import EventFd
from fastmmio.sim.kvm.handlers import ept_violation_error_code
from fastmmio.sim.kvm.iobus import KvmBus, KvmIoDevice
from fastmmio.sim.kvm.vm import KvmVm
from fastmmio.sim.vmx.exits import (
    EXIT_CPUID,
    EXIT_EPT_MISCONFIG,
    EXIT_HLT,
    EXIT_IO_INSTRUCTION,
    ExitInfo,
    io_qualification,
)
from fastmmio.sim.vmx.memory import HostMemory
from fastmmio.sim.vmx.processor import Processor
from kvm_sim_harness import MachineRun

RIP = 0x10000


def vcpu_for(variant="upstream", **kw):
    mem = HostMemory(46)
    proc = Processor(mem)
    vm = KvmVm(mem, events=Counter(), variant=variant)
    vm.set_user_memory_region(0, 0, 0x200000)
    vcpu = vm.create_vcpu(proc, **kw)
    return vm, vcpu


def io_info(port, size, is_in, length=1):
    return ExitInfo(EXIT_IO_INSTRUCTION, io_qualification(port, size, is_in), instruction_length=length)


def test_out_to_ioeventfd_skips_by_vmcs_length():
    """kvm_fast_pio_out: KVM_PIO_BUS takes the OUT; kvm_skip_emulated_instruction uses the
    VM-exit instruction length (defined for I/O exits, SDM 27.2.4)."""
    vm, vcpu = vcpu_for()
    fd = EventFd()
    vm.ioeventfds.assign(fd, 0xE000, 2, pio=True, datamatch=1)
    regs = {"rip": RIP, "rax": 0xFFFF_0001}
    assert vcpu.handle_exit(io_info(0xE000, 2, False), regs)
    assert fd.count == 1 and regs["rip"] == RIP + 1
    assert vm.events["kvm.skip.vmcs_length"] == 1 and vm.events["kvm.handler.io"] == 1
    assert vm.events["kvm.bus.lookup.KVM_PIO_BUS"] == 1


def test_out_to_userspace_advances_rip_on_completion():
    """KVM_EXIT_IO for an OUT nobody in the kernel takes; complete_fast_pio_out skips the
    instruction on the next KVM_RUN."""
    vm, vcpu = vcpu_for()
    regs = {"rip": RIP, "rax": 0x1234}
    assert not vcpu.handle_exit(io_info(0xE000, 1, False, 2), regs)
    assert vcpu.last_exit.kind == "io" and vcpu.last_exit.is_write and vcpu.last_exit.data == 0x34
    assert regs["rip"] == RIP and vm.events["kvm.user_exit.io"] == 1
    assert vcpu.complete_userspace_io()
    assert vcpu.regs["rip"] == RIP + 2


@pytest.mark.parametrize("size, rax, data, after", [
    (1, 0x1111_2222_3333_4444, 0xAB, 0x1111_2222_3333_44AB),
    (2, 0x1111_2222_3333_4444, 0xABCD, 0x1111_2222_3333_ABCD),
    (4, 0x1111_2222_3333_4444, 0x89ABCDEF, 0x89ABCDEF),
])
def test_in_from_userspace_merges_or_zero_extends(size, rax, data, after):
    """kvm_fast_pio_in / complete_fast_pio_in: below 4 bytes the value merges into RAX, at 4
    it zero-extends."""
    vm, vcpu = vcpu_for()
    regs = {"rip": RIP, "rax": rax}
    assert not vcpu.handle_exit(io_info(0xE000, size, True), regs)
    assert vcpu.last_exit.kind == "io" and not vcpu.last_exit.is_write
    assert vcpu.complete_userspace_io(data | (0xFF << 32 if size == 4 else 0))
    assert vcpu.regs["rax"] == after and vcpu.regs["rip"] == RIP + 1


def test_in_from_kernel_device():
    """kernel_pio: a KVM_PIO_BUS device with a read op answers an IN without an exit."""
    class Elcr(KvmIoDevice):
        def read(self, addr, length):
            return 0x0C

    vm, vcpu = vcpu_for()
    vm.buses[KvmBus.KVM_PIO_BUS].register_dev(0x4D0, 2, Elcr())
    regs = {"rip": RIP, "rax": 0xFF00}
    assert vcpu.handle_exit(io_info(0x4D0, 1, True), regs)
    assert regs["rax"] == 0xFF0C and regs["rip"] == RIP + 1


def test_cpuid_from_table():
    """kvm_emulate_cpuid: the guest CPUID table (KVM_SET_CPUID2), then a skip."""
    vm, vcpu = vcpu_for(cpuid={(0, 0): (0xD, 0x756E6547, 0x6C65746E, 0x49656E69)})
    regs = {"rip": RIP, "rax": 0, "rcx": 0}
    assert vcpu.handle_exit(ExitInfo(EXIT_CPUID, instruction_length=2), regs)
    assert (regs["rax"], regs["rbx"], regs["rip"]) == (0xD, 0x756E6547, RIP + 2)


def test_hlt_exits_without_in_kernel_irqchip():
    """kvm_emulate_halt: KVM_EXIT_HLT without an in-kernel irqchip; blocks in the kernel with
    one."""
    vm, vcpu = vcpu_for()
    regs = {"rip": RIP}
    assert not vcpu.handle_exit(ExitInfo(EXIT_HLT, instruction_length=1), regs)
    assert vcpu.last_exit.kind == "hlt" and regs["rip"] == RIP + 1
    vm, vcpu = vcpu_for(irqchip_in_kernel=True)
    assert vcpu.handle_exit(ExitInfo(EXIT_HLT, instruction_length=1), {"rip": RIP})


def test_misconfig_fast_bus_skip_by_length_or_by_decode():
    """handle_ept_misconfig: KVM_FAST_MMIO_BUS first; skip by VMCS length on bare metal, by
    decoding (EMULTYPE_SKIP) when KVM runs nested (d391f1207067); with the length undefined
    and KVM not nested, the skip cannot be done (internal error)."""
    vm, vcpu = vcpu_for()
    fd = EventFd()
    vm.ioeventfds.assign(fd, layout.DOORBELL_GPA, 0)
    info = ExitInfo(EXIT_EPT_MISCONFIG, 0, layout.DOORBELL_GPA, None, 3)
    regs = {"rip": RIP}
    assert vcpu.handle_exit(info, regs)
    assert fd.count == 1 and regs["rip"] == RIP + 3
    assert vm.events["kvm.bus.lookup.KVM_FAST_MMIO_BUS"] == 1 and vm.events["kvm.emulate"] == 0
    undefined = ExitInfo(EXIT_EPT_MISCONFIG, 0, layout.DOORBELL_GPA, None, None)
    assert not vcpu.handle_exit(undefined, {"rip": RIP})
    assert vcpu.last_exit.kind == "internal-error"


def test_ept_violation_error_code():
    """__vmx_handle_ept_violation: read -> PFERR_USER, write -> PFERR_WRITE, fetch ->
    PFERR_FETCH, bits 5:3 -> PFERR_PRESENT, GLA valid -> GUEST_FINAL (bit 8) or GUEST_PAGE."""
    assert ept_violation_error_code(0x1) == 1 << 2
    assert ept_violation_error_code(0x2 | 0x8) == (1 << 1) | 1
    assert ept_violation_error_code(0x4 | 0x80 | 0x100) == (1 << 4) | (1 << 32)
    assert ept_violation_error_code(0x2 | 0x80) == (1 << 1) | (1 << 33)


UPSTREAM_ROUTES = [r for r in load_catalogue() if r.upstream]


@pytest.mark.parametrize("route", UPSTREAM_ROUTES, ids=lambda r: r.name)
def test_route_end_to_end(route):
    """Every upstream route of the catalogue, run on unicorn + the processor + this model:
    the eventfd signals and user exits per access that routes.toml expects."""
    n = 4
    run = MachineRun(build_machine(route, 0), n=n)
    assert run.stop.kind == "handler", run.stop
    assert run.mailbox(layout.MAILBOX_BATCHES) == 1
    exp = route.expect
    if route.ioeventfd is not None:
        assert run.vm.eventfd_counts()["doorbell"] == exp.eventfd * n
    if exp.coalesced:
        assert len(run.user_exits) + run.ev["kvm.coalesced.append"] == n
    else:
        assert len(run.user_exits) == exp.user_exits * n
    if exp.exit is not None:
        for rec in run.user_exits:
            assert (rec.kind, rec.addr, rec.size, rec.is_write) == (
                exp.exit.kind, exp.exit.addr, exp.exit.size, exp.exit.is_write)
    if exp.read_value is not None:
        assert run.mailbox(layout.MAILBOX_LAST_READ) == exp.read_value
    if exp.ro_unchanged:
        assert run.vm.guest_memory.read_guest(layout.RO_BASE, 8) == bytes([layout.RO_PATTERN]) * 8


def test_mmio_len0_takes_fast_path_after_first_fault():
    """Upstream: the first MMIO write installs the MMIO SPTE (EPT violation, emulated); every
    later one is an EPT misconfiguration answered by KVM_FAST_MMIO_BUS without decoding."""
    route = next(r for r in UPSTREAM_ROUTES if r.name == "mmio-eventfd-len0")
    run = MachineRun(build_machine(route, 0), n=5)
    assert run.exits_by_reason()["EPT_MISCONFIG"] == 4
    assert run.ev["kvm.emulate"] == 1 and run.ev["kvm.skip.vmcs_length"] >= 4
    nested = MachineRun(build_machine(route, 0), n=5, nested=True)
    assert nested.ev["kvm.skip.decode"] == 4 and nested.ev["kvm.emulate.decode"] == 5


def test_kvm_stats_names():
    """kvm_vcpu_stats_desc names: pf_taken counts faults that reach kvm_mmu_do_page_fault
    (not misconfigurations answered by handle_mmio_page_fault, which jump to emulate without
    pf_emulate); pf_mmio_spte_created once; mmio_exits per userspace MMIO exit."""
    route = next(r for r in UPSTREAM_ROUTES if r.name == "mmio-user")
    run = MachineRun(build_machine(route, 0), n=4)
    st = run.vcpu.kvm_stats()
    assert st["mmio_exits"] == 4 and st["pf_mmio_spte_created"] == 1
    assert st["insn_emulation"] == 4 and st["pf_emulate"] == 1
    assert st["pf_taken"] == run.exits_by_reason()["EPT_VIOLATION"]
    assert st["exits"] == sum(run.exits_by_reason().values())
