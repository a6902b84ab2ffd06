"""The real-KVM backend: a :class:`~fastmmio.machine.Machine` turned into a KVM VM.

``RealBackend(device, watchdog_s).open(machine)`` creates the VM and returns a
:class:`RealSession`:

1. memslots from ``machine.spec.memslots`` (anonymous memory filled with the slot's fill byte;
   ``KVM_MEM_READONLY`` where asked), then every image region copied into the slot holding it;
2. the ioeventfds of the spec (KVM_IOEVENTFD; a refusal is an IoEventFdError naming the
   rule) and its coalesced MMIO/PIO zones;
3. one vCPU: KVM_SET_CPUID2 with KVM_GET_SUPPORTED_CPUID (without it EFER.LME is refused,
   as measured here), KVM_SET_SREGS and KVM_SET_REGS from ``machine.image.boot``.

``run_batch(n)`` is :meth:`fastmmio.real.runloop.RunLoop.run_batch` (its per-exit path compiled
when the extension is built, else the pure-Python reference: ``engine``, see
:mod:`fastmmio.real.exitpath`). ``close()`` releases
every fd and mapping, also after a watchdog stop or an error, and may be called twice.
"""

from __future__ import annotations

import gc

from fastmmio.errors import FastmmioError, HostError, UsageError
from fastmmio.image import BootState
from fastmmio.x86.segments import Segment
from fastmmio.machine import Machine
from fastmmio.real import binding as B
from fastmmio.real import exitpath
from fastmmio.real.host import detect_host
from fastmmio.real.objects import IoEventFd, Kvm, Vcpu, Vm
from fastmmio.real.runloop import DEFAULT_EXIT_SAMPLE, WATCHDOG_SIGNAL, RunLoop
from fastmmio.result import BatchResult, HostInfo

DEFAULT_WATCHDOG_S = 10.0


def segment_to_kvm(seg: Segment, out: B.kvm_segment) -> None:
    """Fill a ``struct kvm_segment`` (the hidden part of a segment register, SDM Vol. 3A 3.4.3)."""
    out.base = seg.base
    out.limit = seg.limit
    out.selector = seg.selector
    out.type = seg.type
    out.present = seg.present
    out.dpl = seg.dpl
    out.db = seg.db
    out.s = seg.s
    out.l = seg.l
    out.g = seg.g
    out.avl = seg.avl
    out.unusable = seg.unusable


def load_boot_state(vcpu: Vcpu, boot: BootState) -> None:
    """KVM_SET_SREGS then KVM_SET_REGS from a BootState (APIC base and the rest of sregs are
    kept as KVM_GET_SREGS returned them)."""
    sregs = vcpu.get_sregs()
    for name in ("cs", "ss", "ds", "es", "fs", "gs", "tr", "ldt"):
        segment_to_kvm(getattr(boot, name), getattr(sregs, name))
    sregs.gdt.base, sregs.gdt.limit = boot.gdt_base, boot.gdt_limit
    sregs.idt.base, sregs.idt.limit = boot.idt_base, boot.idt_limit
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = boot.cr0, boot.cr3, boot.cr4, boot.efer
    try:
        vcpu.set_sregs(sregs)
    except OSError as exc:
        raise HostError(
            f"KVM_SET_SREGS refused the guest's boot state ({B.errno_name(exc.errno or 0)}): "
            f"CR0={boot.cr0:#x} CR4={boot.cr4:#x} EFER={boot.efer:#x} CPL{boot.cpl}"
        ) from None
    regs = B.kvm_regs()
    for name, value in boot.gprs.items():
        if not hasattr(regs, name):
            raise UsageError(f"boot state names an unknown register {name!r}")
        setattr(regs, name, value)
    regs.rip, regs.rsp, regs.rflags = boot.rip, boot.rsp, boot.rflags
    vcpu.set_regs(regs)


