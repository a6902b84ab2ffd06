"""The run loop's two per-exit paths on /dev/kvm: the compiled one (fastmmio.real._exitpath)
gives the same BatchResults as the pure-Python reference (user exits and their sample, the exit
histogram, coalesced entries, eventfd counts, registers, guest memory), keeps the watchdog
(immediate_exit plus a signal that KVM_RUN answers with EINTR) and lets other signals' Python
handlers run; and the pure-Python loop is used when the extension is absent."""

from __future__ import annotations

import dataclasses
import signal
import threading
import time

import pytest
from iced_x86 import Code, Instruction, Register

from fastmmio import layout
from fastmmio.errors import GuestError, UsageError
from fastmmio.guest.asm import Asm
from fastmmio.guest.raw import build_raw_image
from fastmmio.machine import Machine
from fastmmio.real import exitpath
from fastmmio.real.backend import RealBackend
from fastmmio.routes import build_machine, get_route, load_catalogue

needs_compiled = pytest.mark.skipif(
    not exitpath.available(), reason="the compiled run loop (fastmmio.real._exitpath) is not built"
)

UPSTREAM = [r.name for r in load_catalogue() if r.upstream]
TSC_REGS = {"rax", "rdx", "r14"}  # the timed loop's RDTSC results (guest/program.py): differ run to run
BUF = layout.DATA_GPA  # guest RAM for string I/O
STRING_PORT = 0x3F8  # no ioeventfd, no coalesced zone: every access exits to userspace


def raw(route: str, cpl: int, code: bytes) -> Machine:
    """The route's machine (memslots, ioeventfds, coalesced zones) running ``code``."""
    m = build_machine(get_route(route), cpl)
    return dataclasses.replace(m, image=build_raw_image(code, cpl))


def done(asm: Asm) -> bytes:
    asm.emit(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, 0))
    asm.emit(Instruction.create_u32_reg(Code.OUT_IMM8_AL, layout.DONE_PORT, Register.AL))
    asm.emit(Instruction.create_branch(Code.JMP_REL8_64, layout.CODE_GPA))  # never reached
    return asm.encode(layout.CODE_GPA)


def string_io_code() -> bytes:
    """REP OUTSB of 5 bytes, REP INSW of 3 words and REP INSD of 2 dwords on one port, then
    the done OUT: string I/O, where one KVM_EXIT_IO carries ``count`` elements."""
    a = Asm()
    a.emit(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EDX, STRING_PORT))
    a.emit(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.ESI, BUF))
    a.emit(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.ECX, 5))
    a.emit(Instruction.create_rep_outsb(64))
    a.emit(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EDI, BUF + 0x100))
    a.emit(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.ECX, 3))
    a.emit(Instruction.create_rep_insw(64))
    a.emit(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.ECX, 2))
    a.emit(Instruction.create_rep_insd(64))
    return done(a)


def many_keys_code(n: int) -> bytes:
    """``n`` 16-bit OUTs of 0, 1, ..., n-1 to the doorbell port: n histogram keys (more than
    the compiled path's table holds, so it hands its table to Python mid-batch)."""
    a = Asm()
    top = a.label()
    a.emit(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, 0))
    a.emit(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EDX, layout.DOORBELL_PORT))
    a.bind(top)
    a.emit(Instruction.create_reg_reg(Code.OUT_DX_AX, Register.DX, Register.AX))
    a.emit(Instruction.create_reg(Code.INC_RM32, Register.EAX))
    a.emit(Instruction.create_reg_u32(Code.CMP_EAX_IMM32, Register.EAX, n))
    a.branch(Code.JNE_REL8_64, top)
    return done(a)


def observe(session, result, with_tsc_regs: bool) -> dict:
    """Everything a batch leaves that does not depend on timing."""
    regs = session.regs()
    if not with_tsc_regs:
        regs = {k: v for k, v in regs.items() if k not in TSC_REGS}
    stats = {k: v for k, v in result.kvm_stats.items() if k in ("io_exits", "mmio_exits")}
    return {
        "iterations": result.iterations,
        "user_exits": result.user_exits,
        "eventfd_signals": result.eventfd_signals,
        "exits": result.exits,
        "coalesced_entries": result.coalesced_entries,
        "events": result.events,
        "histogram": dict(session.loop.exit_histogram),
        "coalesced_sample": list(session.loop.coalesced_sample),
        "regs": regs,
        "stats": stats,
        "mailbox": session.read_guest(layout.MAILBOX_GPA + layout.MAILBOX_BATCHES, 16),
        "buffer": session.read_guest(BUF, 0x200),
    }


def run_both(device: str, machine: Machine, batches: list[int], exit_sample: int = 64,
             with_tsc_regs: bool = False) -> tuple[list[dict], list[dict]]:
    out = {}
    for engine in ("python", "c"):
        with RealBackend(device, exit_sample=exit_sample, engine=engine).open(machine) as s:
            assert s.loop.engine == engine
            s.write_guest(BUF, bytes(range(256)) * 2)
            out[engine] = [observe(s, s.run_batch(n), with_tsc_regs) for n in batches]
    return out["python"], out["c"]


