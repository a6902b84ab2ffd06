"""The vCPU run loop: KVM_RUN, exit dispatch to the userspace device model, coalesced-ring
draining, eventfd and stats accounting, and a watchdog.

One batch (:meth:`RunLoop.run_batch`): the host writes N at ``MAILBOX_ITERATIONS`` and
resumes the vCPU; every KVM_RUN return is an exit to userspace. ``KVM_EXIT_IO`` and
``KVM_EXIT_MMIO`` go to the device model (a write is recorded, a read is answered with
``MachineSpec.device_read_value`` truncated to the access width); the guest's ``OUT
DONE_PORT`` ends the batch. Anything else (``KVM_EXIT_SHUTDOWN``, ``KVM_EXIT_INTERNAL_ERROR``,
``KVM_EXIT_FAIL_ENTRY``, HLT, ...) stops the session with a :class:`GuestError` saying what
the guest was doing.

Watchdog. KVM_RUN is called with the GIL released and no EINTR retry (through ctypes, or from
the compiled per-exit path, which returns EINTR to Python). While a batch runs,
the calling thread blocks the watchdog signal, and KVM_SET_SIGNAL_MASK makes KVM unblock it
inside KVM_RUN only (the scheme QEMU uses for its SIG_IPI). When the bound passes, a timer
thread sets ``kvm_run.immediate_exit`` and sends the signal to the vCPU thread with
``pthread_kill``: KVM_RUN returns EINTR (``vcpu_run()`` sees ``signal_pending()``), the signal
stays pending and blocked in userspace, is never delivered to a handler, and is consumed with
``sigtimedwait`` before the mask is restored. Nothing global (no signal handler) changes, and
it works from any thread.

The per-exit path has two implementations with identical results: the compiled one
(:mod:`fastmmio.real.exitpath`, used when its C extension is built: KVM_RUN, decode, device
model, histogram, sample and ring drain in C for the whole batch, about 50 ns of host time
outside KVM_RUN per exit) and the pure-Python one here, the reference and the fallback (about
1-2 us per exit outside KVM_RUN, by ``benchmarks/bench_runloop.py``). In the Python loop every
view into ``struct kvm_run`` is a ctypes object created once, the KVM_RUN ioctl is a ctypes
function with fixed argtypes, per-exit work is a few attribute reads and, for sampled exits
only, one ExitRecord.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import signal
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastmmio import layout
from fastmmio.deadline import DeadlineTimer
from fastmmio.errors import GuestError
from fastmmio.real import binding as B
from fastmmio.real import exitpath
from fastmmio.result import BatchResult, ExitRecord

if TYPE_CHECKING:
    from fastmmio.machine import MachineSpec
    from fastmmio.real.objects import IoEventFd, Vcpu, Vm

WATCHDOG_SIGNAL = signal.SIGUSR2
DEFAULT_EXIT_SAMPLE = 64

_MMIO_DATA_OFFSET = B.kvm_run.u.offset + B._kvm_run_mmio.data.offset
# struct kvm_run's io and mmio exit members, unpacked in one call each
_IO_EXIT = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO_EXIT = struct.Struct("<Q8sIB")  # phys_addr, data[8], len, is_write
_RING_ENTRY = ctypes.sizeof(B.kvm_coalesced_mmio)
_RING_HEADER = ctypes.sizeof(B.kvm_coalesced_mmio_ring)


def _guest_error(kind: str, message: str, rip: int | None = None, exit_reason: int | None = None) -> GuestError:
    exc = GuestError(message)
    exc.kind = kind  # type: ignore[attr-defined]  # "watchdog", "shutdown", "internal-error", ...
    exc.rip = rip  # type: ignore[attr-defined]
    exc.exit_reason = exit_reason  # type: ignore[attr-defined]
    return exc


class Watchdog(DeadlineTimer):
    """A :class:`~fastmmio.deadline.DeadlineTimer` that, once armed, interrupts one thread's
    KVM_RUN after a deadline.

    ``arm(seconds, thread_id, on_fire)``; ``disarm()`` returns whether it fired. After
    ``disarm()`` returns, no further signal is sent for that arming."""

    def __init__(self, signum: int = WATCHDOG_SIGNAL):
        super().__init__("fastmmio-watchdog")
        self.signum = signum

    def arm(self, seconds: float, thread_id: int, on_fire=None) -> None:  # type: ignore[override]
        def fire() -> None:
            if on_fire is not None:
                on_fire()
            signal.pthread_kill(thread_id, self.signum)

        super().arm(seconds, fire)


@dataclass(slots=True)
class _Exits:
    """What one batch's exits came to (either implementation of the per-exit path)."""

    done: bool  # the guest's OUT to the done port ended it
    error: GuestError | None
    n_io: int
    n_mmio: int
    n_coalesced: int
    inside_ns: int  # host time inside the KVM_RUN ioctl
    histogram: dict  # (kind, addr, size, is_write, data) -> n
    sample: list[ExitRecord]
    coalesced_sample: list[ExitRecord]


