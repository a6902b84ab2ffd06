"""Host detection on a real KVM host."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastmmio.real.host import cpuinfo_fields, detect_host


def test_tsc_from_kvm(kvm_device):
    """KVM_GET_TSC_KHZ on a scratch vCPU gives a plausible TSC frequency (100 MHz - 10 GHz)."""
    info = detect_host(kvm_device)
    assert info.tsc_khz is not None and 100_000 < info.tsc_khz < 10_000_000


def test_nested_follows_the_hypervisor_flag(kvm_device):
    """CPUID.1:ECX[31] (the 'hypervisor' flag in /proc/cpuinfo) means this kernel runs in a VM."""
    flags = cpuinfo_fields().get("flags", "").split()
    assert detect_host(kvm_device).nested == ("hypervisor" in flags)


def test_pvm_host_is_detected_as_nested_pvm_at_cpl3(kvm_device):
    """On this project's machines (measured): /dev/kvm is kvm_pvm, nested, guests at CPL3."""
    if not Path("/sys/module/kvm_pvm").exists():
        pytest.skip("not a PVM host")
    info = detect_host(kvm_device)
    assert (info.kvm_kind, info.nested, info.guest_cpl) == ("pvm", True, 3)
    assert "PVM" in info.cpl_reason
