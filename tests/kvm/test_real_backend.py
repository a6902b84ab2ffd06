"""RealBackend on /dev/kvm: devices, memslots, routes, stats, the watchdog, errors, fd hygiene."""

from __future__ import annotations

import dataclasses
import signal
import struct
import threading
import time

import pytest

from fastmmio import layout
from fastmmio.errors import GuestError, HostError, IoEventFdError
from fastmmio.image import Region
from fastmmio.machine import IoEventFdSpec, Machine
from fastmmio.real import binding as B
from fastmmio.real import objects as O
from fastmmio.real.backend import RealBackend
from fastmmio.real.host import detect_host
from fastmmio.routes import build_machine, get_route, load_catalogue

N = 16  # accesses per batch: enough to see per-access counts, cheap even at 200k ticks/exit


def machine(route: str, cpl: int) -> Machine:
    return build_machine(get_route(route), cpl)


def with_code(m: Machine, code: bytes) -> Machine:
    """The same machine with its code region replaced (the guest builder's image otherwise)."""
    regions = tuple(Region(r.gpa, code, r.name) if r.name == "code" else r for r in m.image.regions)
    return dataclasses.replace(m, image=dataclasses.replace(m.image, regions=regions, code_size=len(code)))


def mailbox(session, offset: int) -> int:
    return struct.unpack("<Q", session.read_guest(layout.MAILBOX_GPA + offset, 8))[0]


# ---- the device ---------------------------------------------------------------------------


def test_missing_capability_is_host_error(kvm_device):
    """Kvm.require names the capability and what needed it."""
    with O.Kvm(kvm_device) as kvm:
        with pytest.raises(HostError) as info:
            kvm.require(100_000, "a test")
        assert "lacks capability 100000, needed for a test" in str(info.value)
        assert kvm.require(B.KVM_CAP_USER_MEMORY, "memory") >= 1


# ---- routes --------------------------------------------------------------------------------

UPSTREAM = [r.name for r in load_catalogue() if r.upstream]


@pytest.mark.parametrize("name", UPSTREAM)
def test_route_does_what_the_catalogue_says(kvm_device, guest_cpl, skip_unsupported, name):
    """Per access: the route's eventfd signals, user exits (with the exit's kind, address,
    width, direction and data), coalesced entries, the value a read returns, and the read-only
    slot left unchanged (KVM_MEM_READONLY: a guest write exits as KVM_EXIT_MMIO)."""
    route = get_route(name)
    skip_unsupported(route, guest_cpl)
    exp = route.expect
    with RealBackend(kvm_device).open(build_machine(route, guest_cpl)) as s:
        s.run_batch(1)
        res = s.run_batch(N)
        assert res.iterations == N and res.ticks and res.ticks > 0
        assert mailbox(s, layout.MAILBOX_BATCHES) == 2
        if route.ioeventfd is not None:
            assert res.eventfd_signals == {"doorbell": exp.eventfd * N}
        if exp.coalesced:
            assert res.coalesced_entries + res.user_exits == N
            assert res.coalesced_entries > 0
        else:
            assert res.user_exits == exp.user_exits * N
            assert res.coalesced_entries == 0
        if exp.exit is not None:
            for rec in res.exits:
                assert (rec.kind, rec.addr, rec.size, rec.is_write, rec.data) == (
                    exp.exit.kind, exp.exit.addr, exp.exit.size, exp.exit.is_write, exp.exit.data
                )
        assert res.events.get("kvm.user_exit.io", 0) + res.events.get("kvm.user_exit.mmio", 0) == res.user_exits
        if exp.read_value is not None:
            assert mailbox(s, layout.MAILBOX_LAST_READ) == exp.read_value
        if exp.ro_unchanged:
            assert s.read_guest(layout.RO_BASE, layout.RO_SIZE) == bytes([layout.RO_PATTERN]) * layout.RO_SIZE


def test_coalesced_ring_full_exits_to_userspace(kvm_device, guest_cpl):
    """coalesced_mmio_write() refuses an entry when the ring is full (KVM_COALESCED_MMIO_MAX - 1
    entries, one slot kept empty): that write exits as KVM_EXIT_MMIO; draining frees the ring."""
    cap = B.coalesced_max_entries(4096) - 1
    with RealBackend(kvm_device).open(machine("coalesced-mmio", guest_cpl)) as s:
        res = s.run_batch(cap + 10)
    assert res.user_exits == 1
    assert res.coalesced_entries == cap + 9
    assert res.exits[0].kind == "mmio" and res.exits[0].addr == layout.COALESCED_GPA
    assert res.events["kvm.coalesced.append"] == cap + 9


