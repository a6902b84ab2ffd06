"""The routes added for kvm-unit-tests x86/vmexit tests, on this host's KVM: the in-kernel
PIC's ELCR (KVM_CREATE_IRQCHIP, then an IN/OUT at 0x4d0 answered on KVM_PIO_BUS), and the
routes a host cannot run skipped with their reason (VMCALL under PVM, MOV CR8 at CPL3)."""

from __future__ import annotations


import pytest

from fastmmio.bench import BenchOptions, measure_route
from fastmmio.cli import main
from fastmmio.real.host import unsupported_reason
from fastmmio.real.backend import RealBackend
from fastmmio.real.host import detect_host
from fastmmio.real.objects import Kvm
from fastmmio.routes import get_route


@pytest.mark.parametrize("name", ["pio-in-kernel", "pio-out-kernel"])
def test_in_kernel_pic_elcr_routes_pass_their_checks(kvm_device, name):
    """The in-kernel irqchip is created and its ELCR answers: no exit to userspace, and the
    IN reads the ELCR's reset value 0 (kvm_pic_init zero-allocates the PIC state)."""
    host = detect_host(kvm_device)
    with Kvm(kvm_device) as kvm:
        why = unsupported_reason(kvm, get_route(name), host.guest_cpl, host.kvm_kind)
    if why:
        pytest.skip(why)
    res = measure_route(RealBackend(device=kvm_device), get_route(name), host.guest_cpl,
                        BenchOptions(iterations=200, runs=1))
    assert res.correct, res.checks
    assert res.user_exits == 0 and res.cycles > 0


def test_kut_lines_name_the_kernel_device_tests(kvm_device, capsys):
    status = main(["bench", "--device", kvm_device, "-n", "100", "-r", "1", "--format", "kut",
                   "pio-in-kernel", "pio-out-kernel"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert [line.split()[0] for line in out.strip().splitlines()] == [
        "inl_from_kernel", "outl_to_kernel"]


def test_unrunnable_routes_are_skipped_with_the_reason(kvm_device, tmp_path, capsys):
    host = detect_host(kvm_device)
    with Kvm(kvm_device) as kvm:
        vmcall = unsupported_reason(kvm, get_route("vmcall"), host.guest_cpl, host.kvm_kind)
        cr8 = unsupported_reason(kvm, get_route("mov-to-cr8"), host.guest_cpl, host.kvm_kind)
    if host.kvm_kind == "pvm":
        assert vmcall and "PVM" in vmcall
    else:
        assert vmcall is None
    if host.guest_cpl == 3:
        assert cr8 and "CPL0-only" in cr8
        status = main(["bench", "--device", kvm_device, "mov-to-cr8"])
        err = capsys.readouterr().err
        assert status == 2 and "CPL0-only" in err


def test_vmcall_at_cpl3_under_pvm_is_no_hypercall(kvm_device):
    """What the skip reason says, observed: under PVM a CPL3 VMCALL shuts the guest down
    (the #UD it raises has no handler) instead of returning from KVM's hypercall handler."""
    from fastmmio.errors import GuestError
    from fastmmio.routes import build_machine

    host = detect_host(kvm_device)
    if host.kvm_kind != "pvm":
        pytest.skip("PVM-specific: on VMX/SVM VMCALL/VMMCALL exits to kvm_emulate_hypercall")
    with pytest.raises(GuestError, match="SHUTDOWN"):
        with RealBackend(device=kvm_device, watchdog_s=5).open(build_machine(get_route("vmcall"), 3)) as s:
            s.run_batch(16)