class RunLoop:
    """Runs one vCPU of a VM built from a MachineSpec, batch by batch."""

    def __init__(
        self,
        vm: "Vm",
        vcpu: "Vcpu",
        spec: "MachineSpec",
        eventfds: dict[str, "IoEventFd"],
        watchdog_s: float,
        exit_sample: int = DEFAULT_EXIT_SAMPLE,
        watchdog_signal: int = WATCHDOG_SIGNAL,
        engine: str = "auto",
    ):
        """``engine``: the per-exit path, ``"auto"`` (compiled when built), ``"c"`` or
        ``"python"`` (see :mod:`fastmmio.real.exitpath`)."""
        assert vcpu.run is not None and vcpu.run_map is not None
        self.vm = vm
        self.vcpu = vcpu
        self.spec = spec
        self.eventfds = eventfds
        self.watchdog_s = watchdog_s
        self.exit_sample = exit_sample
        self.watchdog = Watchdog(watchdog_signal)
        self.stopped: GuestError | None = None  # set once the session can no longer run
        self.exit_histogram: Counter = Counter()  # last batch: (kind, addr, size, is_write, data) -> n
        self.coalesced_sample: list[ExitRecord] = []  # last batch: coalesced entries, capped

        self._map = vcpu.run_map
        self._fd = vcpu.fd
        base = ctypes.addressof(self._map)
        self._exit_reason = B.u32.from_address(base + B.kvm_run.exit_reason.offset)
        self._immediate_exit = B.u8.from_address(base + B.kvm_run.immediate_exit.offset)
        value = (spec.device_read_value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")
        # by access width: the bytes a userspace read returns, and their value
        self._read_bytes = {w: value[:w] for w in range(1, 9)}
        self._read_value = {w: int.from_bytes(value[:w], "little") for w in range(1, 9)}
        ring_off = vcpu.coalesced_ring_offset() if vm.coalesced else None
        if ring_off is not None:
            self._ring_off = ring_off
            self._ring_first = B.u32.from_address(base + ring_off)
            self._ring_last = B.u32.from_address(base + ring_off + 4)
            self._ring_max = B.coalesced_max_entries(mmap.PAGESIZE)
        else:
            self._ring_off = 0
            self._ring_first = self._ring_last = None
            self._ring_max = 0
        self._vm_stats = vm.stats()
        self._vcpu_stats = vcpu.stats()
        self.engine = exitpath.choose(engine)  # "c" or "python"
        self._engine = None
        if self.engine == "c":
            self._engine = exitpath.compiled.Engine(
                fd=self._fd,
                run_addr=base,
                run_size=len(self._map),
                layout=exitpath.layout(),
                ring_off=self._ring_off if ring_off is not None else -1,
                ring_max=self._ring_max,
                done_port=spec.done_port,
                read_value=spec.device_read_value & 0xFFFF_FFFF_FFFF_FFFF,
                cap=max(0, exit_sample),
            )
        # The mask KVM installs during KVM_RUN: the thread's current mask without the watchdog
        # signal, so that only inside KVM_RUN the pending signal can interrupt the guest.
        current = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        bits = 0
        for s in current:
            if s != watchdog_signal:
                bits |= 1 << (int(s) - 1)
        vcpu.set_signal_mask(bits)

    # ---------------------------------------------------------------------------------------

    def release_views(self) -> None:
        """Drop every ctypes view into the vCPU mapping so that it can be unmapped."""
        if self._engine is not None:
            self._engine.detach()
        self._exit_reason = self._immediate_exit = None  # type: ignore[assignment]
        self._ring_first = self._ring_last = None
        self._map = None

    def close(self) -> None:
        self.watchdog.close()
        self.release_views()

    # ---------------------------------------------------------------------------------------

    def _drain_ring(self, sample: list[ExitRecord]) -> int:
        """Consume every entry of the coalesced MMIO ring (kvm_coalesced_mmio_ring: the kernel
        appends at ``last``, userspace consumes from ``first``); returns how many."""
        first = self._ring_first.value
        last = self._ring_last.value
        if first == last:
            return 0
        n = (last - first) % self._ring_max
        room = self.exit_sample - len(sample)
        if room > 0:
            m = self._map
            i = first
            for _ in range(min(n, room)):
                off = self._ring_off + _RING_HEADER + i * _RING_ENTRY
                addr, ln, pio = struct.unpack_from("<QII", m, off)
                data = int.from_bytes(m[off + 16 : off + 16 + min(ln, 8)], "little")
                sample.append(ExitRecord("coalesced-pio" if pio else "coalesced-mmio", addr, ln, True, data))
                i = (i + 1) % self._ring_max
        self._ring_first.value = last
        return n

    def run_batch(self, iterations: int) -> BatchResult:
        if self.stopped is not None:
            raise _guest_error(
                "stopped", f"this session was stopped earlier and cannot run again: {self.stopped}"
            )
        if iterations < 0:
            raise ValueError("iterations must be >= 0")
        vm, vcpu = self.vm, self.vcpu
        vm.write(layout.MAILBOX_GPA + layout.MAILBOX_ITERATIONS, struct.pack("<Q", iterations))
        for ev in self.eventfds.values():
            ev.read()  # start every counter at zero
        vm_before = self._vm_stats.snapshot() if self._vm_stats else {}
        vcpu_before = self._vcpu_stats.snapshot() if self._vcpu_stats else {}

        wd = self.watchdog
        loop = self._exits_compiled if self._engine is not None else self._exits_python
        done = False
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [wd.signum])
        wd.arm(self.watchdog_s, threading.get_ident(), self._on_watchdog)
        t_start = time.perf_counter_ns()
        try:
            out = loop()
            done = out.done
        finally:
            t_end = time.perf_counter_ns()
            fired = wd.disarm() and not done  # a late firing after the done OUT is harmless
            self._immediate_exit.value = 0
            # consume a watchdog signal that is still pending, then restore the mask
            while signal.sigtimedwait([wd.signum], 0) is not None:
                pass
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        error = out.error
        n_io, n_mmio, n_coalesced, inside = out.n_io, out.n_mmio, out.n_coalesced, out.inside_ns
        EXIT_IO, EXIT_MMIO, done_port = B.KVM_EXIT_IO, B.KVM_EXIT_MMIO, self.spec.done_port
        # After an I/O or MMIO exit the completion is pending until the next KVM_RUN.
        vcpu.pending_completion = self._exit_reason.value in (EXIT_IO, EXIT_MMIO) and error is None and not fired

        self.exit_histogram = Counter(out.histogram)
        self.coalesced_sample = out.coalesced_sample
        if fired:
            error = _guest_error(
                "watchdog",
                f"watchdog: the guest did not reach the done port ({done_port:#x}) within "
                f"{self.watchdog_s:g} s; stopped {self.describe_guest()}; this batch: "
                f"{n_io + n_mmio} userspace exits, {self._eventfd_total_peek()} eventfd signals",
                rip=self._rip(),
            )
        if error is not None:
            self.stopped = error
            raise error

        ticks_raw = vm.read(layout.MAILBOX_GPA + layout.MAILBOX_T0, 16)
        t0_guest, t1_guest = struct.unpack("<QQ", ticks_raw)
        signals = {name: ev.read() for name, ev in self.eventfds.items()}
        stats: dict[str, int] = {}
        if self._vcpu_stats is not None:
            stats.update(self._vcpu_stats.delta(vcpu_before))
        if self._vm_stats is not None:
            stats.update({f"vm.{k}": v for k, v in self._vm_stats.delta(vm_before).items()})
        events = {
            "kvm.user_exit.io": n_io,
            "kvm.user_exit.mmio": n_mmio,
            "kvm.coalesced.append": n_coalesced,
            "kvm.eventfd.signal": sum(signals.values()),
        }
        host_ns = t_end - t_start
        return BatchResult(
            iterations=iterations,
            ticks=(t1_guest - t0_guest) & 0xFFFF_FFFF_FFFF_FFFF,
            user_exits=n_io + n_mmio,
            eventfd_signals=signals,
            exits=out.sample,
            coalesced_entries=n_coalesced,
            kvm_stats=stats,
            events={k: v for k, v in events.items() if v},
            host_ns=host_ns,
            host_ns_outside_run=max(0, host_ns - inside),
        )

    # ---------------------------------------------------------------------------------------
    # The per-exit path: KVM_RUN until the done OUT, a stop, or an error. Two implementations
    # giving identical results: the pure-Python reference below and the compiled one
    # (fastmmio.real.exitpath). Both run with the watchdog armed and its signal blocked.

    def _exits_python(self) -> "_Exits":
        # locals for the hot loop
        run_ioctl, get_errno, KVM_RUN, fd = B.run_ioctl, B.get_errno, B.KVM_RUN, self._fd
        clock = time.perf_counter_ns
        exit_reason, m = self._exit_reason, self._map
        EXIT_IO, EXIT_MMIO, OUT = B.KVM_EXIT_IO, B.KVM_EXIT_MMIO, B.KVM_EXIT_IO_OUT
        done_port = self.spec.done_port
        read_bytes = self._read_bytes
        has_ring = self._ring_first is not None
        ring_first, ring_last = self._ring_first, self._ring_last
        cap = self.exit_sample
        sample: list[ExitRecord] = []
        coalesced_sample: list[ExitRecord] = []
        hist: dict = {}
        hist_get = hist.get
        unpack_io, unpack_mmio = _IO_EXIT.unpack_from, _MMIO_EXIT.unpack_from
        IO_OFF = MMIO_OFF = B.kvm_run.u.offset
        read_value = self._read_value
        from_bytes = int.from_bytes
        wd = self.watchdog
        n_io = n_mmio = n_coalesced = 0
        inside = 0
        error: GuestError | None = None
        done = False
        try:
            while True:
                t0 = clock()
                r = run_ioctl(fd, KVM_RUN, 0)
                inside += clock() - t0
                if has_ring and ring_first.value != ring_last.value:
                    n_coalesced += self._drain_ring(coalesced_sample)
                if r < 0:
                    e = get_errno()
                    if e == errno.EINTR or e == errno.EAGAIN:
                        if wd.fired:
                            break
                        continue  # another signal: Python runs its handler at the next bytecode
                    error = _guest_error("kvm-run", f"KVM_RUN failed: {B.errno_name(e)} ({e})")
                    break
                reason = exit_reason.value
                if reason == EXIT_IO:
                    direction, size, port, count, off = unpack_io(m, IO_OFF)
                    if direction == OUT:
                        if port == done_port:
                            done = True
                            break
                        data = from_bytes(m[off : off + size], "little")
                        is_write = True
                    else:
                        m[off : off + size * count] = read_bytes[size] * count
                        data = read_value[size]
                        is_write = False
                    n_io += 1
                    key = ("io", port, size, is_write, data)
                    hist[key] = hist_get(key, 0) + count
                    if len(sample) < cap:
                        sample.append(ExitRecord("io", port, size, is_write, data, count))
                elif reason == EXIT_MMIO:
                    addr, raw, size, is_write = unpack_mmio(m, MMIO_OFF)
                    if is_write:
                        data = from_bytes(raw[:size], "little")
                        is_write = True
                    else:
                        m[_MMIO_DATA_OFFSET : _MMIO_DATA_OFFSET + size] = read_bytes[size]
                        data = read_value[size]
                        is_write = False
                    n_mmio += 1
                    key = ("mmio", addr, size, is_write, data)
                    hist[key] = hist_get(key, 0) + 1
                    if len(sample) < cap:
                        sample.append(ExitRecord("mmio", addr, size, is_write, data))
                else:
                    error = self._exit_error(reason)
                    break
        except (KeyError, ValueError, IndexError):
            # read_bytes[size] or the data slice: a width or offset no KVM reports
            error = self._bad_exit()
        return _Exits(done, error, n_io, n_mmio, n_coalesced, inside, hist, sample, coalesced_sample)

    def _exits_compiled(self) -> "_Exits":
        engine, C = self._engine, exitpath.compiled
        wd = self.watchdog
        engine.reset()
        hist: dict = {}
        error: GuestError | None = None
        done = False
        while True:
            status, value = engine.run()
            if status == C.ST_DONE:
                done = True
                break
            if status == C.ST_INTR:
                if wd.fired:
                    break
                continue  # another signal: its Python handler has run by now
            if status == C.ST_FULL:
                for key, n in engine.take_histogram():
                    hist[key] = hist.get(key, 0) + n
                continue
            if status == C.ST_ERRNO:
                error = _guest_error("kvm-run", f"KVM_RUN failed: {B.errno_name(value)} ({value})")
            elif status == C.ST_EXIT:
                error = self._exit_error(value)
            else:
                error = self._bad_exit()
            break
        for key, n in engine.take_histogram():
            hist[key] = hist.get(key, 0) + n
        n_io, n_mmio, n_coalesced, inside, sample, coalesced = engine.totals()
        return _Exits(
            done,
            error,
            n_io,
            n_mmio,
            n_coalesced,
            inside,
            hist,
            [ExitRecord(*t) for t in sample],
            [ExitRecord(*t) for t in coalesced],
        )

    def _bad_exit(self) -> GuestError:
        return _guest_error(
            "kvm-run",
            f"KVM_RUN returned an exit the device model cannot answer (an access width outside "
            f"1-8 bytes, or data outside the kvm_run mapping) {self.describe_guest()}",
        )

    # ---------------------------------------------------------------------------------------

    def _on_watchdog(self) -> None:
        """Runs on the watchdog thread: make the next (or current) KVM_RUN return at once."""
        if self._immediate_exit is not None:
            self._immediate_exit.value = 1

    def _eventfd_total_peek(self) -> int:
        return sum(ev.read() for ev in self.eventfds.values())

    def _rip(self) -> int | None:
        try:
            return self.vcpu.get_regs().rip
        except OSError:
            return None

    def describe_guest(self) -> str:
        """``at RIP=... (instruction) CPLn``, as far as the vCPU state can be read."""
        return describe_guest(self.vm, self.vcpu)

    def _exit_error(self, reason: int) -> GuestError:
        run = self.vcpu.run
        assert run is not None
        name = B.EXIT_REASON_NAMES.get(reason, f"exit reason {reason}")
        where = self.describe_guest()
        if reason == B.KVM_EXIT_SHUTDOWN:
            msg = (
                f"guest shut down ({name}: a triple fault; under PVM also any exception or HLT "
                f"in native CPL3 code) {where}"
            )
            kind = "shutdown"
        elif reason == B.KVM_EXIT_INTERNAL_ERROR:
            sub = run.internal.suberror
            subname = B.INTERNAL_ERROR_NAMES.get(sub, f"suberror {sub}")
            detail = ""
            if sub == B.KVM_INTERNAL_ERROR_EMULATION and run.emulation_failure.flags & (
                B.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
            ):
                ef = run.emulation_failure
                detail = f"; instruction bytes {bytes(ef.insn_bytes[: ef.insn_size]).hex(' ')}"
            else:
                nd = min(run.internal.ndata, 16)
                if nd:
                    detail = "; data " + " ".join(f"{run.internal.data[i]:#x}" for i in range(nd))
            msg = f"KVM could not run the guest ({name}, {subname}{detail}) {where}"
            kind = "internal-error"
        elif reason == B.KVM_EXIT_FAIL_ENTRY:
            fe = run.fail_entry
            msg = (
                f"VM entry failed ({name}: hardware entry failure reason "
                f"{fe.hardware_entry_failure_reason:#x} on CPU {fe.cpu}) {where}"
            )
            kind = "fail-entry"
        elif reason == B.KVM_EXIT_HLT:
            msg = f"guest halted ({name}) {where}"
            kind = "hlt"
        else:
            msg = f"unexpected exit {name} {where}"
            kind = "unexpected-exit"
        return _guest_error(kind, msg, rip=self._rip(), exit_reason=reason)