def test_ro_memslot_write_from_host_visible_to_guest(kvm_device, guest_cpl):
    """A KVM_MEM_READONLY slot is read-only for the guest only: a host write is what the guest
    reads next."""
    with RealBackend(kvm_device).open(machine("ro-read", guest_cpl)) as s:
        s.run_batch(1)
        assert mailbox(s, layout.MAILBOX_LAST_READ) == 0x5A5A5A5A
        s.write_guest(layout.RO_BASE, bytes.fromhex("11223344"))
        s.run_batch(1)
        assert mailbox(s, layout.MAILBOX_LAST_READ) == 0x44332211


def test_stats_deltas_show_the_exits(kvm_device, guest_cpl):
    """KVM_GET_STATS_FD: the vCPU's cumulative 'exits' counts at least one exit per userspace
    exit, and only non-zero deltas are reported."""
    with RealBackend(kvm_device).open(machine("pio-user", guest_cpl)) as s:
        s.run_batch(1)
        res = s.run_batch(N)
    assert res.kvm_stats, "no stats delta"
    assert res.kvm_stats["exits"] >= N
    assert all(v != 0 for v in res.kvm_stats.values())


def test_stats_descriptors(kvm_device):
    """The binary stats header and descriptors parse: VM id 'kvm-<pid>', vCPU 'kvm-<pid>/vcpu-0',
    the names kvm_vcpu_stats_desc declares, cumulative values that only grow."""
    with O.Kvm(kvm_device) as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vstats, cstats = vm.stats(), vcpu.stats()
        assert vstats is not None and cstats is not None
        assert vstats.id.startswith("kvm-") and cstats.id.endswith("/vcpu-0")
        assert {"exits", "io_exits", "mmio_exits", "insn_emulation", "pf_taken"} <= set(cstats.names)
        snap = cstats.snapshot()
        assert cstats.delta(snap) == {}


def test_ioeventfd_error_during_open_leaves_nothing_open(kvm_device, guest_cpl, open_fds):
    """A machine whose ioeventfds KVM refuses fails to open with IoEventFdError and releases
    everything it had created."""
    m = machine("pio-eventfd-len1", guest_cpl)
    bad = dataclasses.replace(
        m.spec, ioeventfds=m.spec.ioeventfds + (IoEventFdSpec("dup", True, layout.DOORBELL_PORT, 1),)
    )
    before = open_fds()
    with pytest.raises(IoEventFdError) as info:
        RealBackend(kvm_device).open(dataclasses.replace(m, spec=bad))
    assert info.value.errno_name == "EEXIST"
    assert open_fds() == before


def test_no_fd_left_after_open_run_close(kvm_device, guest_cpl, open_fds):
    """close() releases every fd and mapping (VM, vCPU, kvm_run mmap, stats fds, eventfds),
    and may be called twice."""
    before = open_fds()
    s = RealBackend(kvm_device).open(machine("mmio-eventfd-len0", guest_cpl))
    s.run_batch(N)
    assert len(open_fds()) > len(before)
    s.close()
    s.close()
    assert open_fds() == before


# ---- the watchdog and guest errors ------------------------------------------------------------


def test_watchdog_stops_a_guest_that_never_exits(kvm_device, guest_cpl, open_fds):
    """`jmp $` never reaches the done port: stopped within the bound (immediate_exit plus a
    signal that KVM_SET_SIGNAL_MASK lets through only inside KVM_RUN), reported as a
    GuestError with the instruction, the session refuses further batches and closes cleanly,
    the process goes on and no signal is left pending."""
    before = open_fds()
    bound = 0.5
    s = RealBackend(kvm_device, watchdog_s=bound).open(with_code(machine("empty", guest_cpl), b"\xeb\xfe"))
    t0 = time.monotonic()
    with pytest.raises(GuestError) as info:
        s.run_batch(1)
    took = time.monotonic() - t0
    assert bound <= took < bound + 2.0
    assert info.value.kind == "watchdog"
    assert info.value.rip == layout.CODE_GPA
    assert "jmp" in str(info.value) and "within 0.5 s" in str(info.value)
    with pytest.raises(GuestError, match="stopped earlier"):
        s.run_batch(1)
    s.close()
    assert open_fds() == before
    assert signal.SIGUSR2 not in signal.sigpending()
    assert signal.SIGUSR2 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    # and KVM still works in this process
    with RealBackend(kvm_device).open(machine("empty", guest_cpl)) as ok:
        assert ok.run_batch(10).iterations == 10


def test_watchdog_from_a_non_main_thread(kvm_device, guest_cpl):
    """The watchdog needs no signal handler, so a batch may run on any thread."""
    out: list[BaseException | None] = []

    def worker() -> None:
        try:
            with RealBackend(kvm_device, watchdog_s=0.3).open(
                with_code(machine("empty", guest_cpl), b"\xeb\xfe")
            ) as s:
                s.run_batch(1)
            out.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            out.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive()
    assert isinstance(out[0], GuestError) and out[0].kind == "watchdog"


