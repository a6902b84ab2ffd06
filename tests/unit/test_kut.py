"""kvm-unit-tests figures as data: the name-to-route table (data/kut.toml), the anchor sets
(data/anchors), x86/vmexit output parsing, and the routes added for x86/vmexit's tests
(vmcall, inl_from_kernel / outl_to_kernel, mov_from_cr8 / mov_to_cr8) on the simulator."""

from __future__ import annotations

import pytest

from fastmmio import layout
from fastmmio.bench import BenchOptions, measure_route
from fastmmio.errors import UsageError
from fastmmio.guest.build import build_image
from fastmmio.guest.program import Access, AccessKind
from fastmmio.kut import (
    CURRENT_ERA,
    anchor_names,
    load_anchor,
    load_kut_table,
    parse_kut_log,
    parse_kut_table,
)
from fastmmio.routes import build_machine, get_route, load_catalogue, route_names
from fastmmio.sim.backend import SimBackend
from fastmmio.sim.kvm.iobus import KvmBus, KvmIoBuses
from fastmmio.sim.kvm.irqchip import ELCR_PORT, KvmPic


# -- the table ---------------------------------------------------------------------------


def test_every_mapped_route_is_in_the_catalogue():
    names = set(route_names())
    for e in load_kut_table().entries:
        assert e.route is None or e.route in names, e


def test_mmio_wildcard_eventfd_meant_length_1_in_2013_and_length_0_today():
    """QEMU 22773d60 (2013) registered every pci-testdev ioeventfd with length 1; QEMU's
    hw/misc/pci-testdev.c registers the wildcard MMIO one with length 0 since KVM accepts any
    length (KVM_CAP_IOEVENTFD_ANY_LENGTH)."""
    t = load_kut_table()
    then = get_route(t.lookup("mmio-wildcard-eventfd:pci-mem", "pci-testdev-2013").route)
    now = get_route(t.lookup("mmio-wildcard-eventfd:pci-mem", CURRENT_ERA).route)
    assert then.ioeventfd.length == 1 and now.ioeventfd.length == 0
    # a name an era does not list means what it means today
    assert t.lookup("cpuid", "pci-testdev-2013").route == "cpuid"


def test_vmx_in_emulated_era_has_no_route_for_in_tests():
    """In Linux 4.x VMX's handle_io sent every IN to the emulator ('if (string || in) return
    emulate_instruction(...)'); only OUT took kvm_fast_pio_out: no route makes that path."""
    t = load_kut_table()
    for name in ("inl_from_qemu", "inl_from_kernel"):
        e = t.lookup(name, "vmx-in-emulated")
        assert e.route is None and "emulator" in e.why
    assert t.lookup("outl_to_kernel", "vmx-in-emulated").route == "pio-out-kernel"


def test_routes_make_the_access_of_their_test():
    """kvm-unit-tests x86/vmexit.c: inl_nop_kernel is inb(0x4d0), outl_elcr_kernel is
    outb(0, 0x4d0), vmcall calls hypercall 0, mov_to_cr8 writes 0 (kvm-unit-tests master)."""
    t = load_kut_table()
    r = get_route(t.lookup("inl_from_kernel").route)
    assert (r.access.kind, r.access.width, r.access.target, r.irqchip) == (AccessKind.IN, 1, 0x4D0, True)
    r = get_route(t.lookup("outl_to_kernel").route)
    assert (r.access.kind, r.access.width, r.access.target, r.access.value) == (AccessKind.OUT, 1, 0x4D0, 0)
    assert get_route(t.lookup("vmcall").route).access.kind is AccessKind.VMCALL
    for n in ("mov_from_cr8", "mov_to_cr8"):
        assert get_route(t.lookup(n).route).cpl0_only


def test_pmtimer_is_left_out_with_the_reason():
    e = load_kut_table().lookup("inl_from_pmtimer")
    assert e.route is None and "no in-kernel ACPI PM timer" in e.why


def test_bad_tables_are_usage_errors():
    base = '[era.current]\ndescription = "d"\nkernel = "k"\nqemu = "q"\n'
    with pytest.raises(UsageError, match="either a route or why"):
        parse_kut_table(base + '[[test]]\nname = "x"\nera = "current"\n')
    with pytest.raises(UsageError, match="unknown era"):
        parse_kut_table(base + '[[test]]\nname = "x"\nera = "1999"\nroute = "cpuid"\n')
    with pytest.raises(UsageError, match="no \\[era.current\\]"):
        parse_kut_table('[[test]]\nname = "x"\nera = "current"\nroute = "cpuid"\n')
    with pytest.raises(UsageError, match="twice"):
        parse_kut_table(base + 2 * '[[test]]\nname = "x"\nera = "current"\nroute = "cpuid"\n')


# -- anchors -----------------------------------------------------------------------------


def test_anchor_sets_are_the_published_figures_with_their_sources():
    assert set(anchor_names()) >= {"pci-testdev-2013", "tr-reload-2017", "tr-reload-2017-before",
                                   "pmu-elide-2025"}
    a = load_anchor("tr-reload-2017")
    # Linux b7ffc44d5b2e, commit message, "After:"
    assert a.figures == {"cpuid": 1291, "vmcall": 1181, "mov_from_cr8": 11, "mov_to_cr8": 16,
                         "inl_from_pmtimer": 6457, "inl_from_qemu": 6209,
                         "inl_from_kernel": 2339, "outl_to_kernel": 1391}
    assert a.source.id == "b7ffc44d5b2e" and "Defer TR reload" in a.source.subject
    b = load_anchor("tr-reload-2017-before")
    assert b.figures["inl_from_qemu"] == 6856 and b.figures["outl_to_kernel"] == 1402
    p = load_anchor("pci-testdev-2013")
    assert p.source.id == "22773d60" and p.era == "pci-testdev-2013"
    assert p.figures["mmio-wildcard-eventfd:pci-mem"] == 3609
    for name in anchor_names():
        a = load_anchor(name)
        assert a.cpu and a.kernel and a.date and a.source.subject and a.figures
        assert "FACTS" not in a.cite()