# --------------------------------------------------------------------------------------------
# What the guest was doing
# --------------------------------------------------------------------------------------------


def guest_linear_to_physical(vm: "Vm", cr3: int, linear: int) -> int | None:
    """Walk the guest's 4-level IA-32e paging structures (SDM Vol. 3A 4.5) in guest memory:
    the GPA of ``linear``, or None when an entry is not present or outside every memslot."""
    table = cr3 & 0x000F_FFFF_FFFF_F000
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        index = (linear >> shift) & 0x1FF
        try:
            entry = int.from_bytes(vm.read(table + 8 * index, 8), "little")
        except Exception:
            return None
        if not entry & 1:
            return None
        frame = entry & 0x000F_FFFF_FFFF_F000
        if level in (3, 2) and entry & (1 << 7):  # 1 GiB / 2 MiB page (PS)
            size = 1 << shift
            return (frame & ~(size - 1)) | (linear & (size - 1))
        table = frame
    return table | (linear & 0xFFF)


def describe_guest(vm: "Vm", vcpu: "Vcpu") -> str:
    try:
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
    except OSError as exc:
        return f"(registers unreadable: {B.errno_name(exc.errno or 0)})"
    rip = regs.rip
    cpl = sregs.cs.dpl
    insn = "?"
    gpa = guest_linear_to_physical(vm, sregs.cr3, rip) if sregs.cr0 & (1 << 31) else rip
    if gpa is not None:
        try:
            code = vm.read(gpa, 15)
        except Exception:
            try:
                code = vm.read(gpa, 1)
            except Exception:
                code = b""
        if code:
            try:
                from iced_x86 import Decoder, Formatter, FormatterSyntax

                dec = Decoder(64 if sregs.cs.l else 32, code, ip=rip)
                ins = dec.decode()
                insn = Formatter(FormatterSyntax.INTEL).format(ins)
            except Exception:  # pragma: no cover - decoder missing or garbage
                insn = code[:8].hex(" ")
    else:
        insn = "not mapped"
    return f"at RIP={rip:#x} ({insn}) CPL{cpl}"