def test_vmcall_in_emulated_mode_is_stopped_by_the_watchdog(kvm_device, open_fds):
    """Measured here: under PVM, VMCALL in code KVM emulates (CPL0) never returns from KVM_RUN;
    the watchdog signal stops it."""
    if detect_host(kvm_device).kvm_kind != "pvm":
        pytest.skip("PVM-specific behaviour (VMX/SVM handle VMCALL as a hypercall)")
    before = open_fds()
    with RealBackend(kvm_device, watchdog_s=0.5).open(with_code(machine("empty", 0), b"\x0f\x01\xc1")) as s:
        with pytest.raises(GuestError) as info:
            s.run_batch(1)
    assert info.value.kind == "watchdog" and "vmcall" in str(info.value)
    assert open_fds() == before


def test_exception_is_a_shutdown_guest_error(kvm_device, guest_cpl, open_fds):
    """UD2 with an empty IDT: the #UD cannot be delivered, KVM_EXIT_SHUTDOWN (triple fault; at
    native CPL3 under PVM any exception): GuestError naming the exit and the instruction."""
    before = open_fds()
    with RealBackend(kvm_device).open(with_code(machine("empty", guest_cpl), b"\x0f\x0b")) as s:
        with pytest.raises(GuestError) as info:
            s.run_batch(1)
        assert info.value.kind == "shutdown"
        assert "KVM_EXIT_SHUTDOWN" in str(info.value) and "ud2" in str(info.value)
        assert info.value.rip == layout.CODE_GPA
    assert open_fds() == before


# ---- the completion pitfall ------------------------------------------------------------------


def _stop_at_first_user_exit(s) -> None:
    """Run the vCPU by hand until its first I/O or MMIO exit that is not the done OUT."""
    s.write_guest(layout.MAILBOX_GPA + layout.MAILBOX_ITERATIONS, struct.pack("<Q", 1))
    v = s.vcpu
    for _ in range(100):
        assert v.kvm_run() == 0
        r = v.exit_reason
        if r == B.KVM_EXIT_MMIO or (r == B.KVM_EXIT_IO and v.run.io.port != layout.DONE_PORT):
            return
    raise AssertionError("no user exit")


STUB = layout.DATA_GPA  # out DONE_PORT, al ; jmp $
STUB_CODE = bytes([0xE6, layout.DONE_PORT, 0xEB, 0xFE])


def test_set_regs_after_mmio_read_exit_is_overwritten_without_completion(kvm_device, guest_cpl):
    """A pitfall measured here: after a KVM_EXIT_MMIO read, the emulator's completion
    (complete_emulated_mmio -> x86_emulate_insn writeback) runs at the next KVM_RUN and
    overwrites a RIP set with KVM_SET_REGS in between: the guest goes on where it was."""
    with RealBackend(kvm_device).open(machine("mmio-read-user", guest_cpl)) as s:
        s.write_guest(STUB, STUB_CODE)
        _stop_at_first_user_exit(s)
        regs = s.vcpu.get_regs()
        regs.rip = STUB
        B.set_regs(s.vcpu.fd, regs)  # the raw ioctl, no completion first
        assert s.vcpu.kvm_run() == 0
        assert not (STUB <= s.vcpu.get_regs().rip <= STUB + 2)


@pytest.mark.parametrize("route", ["mmio-read-user", "mmio-user", "pio-in-user", "pio-user"])
def test_set_regs_after_exit_completes_pending_io_first(kvm_device, guest_cpl, route):
    """Vcpu.set_regs runs KVM_RUN once with immediate_exit=1 when a completion is pending, so
    the new RIP holds: the next exit is the stub's OUT."""
    with RealBackend(kvm_device).open(machine(route, guest_cpl)) as s:
        s.write_guest(STUB, STUB_CODE)
        _stop_at_first_user_exit(s)
        s.vcpu.pending_completion = True  # what the run loop records after an I/O or MMIO exit
        regs = s.vcpu.get_regs()
        regs.rip = STUB
        s.vcpu.set_regs(regs)
        assert s.vcpu.kvm_run() == 0
        assert s.vcpu.exit_reason == B.KVM_EXIT_IO and s.vcpu.run.io.port == layout.DONE_PORT
        assert STUB <= s.vcpu.get_regs().rip <= STUB + 2


def test_run_loop_marks_completion_pending_after_batch(kvm_device, guest_cpl):
    """A batch ends on the done OUT, whose completion is pending until the next KVM_RUN."""
    with RealBackend(kvm_device).open(machine("empty", guest_cpl)) as s:
        s.run_batch(1)
        assert s.vcpu.pending_completion
        s.write_guest(STUB, STUB_CODE)
        regs = s.vcpu.get_regs()
        regs.rip = STUB
        s.vcpu.set_regs(regs)
        assert not s.vcpu.pending_completion
        s.run_batch(1)
        assert STUB <= s.vcpu.get_regs().rip <= STUB + 2
