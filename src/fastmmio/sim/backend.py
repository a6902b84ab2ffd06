"""The simulator backend: the same :class:`~fastmmio.machine.Machine` the real backend runs,
on unicorn + a processor model + the KVM model. ``SimOptions(arch="vmx")`` (default) is the
Intel VMX/EPT processor under KVM's VMX handlers; ``arch="svm"`` the AMD SVM processor with
nested paging under KVM's SVM handlers (:mod:`fastmmio.sim.svm_glue`), with the same guest
image, memslots, buses, ioeventfds and emulator.

A :class:`SimSession` answers the same :class:`~fastmmio.backend.Session` calls as the real
one and fills the same :class:`~fastmmio.result.BatchResult` fields, plus ``events``: every
event the models counted *between the guest's two RDTSCs* (the code hook watches the two
RDTSC instructions of the doorbell loop), so a batch's events are exactly what the guest's
timed region did, as kvm-unit-tests times it. Batches carry no TSC ticks: the cost model
prices the events (:mod:`fastmmio.costs`).

The userspace half (what QEMU or fastmmio's real run loop does on ``KVM_EXIT_IO`` /
``KVM_EXIT_MMIO``) is the same device model as the real backend's: writes are recorded, reads
answer ``spec.device_read_value`` cut to the access width, the coalesced ring is drained at
every exit, and the ``OUT`` to the done port ends the batch.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from iced_x86 import Decoder, Mnemonic

from fastmmio import layout
from fastmmio.errors import GuestError, UsageError, did_you_mean
from fastmmio.machine import IoEventFdSpec, Machine, MachineSpec
from fastmmio.result import BatchResult, ExitRecord
from fastmmio.sim.arch import get_arch
from fastmmio.sim.cpu import CpuEngine, GuestCpu
from fastmmio.sim.kvm.variants import ARCHES, variants_for
from fastmmio.sim.kvm.vm import KvmVm
from fastmmio.sim.nested import NESTED_OFF, NestedL0, nested_setting
from fastmmio.sim.vmx.caches import CONFIGS
from fastmmio.sim.vmx.memory import PAGE_SIZE, HostMemory

# The guest CPUID table (KVM_SET_CPUID2) the simulated vCPU gets unless a caller passes one:
# leaf 0 names the vendor and caps the basic leaves at 0, so every other leaf reads zeros.
# The differential tests pass the real host's KVM_GET_SUPPORTED_CPUID table instead.
DEFAULT_CPUID = {(0, 0): (0, 0x756E_6547, 0x6C65_746E, 0x4965_6E69)}  # "GenuineIntel"
EXIT_SAMPLE = 64  # exit records kept per batch (exact counts are kept separately)
# Extra ioeventfds put on the buses for sweeps ("how does the look-up grow with devices"):
# page-aligned doorbells above the real one in the MMIO hole, ports above the doorbell port.
EXTRA_MMIO_BASE = layout.MMIO_BASE + 0x8000
EXTRA_PIO_BASE = layout.DOORBELL_PORT + 0x100
_ZERO_PAGE = bytes(PAGE_SIZE)


@dataclass(frozen=True)
class SimOptions:
    """What the simulated machine is.

    ``variant``: the KVM variant (:data:`fastmmio.sim.kvm.variants.VARIANTS`). ``caches``: the
    processor's translation-cache configuration (``sdm-max``, ``none``, ``skylake-sp``, ...).
    ``vpid``: KVM's "enable VPID" (on by default upstream). ``nested``: ``off``, or the L0
    hypervisor KVM runs under (:data:`fastmmio.sim.nested.L0_MODELS`: ``kvm``, ``hyperv``; a
    bool is accepted, True meaning the default L0): the guest becomes L2, the processor walks
    L0's shadow EPT, and every exit goes through L0 (:mod:`fastmmio.sim.nested`).
    ``mmio_caching``: ``kvm.mmio_caching``. ``ept_ad``: ``kvm_intel.eptad``.
    ``extra_ioeventfds``: wildcard ioeventfds added to each bus besides the route's own.
    ``timeout_s``: the watchdog: host seconds a batch may run before it is stopped.
    ``fast_exits``: handle a store's EPT exit that KVM answers with a skip inside unicorn's
    hook, without stopping the engine (:meth:`fastmmio.sim.cpu.GuestCpu._fast_ept_exit`);
    False keeps the reference path (stop, handle, restart). Both count the same events
    (tests/unit/test_sim_fast_exits.py); it changes how fast the simulator runs, not what
    the simulated machine is.
    ``arch``: ``vmx`` or ``svm`` (default: the variant's own; the variant must be one of
    that architecture's). On SVM,
    ``caches`` names an SVM configuration (``apm-max``, ``none``, ``zen4``; the default
    ``sdm-max`` becomes ``apm-max``, the architecture's maximum), ASIDs are always on
    (``vpid`` off is refused), ``ept_ad`` off is refused (nested paging keeps A/D bits), and
    ``next_rip_on_npf`` says whether the processor fills next RIP on #NPF (``yes``, which
    01cde4eaaeca's fast path needs; ``no`` as APM 15.7.1 reads).
    """

    variant: str = "upstream"
    caches: str = "sdm-max"
    vpid: bool = True
    nested: str = NESTED_OFF
    mmio_caching: bool = True
    ept_ad: bool = True
    extra_ioeventfds: int = 0
    timeout_s: float = 30.0
    fast_exits: bool = True
    arch: str | None = None
    next_rip_on_npf: str = "yes"

    def __post_init__(self) -> None:
        object.__setattr__(self, "nested", nested_setting(self.nested))
        if self.arch is None:
            from fastmmio.sim.kvm.variants import ALL_VARIANTS

            cls = ALL_VARIANTS.get(self.variant)
            object.__setattr__(self, "arch", cls.arch if cls is not None else "vmx")
        if self.arch not in ARCHES:
            raise UsageError(f"unknown architecture {self.arch!r}; choose from {', '.join(ARCHES)}")
        variants = variants_for(self.arch)
        if self.variant not in variants:
            raise UsageError(f"unknown KVM variant {self.variant!r} on {self.arch}"
                             f"{did_you_mean(self.variant, variants)}; "
                             f"choose from {', '.join(variants)}")
        if self.next_rip_on_npf not in ("yes", "no"):
            raise UsageError(f"next RIP on #NPF must be yes or no, got {self.next_rip_on_npf!r}")
        configs = CONFIGS
        if self.arch == "svm" and self.nested != NESTED_OFF:
            raise UsageError("nested is modelled on vmx only (an L0 under KVM on VMX); "
                             "choose --arch vmx or leave --nested off")
        if self.arch == "svm" and not (self.vpid and self.ept_ad):
            raise UsageError("on svm ASIDs are always on and nested paging always keeps A/D "
                             "bits: VPID off and EPT A/D off are VMX settings")
        if self.arch == "svm":
            from fastmmio.sim.svm.caches import CONFIGS as configs
            if self.caches == "sdm-max":
                object.__setattr__(self, "caches", "apm-max")
        if isinstance(self.caches, str) and self.caches not in configs:
            raise UsageError(f"unknown cache configuration {self.caches!r}"
                             f"{did_you_mean(self.caches, configs)}; "
                             f"choose from {', '.join(configs)}")
        if not 0 <= self.extra_ioeventfds <= 1024:
            raise UsageError("extra ioeventfds must be between 0 and 1024")
        if self.timeout_s <= 0:
            raise UsageError("the watchdog timeout must be positive")

    def describe(self) -> str:
        parts = [self.variant, f"caches={self.caches}", f"vpid={'on' if self.vpid else 'off'}"]
        if self.arch == "svm":
            parts[2] = f"next_rip_on_npf={self.next_rip_on_npf}"
        if self.is_nested:
            parts.append(f"nested={self.nested}")
        if not self.mmio_caching:
            parts.append("mmio_caching=N")
        if self.extra_ioeventfds:
            parts.append(f"+{self.extra_ioeventfds} ioeventfds")
        return " ".join(parts)

    @property
    def is_nested(self) -> bool:
        """KVM runs as a guest (under some L0)."""
        return self.nested != NESTED_OFF


class SimBackend:
    """Backend protocol implementation for the simulator.

    ``engines``: an :class:`EnginePool` to take CPU engines from and give them back to at
    close (many simulations of machines of the same shape: ``compare``, ``sweep``); without
    one, each session creates its engine and closes it at close.
    """

    def __init__(self, options: SimOptions | None = None, *, engines: "EnginePool | None" = None,
                 **kw: Any):
        self.options = options if options is not None else SimOptions(**kw)
        self.engines = engines
        self.name = f"sim:{self.options.variant}"

    def open(self, machine: Machine) -> "SimSession":
        return SimSession(machine, self.options, engines=self.engines)


def machine_shape(spec: MachineSpec) -> tuple:
    """What decides the host memory layout of a simulated machine: its memslots in order
    (their backing is allocated in that order from a fresh allocator, so the same memslots
    give the same host-physical addresses). Machines of one shape share CPU engines."""
    return tuple((m.slot, m.gpa, m.size, m.readonly) for m in spec.memslots)


@dataclass
class _IdleEngine:
    engine: CpuEngine
    pages: dict[int, Any]  # pfn -> the page buffers mapped into the engine
    ranges: list[tuple[int, int]]  # the backing ranges they came from (checked at reuse)


class EnginePool:
    """Idle CPU engines (:class:`~fastmmio.sim.cpu.CpuEngine`) with the memslot pages mapped
    into them, by :func:`machine_shape`: set up once, not per simulation.

    Creating a unicorn engine and mapping a machine's memory into it, and closing it again,
    cost more than most simulations. A session opened with a pool takes an idle engine of its
    machine's shape when there is one: it zeroes the pages, builds its models over them as a
    new session would (the allocator hands out the same addresses, checked), and resets the
    engine (:meth:`CpuEngine.reset`); at close it gives the engine back, unless its last run
    raised. Everything else (processor, KVM model, registers, hooks) is new per session, so a
    session from a pool counts the same events as a new one (tests/unit/test_sim_reuse.py).
    A closed session's guest memory is then the next session's: read what it needs before
    closing (its KVM model and EPT tables stay its own). ``max_idle`` engines are kept per
    shape; :meth:`close` closes them. One pool per thread: a session is not shared.
    """

    def __init__(self, max_idle: int = 2):
        self.max_idle = max_idle
        self._idle: dict[tuple, list[_IdleEngine]] = {}
        self.created = 0  # engines created for sessions of this pool
        self.reused = 0  # sessions served by an idle engine

    def take(self, shape: tuple) -> _IdleEngine | None:
        idle = self._idle.get(shape)
        if idle:
            self.reused += 1
            return idle.pop()
        self.created += 1
        return None

    def give(self, shape: tuple, idle: _IdleEngine) -> None:
        kept = self._idle.setdefault(shape, [])
        if len(kept) < self.max_idle:
            kept.append(idle)
        else:
            idle.engine.close()

    def close(self) -> None:
        for kept in self._idle.values():
            for idle in kept:
                idle.engine.close()
        self._idle.clear()

    def __enter__(self) -> "EnginePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _code_bytes(machine: Machine) -> bytes:
    image = machine.image
    for region in image.regions:
        if region.gpa == image.code_gpa:
            return region.data
    return b""


def _timed_region(machine: Machine) -> tuple[int, int] | None:
    """Guest-physical addresses of the doorbell loop's two RDTSC instructions, or None for a
    program without a timed region (then a batch's events are those of the whole batch)."""
    image = machine.image
    code = _code_bytes(machine)
    rdtsc = [i.ip for i in Decoder(64, code, ip=image.code_gpa) if i.mnemonic == Mnemonic.RDTSC]
    if len(rdtsc) < 2:
        return None
    return rdtsc[0], rdtsc[-1]


class SimSession:
    """One simulated VM with one vCPU running a guest image."""

    def __init__(self, machine: Machine, options: SimOptions,
                 engines: EnginePool | None = None):
        self.machine = machine
        self.options = options
        spec = machine.spec
        if options.extra_ioeventfds:
            spec = replace(spec, ioeventfds=spec.ioeventfds + _extra_ioeventfds(options.extra_ioeventfds))
        self.spec = spec
        self._engines = engines
        self._shape = machine_shape(spec)
        idle = engines.take(self._shape) if engines is not None else None
        try:
            self._build(machine, options, idle)
        except BaseException:
            if idle is not None:
                if "cpu" in self.__dict__:
                    self.cpu.close()
                else:  # refused before the engine was touched (an ioeventfd the variant refuses)
                    engines.give(self._shape, idle)
            raise

    def _build(self, machine: Machine, options: SimOptions, idle: "_IdleEngine | None") -> None:
        spec = self.spec
        boot = machine.image.boot
        self.memory = HostMemory(46)
        if idle is not None:
            for page in idle.pages.values():
                page[:] = _ZERO_PAGE
            self.memory.pages.update(idle.pages)
        arch = get_arch(options.arch)
        self.processor = arch.make_processor(self.memory, options)
        self.events: Counter[str] = self.processor.events  # one counter for the machine
        self.vm = KvmVm.from_spec(spec, machine.image, memory=self.memory, events=self.events,
                                  variant=options.variant, mmio_caching=options.mmio_caching,
                                  ad_enabled=options.ept_ad)
        # nested: L0 sits between the processor and KVM (L1), which sees the processor through
        # L0 (its EPTP and INVEPT go to L0, which owns the EPT the processor walks)
        self.l0 = (NestedL0(options.nested, self.processor, self.memory, self.events)
                   if options.is_nested else None)
        self.vcpu = self.vm.create_vcpu(self.l0.l1_processor if self.l0 else self.processor,
                                        nested=options.is_nested,
                                        irqchip_in_kernel=spec.irqchip,
                                        userspace=self._userspace, cpuid=DEFAULT_CPUID)
        if self.l0 is not None:
            self.l0.attach(self.vcpu)
            self.l0.l1_set_eptp(self.vm.mmu.eptp)
        else:
            arch.load_root(self.processor, self.vm.mmu)
        self.processor.load_guest_state(cr0=boot.cr0, cr3=boot.cr3, cr4=boot.cr4,
                                        efer=boot.efer, cpl=boot.cpl)
        self._ranges = self.vm.backing_ranges()
        if idle is not None and idle.ranges != self._ranges:  # pragma: no cover - see shape
            raise AssertionError(f"machine shape {self._shape} backed at {self._ranges}, "
                                 f"its pooled engine at {idle.ranges}")
        self.cpu = GuestCpu(self.memory, self.processor, boot, self.l0 or self.vcpu,
                            engine=idle.engine if idle is not None else None,
                            fast_exits=options.fast_exits)
        if idle is None:
            for hpa, size in self._ranges:
                self.cpu.map_host_range(hpa, size)
        arch.bind(self.processor, self.cpu, self.vcpu)
        timed = _timed_region(machine)
        self._whole_batch = timed is None
        self._t0_ip, self._t1_ip = timed if timed is not None else (-1, -1)
        code_end = machine.image.code_gpa + machine.image.code_size
        self._in_timed = False
        self._timed: Counter[str] = Counter()
        self._snap: Counter[str] | None = None
        if options.fast_exits:  # guest.insn per block; Python hooks on the two RDTSCs only
            for ip in sorted({self._t0_ip, self._t1_ip} - {-1}):
                self.cpu.hook_code(self._on_rdtsc, ip, ip)
            self.cpu.count_instructions(machine.image.code_gpa,
                                        _code_bytes(machine)[:machine.image.code_size])
        else:
            self.cpu.hook_code(self._on_insn, machine.image.code_gpa, code_end - 1)
        self._batch_exits: list[ExitRecord] = []
        self._user_exits = 0
        self._coalesced = 0
        self._done = False
        self._stopped_at_done = False
        self.exit_histogram: Counter[tuple] = Counter()  # last batch, as RunLoop.exit_histogram
        self.closed = False
        self._released = False

    # -- guest code hook: instruction count and the timed region ------------------------------

    def _on_rdtsc(self, uc, address: int, size: int, _user) -> None:
        """The timed region's ends with ``guest.insn`` counted per block
        (:meth:`GuestCpu.count_instructions`): the block's instructions after this one are
        counted already, and are not part of the count up to here."""
        ahead = self.cpu.insns_after(address)
        if address == self._t0_ip:
            self._snap = Counter(self.processor.events)
            self._snap["guest.insn"] -= ahead
        if address == self._t1_ip and self._snap is not None:
            now = self.processor.events
            delta = Counter({k: v - self._snap.get(k, 0) for k, v in now.items()})
            delta["guest.insn"] -= ahead
            self._timed = +delta
            self._snap = None

    def _on_insn(self, uc, address: int, size: int, _user) -> None:
        """Per instruction (the reference path, ``fast_exits=False``): ``guest.insn`` and the
        timed region's ends."""
        ev = self.events
        ev["guest.insn"] += 1
        if address == self._t0_ip:
            self._snap = Counter(self.processor.events)
        elif address == self._t1_ip and self._snap is not None:
            now = self.processor.events
            delta = Counter({k: v - self._snap.get(k, 0) for k, v in now.items()})
            self._timed = +delta
            self._snap = None

    # -- userspace: the VMM's device model ---------------------------------------------------

    def _userspace(self, rec: ExitRecord) -> int | None:
        self._coalesced += len(self.vm.coalesced_ring.drain())
        if rec.kind == "io" and rec.addr == self.spec.done_port and rec.is_write:
            self._done = True
            return None
        if rec.kind not in ("io", "mmio"):
            return None
        self._user_exits += 1
        value = 0
        if not rec.is_write:
            value = self.spec.device_read_value & ((1 << (8 * rec.size)) - 1)
            rec = replace(rec, data=value)
        self.exit_histogram[(rec.kind, rec.addr, rec.size, rec.is_write, rec.data)] += 1
        if len(self._batch_exits) < EXIT_SAMPLE:
            self._batch_exits.append(rec)
        return value

    # -- Session protocol --------------------------------------------------------------------

    def run_batch(self, iterations: int) -> BatchResult:
        if self.closed:
            raise GuestError("the simulated VM is closed")
        self.write_guest(layout.MAILBOX_GPA + layout.MAILBOX_ITERATIONS,
                         iterations.to_bytes(8, "little"))
        self._batch_exits = []
        self._user_exits = 0
        self._coalesced = 0
        self._done = False
        self._timed = Counter()
        batch_start = Counter(self.events) if self._whole_batch else None
        self.exit_histogram = Counter()
        if self._stopped_at_done:
            # KVM_RUN after the done port's KVM_EXIT_IO: KVM first completes that OUT
            # (complete_fast_pio_out). unicorn has executed the OUT already, so only the
            # model's state is completed; the CPU's registers are not written back.
            if self.vcpu.complete_userspace_io(0) and self.l0 is not None:
                self.l0.resume_l2()  # L1's next KVM_RUN: VMRESUME, trapped by L0
            self._stopped_at_done = False
        fds_before = self.vm.eventfd_counts()
        stats_before = self.vcpu.kvm_stats()
        t0 = time.perf_counter_ns()
        stop = self.cpu.run(timeout_us=int(self.options.timeout_s * 1e6))
        host_ns = time.perf_counter_ns() - t0
        self._stopped_at_done = self._done
        if not self._done:
            self.closed = True
            last = self.vcpu.last_exit
            what = f"{stop.kind} at RIP {stop.rip:#x}: {stop.detail}"
            if stop.kind == "budget":
                raise GuestError(f"watchdog: the simulated guest did not finish its batch within "
                                 f"{self.options.timeout_s:g} s ({what})")
            if last is not None and last.kind not in ("io", "mmio"):
                what += f" (KVM_RUN returned {last.kind})"
            raise GuestError(f"simulated guest stopped before the done port: {what}")
        if batch_start is not None:
            self._timed = +Counter({k: v - batch_start.get(k, 0) for k, v in self.events.items()})
        fds_after = self.vm.eventfd_counts()
        stats_after = self.vcpu.kvm_stats()
        return BatchResult(
            iterations=iterations,
            ticks=None,
            user_exits=self._user_exits,
            eventfd_signals={k: fds_after[k] - fds_before.get(k, 0) for k in fds_after
                             if not k.startswith("extra-")},
            exits=list(self._batch_exits),
            coalesced_entries=self._coalesced,
            kvm_stats={k: v - stats_before.get(k, 0) for k, v in stats_after.items()
                       if v - stats_before.get(k, 0)},
            events=dict(self._timed),
            host_ns=host_ns,
        )

    def read_guest(self, gpa: int, size: int) -> bytes:
        data = self.vm.guest_memory.read_guest(gpa, size)
        if data is None:
            raise UsageError(f"guest-physical {gpa:#x}+{size} is not in a memslot")
        return data

    def write_guest(self, gpa: int, data: bytes) -> None:
        self.vm.write_backing(gpa, data)

    def regs(self) -> dict[str, int]:
        return self.cpu.regs()

    def close(self) -> None:
        """Release the unicorn engine and its memory (also after a guest error), or give the
        engine back to the session's :class:`EnginePool` when its last run ended normally."""
        self.closed = True
        if self._released:
            return
        self._released = True
        if self._engines is not None and self.cpu.reusable:
            mapped = self.cpu.engine.mapped
            pages = {pfn: self.memory.pages[pfn] for pfn in mapped}
            self._engines.give(self._shape, _IdleEngine(self.cpu.detach(), pages, self._ranges))
            return
        self.cpu.close()

    def __enter__(self) -> "SimSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _extra_ioeventfds(n: int) -> tuple[IoEventFdSpec, ...]:
    """``n`` wildcard ioeventfds on each of the MMIO and PIO buses, away from the route's."""
    extra = []
    for i in range(n):
        extra.append(IoEventFdSpec(f"extra-mmio-{i}", False, EXTRA_MMIO_BASE + 8 * i, 4))
        extra.append(IoEventFdSpec(f"extra-pio-{i}", True, EXTRA_PIO_BASE + 4 * i, 4))
    return tuple(extra)