class RealSession:
    """One Machine running in a KVM VM with one vCPU (implements fastmmio.backend.Session)."""

    def __init__(
        self,
        machine: Machine,
        device: str = "/dev/kvm",
        watchdog_s: float = DEFAULT_WATCHDOG_S,
        exit_sample: int = DEFAULT_EXIT_SAMPLE,
        watchdog_signal: int = WATCHDOG_SIGNAL,
        engine: str = "auto",
    ):
        self.machine = machine
        self.kvm: Kvm | None = None
        self.vm: Vm | None = None
        self.vcpu: Vcpu | None = None
        self.loop: RunLoop | None = None
        self.eventfds: dict[str, IoEventFd] = {}
        try:
            self._build(device, watchdog_s, exit_sample, watchdog_signal, engine)
        except BaseException:
            self.close()
            raise

    def _build(
        self, device: str, watchdog_s: float, exit_sample: int, watchdog_signal: int, engine: str
    ) -> None:
        spec, image = self.machine.spec, self.machine.image
        self.kvm = kvm = Kvm(device)
        kvm.require(B.KVM_CAP_USER_MEMORY, "guest memory")
        kvm.require(B.KVM_CAP_IMMEDIATE_EXIT, "the watchdog and register updates after an exit")
        self.vm = vm = kvm.create_vm()
        if spec.irqchip:
            vm.create_irqchip()  # before the vCPU, as KVM requires
        for ms in spec.memslots:
            vm.add_memslot(ms.slot, ms.gpa, ms.size, readonly=ms.readonly, fill=ms.fill)
        for region in image.regions:
            try:
                vm.write(region.gpa, region.data)
            except UsageError:
                raise UsageError(
                    f"image region '{region.name}' at GPA {region.gpa:#x}+{len(region.data):#x} "
                    "is not inside one memslot of the machine"
                ) from None
        for spec_ev in spec.ioeventfds:
            if spec_ev.name in self.eventfds:
                raise UsageError(f"two ioeventfds are named {spec_ev.name!r}")
            self.eventfds[spec_ev.name] = vm.add_ioeventfd(
                spec_ev.name, spec_ev.pio, spec_ev.addr, spec_ev.length, spec_ev.datamatch
            )
        for zone in spec.coalesced:
            vm.register_coalesced(zone.addr, zone.size, pio=zone.pio)
        self.vcpu = vcpu = vm.create_vcpu(0)
        vcpu.set_supported_cpuid()
        load_boot_state(vcpu, image.boot)
        self.loop = RunLoop(vm, vcpu, spec, self.eventfds, watchdog_s, exit_sample, watchdog_signal, engine)

    # Session protocol -----------------------------------------------------------------------

    def run_batch(self, iterations: int) -> BatchResult:
        if self.loop is None:
            raise FastmmioError("session is closed")
        return self.loop.run_batch(iterations)

    def read_guest(self, gpa: int, size: int) -> bytes:
        if self.vm is None:
            raise FastmmioError("session is closed")
        return self.vm.read(gpa, size)

    def write_guest(self, gpa: int, data: bytes) -> None:
        if self.vm is None:
            raise FastmmioError("session is closed")
        self.vm.write(gpa, data)

    def regs(self) -> dict[str, int]:
        """The vCPU's general registers, RIP and RFLAGS (KVM_GET_REGS) by name."""
        if self.vcpu is None:
            raise FastmmioError("session is closed")
        r = self.vcpu.get_regs()
        return {name: getattr(r, name) for name, _ in B.kvm_regs._fields_}

    @property
    def stopped(self) -> bool:
        return self.loop is not None and self.loop.stopped is not None

    def close(self) -> None:
        """Release everything: watchdog thread, views into kvm_run, vCPU, VM, eventfds,
        memslot mappings, /dev/kvm. Idempotent; safe after a failed open or a stopped guest."""
        if self.loop is not None:
            self.loop.close()
            self.loop = None
        self.vcpu = None
        self.eventfds = {}
        if self.vm is not None:
            vm, self.vm = self.vm, None
            try:
                vm.close()
            except BufferError:
                gc.collect()  # a ctypes view still referenced by a cycle
                vm.close()
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None

    def __enter__(self) -> "RealSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RealBackend:
    """fastmmio.backend.Backend on a KVM device."""

    name = "kvm"

    def __init__(
        self,
        device: str = "/dev/kvm",
        watchdog_s: float = DEFAULT_WATCHDOG_S,
        exit_sample: int = DEFAULT_EXIT_SAMPLE,
        watchdog_signal: int = WATCHDOG_SIGNAL,
        engine: str = "auto",
    ):
        """``engine``: the run loop's per-exit path, ``auto`` (compiled when built), ``c`` or
        ``python`` (:mod:`fastmmio.real.exitpath`)."""
        if not 0 < watchdog_s < float("inf"):  # NaN fails too
            raise UsageError("the watchdog bound must be a positive number of seconds")
        self.device = device
        self.watchdog_s = watchdog_s
        self.exit_sample = exit_sample
        self.watchdog_signal = watchdog_signal
        self.engine = exitpath.choose(engine)

    def check(self) -> None:
        """Raise HostError now if the device cannot be used (missing, no permission, wrong API)."""
        with Kvm(self.device) as kvm:
            kvm.require(B.KVM_CAP_USER_MEMORY, "guest memory")
            kvm.require(B.KVM_CAP_IMMEDIATE_EXIT, "the watchdog")

    def open(self, machine: Machine) -> RealSession:
        return RealSession(
            machine, self.device, self.watchdog_s, self.exit_sample, self.watchdog_signal, self.engine
        )

    def host_info(self, cpl: int | None = None) -> HostInfo:
        return detect_host(self.device, cpl=cpl)