def test_unknown_anchor_set_names_the_known_ones():
    with pytest.raises(UsageError, match="tr-reload-2017"):
        load_anchor("no-such-set")


# -- kvm-unit-tests output ---------------------------------------------------------------


def test_log_keeps_name_cycles_lines_and_ignores_the_rest():
    log = parse_kut_log("enabling apic\nPM timer port is 608\ncpuid 1291\r\n\nvmcall 1181\n"
                        "paging enabled\ncr0 = 80010011\nSUMMARY: 8 tests\ncpuid 1300\n")
    assert log.figures == {"cpuid": 1300, "vmcall": 1181}
    assert log.repeated == ["cpuid"]
    assert log.ignored == 6


# -- the new routes on the simulator -------------------------------------------------------


@pytest.mark.parametrize("name,cpl", [("vmcall", 0), ("vmcall", 3), ("pio-in-kernel", 0),
                                      ("pio-out-kernel", 3), ("mov-from-cr8", 0),
                                      ("mov-to-cr8", 0)])
def test_new_routes_run_correctly_on_the_simulator(name, cpl):
    route = get_route(name)
    seen = {}

    def price(batch):
        seen.update(batch.events)
        return 0.0

    res = measure_route(SimBackend(), route, cpl, BenchOptions(iterations=8, runs=1), price=price)
    assert res.correct, res.checks
    n = res.iterations
    exits = {k: v / n for k, v in seen.items() if k.startswith("exit.")}
    if name == "vmcall":
        # SDM 25.1.2: VMCALL exits unconditionally (at any CPL); kvm_emulate_hypercall
        assert exits == {"exit.VMCALL": 1.0}
        assert seen["kvm.handler.vmcall"] == n and seen["kvm.skip.vmcs_length"] == n
    elif name.startswith("pio-"):
        # the PIC's ELCR answers on KVM_PIO_BUS: an I/O exit, no exit to userspace
        assert exits == {"exit.IO_INSTRUCTION": 1.0}
        assert res.user_exits == 0 and seen["kvm.bus.lookup.KVM_PIO_BUS"] == n
    else:
        # the TPR shadow: no exit (SDM 29.3), the loop's own instructions only
        assert exits == {}


def test_vmcall_answers_enosys_at_cpl0_and_eperm_at_cpl3():
    """kvm_emulate_hypercall: -KVM_EPERM when the guest is not at CPL0, -KVM_ENOSYS for an
    unknown number (include/uapi/linux/kvm_para.h: KVM_ENOSYS 1000, KVM_EPERM = EPERM 1)."""
    from fastmmio.sim.kvm.handlers import KVM_ENOSYS, KVM_EPERM
    from fastmmio.sim.vmx.exits import EXIT_VMCALL, ExitInfo

    assert (KVM_ENOSYS, KVM_EPERM) == (1000, 1)
    for cpl, want in ((0, -KVM_ENOSYS), (3, -KVM_EPERM)):
        s = SimBackend().open(build_machine(get_route("vmcall"), cpl))
        try:
            regs = dict(s.cpu.regs())
            regs["rax"] = 0
            rip = regs["rip"]
            assert s.vcpu.vmcall_exit(ExitInfo(EXIT_VMCALL, instruction_length=3), regs)
            assert regs["rax"] == want & (2**64 - 1) and regs["rip"] == rip + 3
        finally:
            s.close()


def test_elcr_keeps_only_the_bits_of_its_mask():
    """arch/x86/kvm/i8259.c: elcr_mask 0xf8 (master) and 0xde (slave); byte accesses only."""
    buses = KvmIoBuses()
    pic = KvmPic(buses)
    assert buses[KvmBus.KVM_PIO_BUS].dev_count == 3  # 0x20, 0xa0, 0x4d0
    assert buses.write(KvmBus.KVM_PIO_BUS, ELCR_PORT, 1, 0xFF)
    assert buses.write(KvmBus.KVM_PIO_BUS, ELCR_PORT + 1, 1, 0xFF)
    assert buses.read(KvmBus.KVM_PIO_BUS, ELCR_PORT, 1) == 0xF8
    assert buses.read(KvmBus.KVM_PIO_BUS, ELCR_PORT + 1, 1) == 0xDE
    assert buses.write(KvmBus.KVM_PIO_BUS, ELCR_PORT, 2, 0)  # taken, ignored
    assert pic.elcr == [0xF8, 0xDE]
    assert buses.read(KvmBus.KVM_PIO_BUS, ELCR_PORT, 2) == 0


def test_irqchip_routes_need_it_and_others_do_not():
    assert build_machine(get_route("pio-in-kernel"), 3).spec.irqchip
    assert not build_machine(get_route("pio-in-user"), 3).spec.irqchip
    s = SimBackend().open(build_machine(get_route("pio-in-user"), 3))
    try:
        assert s.vm.pic is None
        assert s.vm.buses.read(KvmBus.KVM_PIO_BUS, layout.ELCR_PORT, 1) is None
    finally:
        s.close()


def test_cpl0_only_access_builds_no_cpl3_image():
    with pytest.raises(UsageError, match="CPL0-only"):
        build_image(Access(AccessKind.MOV_TO_CR8), 3)
    build_image(Access(AccessKind.MOV_TO_CR8), 0)


def test_every_catalogue_route_has_one_kut_name_at_most():
    t = load_kut_table()
    for r in load_catalogue():
        assert r.kut == t.name_for_route(r.name)