@needs_compiled
@pytest.mark.parametrize("name", UPSTREAM)
def test_compiled_path_equals_python_on_every_route(kvm_device, guest_cpl, skip_unsupported, name):
    """Two batches of every upstream route this host runs (PIO and MMIO exits to userspace,
    reads answered with the device value, ioeventfds, coalesced MMIO and PIO): identical
    results; with an exit sample of 8 so the cap is reached."""
    skip_unsupported(get_route(name), guest_cpl)
    py, c = run_both(kvm_device, build_machine(get_route(name), guest_cpl), [16, 40], exit_sample=8)
    assert py == c
    if get_route(name).expect.user_exits:
        assert len(c[1]["exits"]) == 8 and c[1]["user_exits"] == 40


@needs_compiled
def test_compiled_path_equals_python_on_string_io(kvm_device, guest_cpl):
    """REP OUTSB / REP INSW / REP INSD: the exits' counts, the data of the first element of an
    OUT, and the device value written into every element of an IN (in guest memory)."""
    py, c = run_both(kvm_device, raw("pio-user", guest_cpl, string_io_code()), [0], with_tsc_regs=True)
    assert py == c
    hist = c[0]["histogram"]
    assert sum(n for (kind, *_), n in hist.items() if kind == "io") == 5 + 3 + 2
    value = (layout.DEVICE_READ_VALUE).to_bytes(8, "little")
    buf = c[0]["buffer"]
    assert buf[0x100:0x106] == value[:2] * 3 and buf[0x106:0x10E] == value[:4] * 2


@needs_compiled
def test_compiled_path_hands_a_full_histogram_to_python(kvm_device, guest_cpl):
    """More distinct (port, width, direction, data) keys than the C table holds: the counts
    still add up to the Python loop's, key by key."""
    n = exitpath.compiled.HIST_CAP + 44
    py, c = run_both(kvm_device, raw("pio-user", guest_cpl, many_keys_code(n)), [0], with_tsc_regs=True)
    assert py == c
    assert len(c[0]["histogram"]) == n and c[0]["user_exits"] == n


@pytest.mark.parametrize("engine", ["python", pytest.param("c", marks=needs_compiled)])
def test_watchdog_stops_either_path(kvm_device, guest_cpl, engine):
    """`jmp $`: the watchdog sets immediate_exit and signals the vCPU thread, KVM_RUN returns
    EINTR, the batch stops with a watchdog GuestError within the bound, no signal left."""
    m = raw("empty", guest_cpl, b"\xeb\xfe")
    with RealBackend(kvm_device, watchdog_s=0.4, engine=engine).open(m) as s:
        t0 = time.monotonic()
        with pytest.raises(GuestError) as info:
            s.run_batch(1)
        assert 0.4 <= time.monotonic() - t0 < 2.5
        assert info.value.kind == "watchdog" and info.value.rip == layout.CODE_GPA
    assert signal.SIGUSR2 not in signal.sigpending()


@pytest.mark.parametrize("engine", ["python", pytest.param("c", marks=needs_compiled)])
def test_other_signals_run_their_handler_and_the_batch_goes_on(kvm_device, guest_cpl, engine):
    """A signal with a Python handler arriving during KVM_RUN (EINTR, watchdog not fired): the
    handler runs and the batch completes with every exit counted."""
    hits = []
    old = signal.signal(signal.SIGUSR1, lambda *_: hits.append(1))
    stop = threading.Event()
    main = threading.get_ident()

    def poke() -> None:
        while not stop.wait(0.01):
            signal.pthread_kill(main, signal.SIGUSR1)

    try:
        with RealBackend(kvm_device, engine=engine).open(build_machine(get_route("pio-user"), guest_cpl)) as s:
            t = threading.Thread(target=poke)
            t.start()
            try:
                deadline = time.monotonic() + 10
                while not hits and time.monotonic() < deadline:
                    res = s.run_batch(500)
                    assert res.user_exits == 500 and sum(s.loop.exit_histogram.values()) == 500
            finally:
                stop.set()
                t.join()
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert hits


@pytest.mark.parametrize("engine", ["python", pytest.param("c", marks=needs_compiled)])
def test_guest_errors_are_the_same_on_either_path(kvm_device, guest_cpl, engine):
    """UD2 with no IDT: KVM_EXIT_SHUTDOWN, reported with the instruction; the session stops."""
    with RealBackend(kvm_device, engine=engine).open(raw("empty", guest_cpl, b"\x0f\x0b")) as s:
        with pytest.raises(GuestError) as info:
            s.run_batch(1)
        assert info.value.kind == "shutdown" and "ud2" in str(info.value)
        assert s.stopped


def test_python_loop_when_the_extension_is_absent(kvm_device, guest_cpl, monkeypatch):
    """Without the compiled module, ``auto`` runs the pure-Python loop (and batches work);
    ``c`` is refused with one line saying why."""
    monkeypatch.setattr(exitpath, "compiled", None)
    monkeypatch.delenv(exitpath.ENV, raising=False)
    with RealBackend(kvm_device).open(build_machine(get_route("pio-user"), guest_cpl)) as s:
        assert s.loop.engine == "python" and s.loop._engine is None
        assert s.run_batch(8).user_exits == 8
    with pytest.raises(UsageError, match="not built"):
        RealBackend(kvm_device, engine="c")

