"""What this host is: which KVM serves /dev/kvm (VMX, SVM, PVM or none), whether it runs nested,
the CPU, the TSC frequency, the kernel, and at which CPL guests should run here.

* KVM kind: the vendor module that is loaded (``/sys/module/kvm_pvm``, ``kvm_intel``,
  ``kvm_amd``). PVM (the page-table-based KVM backend, no VMX/SVM needed) is checked first: it
  is what serves /dev/kvm where both appear.
* Nested: the ``hypervisor`` CPUID flag (CPUID.1:ECX[31]) in /proc/cpuinfo: this kernel itself
  runs in a VM, so every exit of our guest is also handled by the outer hypervisor.
* TSC: KVM_GET_TSC_KHZ on a scratch vCPU (KVM_CAP_GET_TSC_KHZ), else
  ``/sys/devices/system/cpu/cpu0/tsc_freq_khz`` where a kernel exposes it, else unknown.
* CPL: PVM runs only 64-bit CPL3 guest code natively; CPL0 code goes through KVM's instruction
  emulator instruction by instruction (about 450-630 cycles an instruction, measured), so a doorbell loop at CPL0 would measure
  the emulator. VMX and SVM run CPL0 code natively, as kvm-unit-tests does. A caller's choice
  overrides either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from fastmmio.errors import FastmmioError, UsageError
from fastmmio.result import HostInfo

if TYPE_CHECKING:
    from fastmmio.real.objects import Kvm
    from fastmmio.routes import Route

SYS_MODULE = Path("/sys/module")
PROC_CPUINFO = Path("/proc/cpuinfo")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cpuinfo_fields(text: str | None = None) -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo."""
    text = _read(PROC_CPUINFO) if text is None else text
    fields: dict[str, str] = {}
    for line in (text or "").splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def kvm_kind(sys_module: Path = SYS_MODULE, device: str = "/dev/kvm") -> str:
    """``pvm``, ``vmx``, ``svm`` by the loaded vendor module, or ``none``."""
    if (sys_module / "kvm_pvm").exists():
        return "pvm"
    if (sys_module / "kvm_intel").exists():
        return "vmx"
    if (sys_module / "kvm_amd").exists():
        return "svm"
    return "none"


def choose_cpl(kind: str, requested: int | None = None) -> tuple[int, str]:
    """The guest CPL for this KVM kind, and why."""
    if requested is not None:
        if requested not in (0, 3):
            raise UsageError(f"guest CPL must be 0 or 3, not {requested}")
        return requested, "chosen by the caller"
    if kind == "pvm":
        return 3, (
            "PVM runs only 64-bit CPL3 guest code natively; CPL0 code would be executed by "
            "KVM's instruction emulator, so the loop would time the emulator"
        )
    if kind in ("vmx", "svm"):
        return 0, f"{kind.upper()} runs CPL0 guest code natively (as kvm-unit-tests' vmexit does)"
    return 0, "no KVM here: CPL0, as on bare metal and in the simulator"


def tsc_khz(device: str = "/dev/kvm") -> int | None:
    """The TSC frequency: KVM_GET_TSC_KHZ on a scratch vCPU, else sysfs, else None."""
    try:
        from fastmmio.real.objects import Kvm

        with Kvm(device) as kvm:
            with kvm.create_vm() as vm:
                khz = vm.create_vcpu(0).tsc_khz()
                if khz:
                    return khz
    except (FastmmioError, OSError):
        pass
    text = _read(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz"))
    if text and text.strip().isdigit():
        return int(text.strip())
    return None


def detect_host(device: str = "/dev/kvm", cpl: int | None = None) -> HostInfo:
    """Describe this host (never raises for a missing device: kvm_kind is then from sysfs and
    the TSC may be unknown; opening the device is the backend's job)."""
    info = cpuinfo_fields()
    flags = set(info.get("flags", "").split())
    kind = kvm_kind(device=device)
    if kind == "none" and ({"vmx", "svm"} & flags) and os.path.exists(device):
        kind = "vmx" if "vmx" in flags else "svm"
    guest_cpl, reason = choose_cpl(kind, cpl)
    return HostInfo(
        cpu_model=info.get("model name", "unknown"),
        tsc_khz=tsc_khz(device) if os.path.exists(device) else None,
        kernel=os.uname().release,
        kvm_kind=kind,
        nested="hypervisor" in flags,
        guest_cpl=guest_cpl,
        cpl_reason=reason,
    )


def unsupported_reason(kvm: "Kvm", route: "Route", cpl: int | None = None,
                       kind: str | None = None) -> str | None:
    """Why this host's KVM cannot run ``route`` (a missing capability, a KVM variant only the
    simulator has, or an access the guest's CPL or the KVM kind cannot make), or None.
    ``kvm``: an open :class:`fastmmio.real.objects.Kvm`; ``cpl`` and ``kind`` (``pvm``,
    ``vmx``, ``svm``) default to this host's (:func:`kvm_kind`, :func:`choose_cpl`)."""
    from fastmmio.real import binding as B

    if route.variant is not None:
        return f"needs the KVM variant {route.variant!r}: only the simulator runs it"
    kind = kind if kind is not None else kvm_kind()
    cpl = cpl if cpl is not None else choose_cpl(kind)[0]
    if route.cpl0_only and cpl != 0:
        return (f"{route.access.kind.value} raises #GP above CPL0 (SDM Vol. 2B, MOV CR) and "
                f"the guest runs at CPL{cpl} here: a CPL0-only test")
    if route.hypercall and kind == "pvm":
        # measured on this project's PVM hosts: a CPL3 VMCALL ends in KVM_EXIT_SHUTDOWN
        # (tests/kvm/test_kut_routes_kvm.py), one in emulated CPL0 code never returns
        return ("under PVM a VMCALL is no VM exit to KVM's hypercall handler: at CPL3 it "
                "raises #UD in the guest (KVM_EXIT_SHUTDOWN without a handler), and in "
                "emulated CPL0 code it never returns from KVM_RUN")
    needs: list[tuple[int, ...]] = []
    if route.irqchip:
        needs.append((B.KVM_CAP_IRQCHIP,))
    if route.target_region == "ro-slot":
        needs.append((B.KVM_CAP_READONLY_MEM,))
    if route.ioeventfd is not None:
        needs.append((B.KVM_CAP_IOEVENTFD,))
        if route.ioeventfd.length == 0:
            needs.append((B.KVM_CAP_IOEVENTFD_ANY_LENGTH, B.KVM_CAP_IOEVENTFD_NO_LENGTH))
    if route.coalesced == "mmio":
        needs.append((B.KVM_CAP_COALESCED_MMIO,))
    if route.coalesced == "pio":
        needs.append((B.KVM_CAP_COALESCED_PIO,))
    for alternatives in needs:
        if not any(kvm.check_extension(cap) for cap in alternatives):
            names = " or ".join(B.CAP_NAMES.get(c, str(c)) for c in alternatives)
            return f"this host's KVM lacks {names}"
    return None
