"""Host detection rules (fastmmio.real.host) on synthetic sysfs and cpuinfo."""

from __future__ import annotations

import pytest

from fastmmio.errors import UsageError
from fastmmio.real import host


def _modules(tmp_path, *names):
    for n in names:
        (tmp_path / n).mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "modules,kind",
    [
        ((), "none"),
        (("kvm", "kvm_intel"), "vmx"),
        (("kvm", "kvm_amd"), "svm"),
        (("kvm", "kvm_pvm"), "pvm"),
        (("kvm", "kvm_intel", "kvm_pvm"), "pvm"),  # PVM serves /dev/kvm where both are loaded
    ],
)
def test_kvm_kind_from_loaded_vendor_module(tmp_path, modules, kind):
    assert host.kvm_kind(_modules(tmp_path, *modules)) == kind


def test_cpl3_on_pvm_with_reason():
    """Measured on PVM hosts: PVM runs only 64-bit CPL3 guest code natively; CPL0 is emulated."""
    cpl, why = host.choose_cpl("pvm")
    assert cpl == 3 and "CPL3" in why and "emulator" in why


@pytest.mark.parametrize("kind", ["vmx", "svm", "none"])
def test_cpl0_elsewhere(kind):
    assert host.choose_cpl(kind)[0] == 0


def test_cpl_override_and_bad_value():
    assert host.choose_cpl("pvm", 0) == (0, "chosen by the caller")
    assert host.choose_cpl("vmx", 3)[0] == 3
    with pytest.raises(UsageError):
        host.choose_cpl("vmx", 1)


def test_cpuinfo_first_processor_only():
    text = "processor\t: 0\nmodel name\t: CPU A\nflags\t\t: fpu vmx hypervisor\n\nprocessor\t: 1\nmodel name\t: CPU B\n"
    f = host.cpuinfo_fields(text)
    assert f["model name"] == "CPU A" and "hypervisor" in f["flags"].split()


def test_detect_host_without_device(tmp_path):
    """A missing device is not an error for detection (only for running): no TSC from KVM."""
    info = host.detect_host(str(tmp_path / "nokvm"))
    assert info.kernel and info.guest_cpl in (0, 3)
    assert info.to_json()["kvm_kind"] == info.kvm_kind


class _FakeKvm:
    """A Kvm whose KVM_CHECK_EXTENSION answers from a set of capabilities."""

    def __init__(self, caps):
        self.caps = set(caps)

    def check_extension(self, cap):
        return cap in self.caps


def test_unsupported_reason_names_the_missing_capability():
    """A length-0 ioeventfd needs KVM_CAP_IOEVENTFD and ANY_LENGTH or NO_LENGTH (f848a5a8); a
    read-only slot needs KVM_CAP_READONLY_MEM; coalesced PIO needs KVM_CAP_COALESCED_PIO."""
    from dataclasses import replace

    from fastmmio.real import binding as B
    from fastmmio.routes import get_route

    every = {B.KVM_CAP_IOEVENTFD, B.KVM_CAP_IOEVENTFD_NO_LENGTH, B.KVM_CAP_READONLY_MEM,
             B.KVM_CAP_COALESCED_MMIO, B.KVM_CAP_COALESCED_PIO}
    len0 = get_route("mmio-eventfd-len0")
    assert host.unsupported_reason(_FakeKvm(every), len0) is None
    assert host.unsupported_reason(_FakeKvm(every - {B.KVM_CAP_IOEVENTFD_NO_LENGTH}), len0) == (
        "this host's KVM lacks KVM_CAP_IOEVENTFD_ANY_LENGTH or KVM_CAP_IOEVENTFD_NO_LENGTH")
    assert host.unsupported_reason(_FakeKvm({B.KVM_CAP_IOEVENTFD, B.KVM_CAP_IOEVENTFD_ANY_LENGTH}), len0) is None
    assert "KVM_CAP_READONLY_MEM" in host.unsupported_reason(_FakeKvm(every - {B.KVM_CAP_READONLY_MEM}),
                                                             get_route("ro-write"))
    assert "KVM_CAP_COALESCED_PIO" in host.unsupported_reason(_FakeKvm(every - {B.KVM_CAP_COALESCED_PIO}),
                                                              get_route("coalesced-pio"))
    assert "only the simulator" in host.unsupported_reason(
        _FakeKvm(every), replace(get_route("pio-user"), variant="some-variant"))


def test_unsupported_reason_for_the_kvm_unit_tests_routes():
    """The in-kernel PIC needs KVM_CAP_IRQCHIP (KVM_CREATE_IRQCHIP); MOV CR8 is #GP above CPL0
    (SDM Vol. 2B, MOV CR); under PVM a VMCALL does not reach kvm_emulate_hypercall (measured:
    tests/kvm/test_kut_routes_kvm.py), on VMX it does."""
    from fastmmio.real import binding as B
    from fastmmio.routes import get_route

    caps = {B.KVM_CAP_IRQCHIP}
    pic = get_route("pio-in-kernel")
    assert host.unsupported_reason(_FakeKvm(caps), pic, 3, "pvm") is None
    assert host.unsupported_reason(_FakeKvm(set()), pic, 0, "vmx") == "this host's KVM lacks KVM_CAP_IRQCHIP"
    cr8 = get_route("mov-from-cr8")
    assert "CPL0-only" in host.unsupported_reason(_FakeKvm(caps), cr8, 3, "vmx")
    assert host.unsupported_reason(_FakeKvm(caps), cr8, 0, "vmx") is None
    vmcall = get_route("vmcall")
    assert "PVM" in host.unsupported_reason(_FakeKvm(caps), vmcall, 3, "pvm")
    assert host.unsupported_reason(_FakeKvm(caps), vmcall, 0, "vmx") is None
