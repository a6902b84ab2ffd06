"""Hostile guests as data (no KVM needed): the raw image builder, the generators, the
page-table surgery, IDT gates, and the runner's outcome classification, leak comparison and
hang guard."""

from __future__ import annotations

import dataclasses
import math
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
from iced_x86 import Decoder

from fastmmio import layout
from fastmmio.errors import GuestError, HostError, UsageError
from fastmmio.fuzz import hostile as H
from fastmmio.fuzz import runner
from fastmmio.fuzz.program import DEFINED_OUTCOMES, DONE, Program, plain_spec, random_spec
from fastmmio.guest.build import build_image
from fastmmio.guest.paging import PTE_P, build_page_tables, walk
from fastmmio.guest.program import Access, AccessKind, doorbell_loop
from fastmmio.guest.raw import build_raw_image
from fastmmio.real.backend import RealBackend
from fastmmio.real.runloop import Watchdog
from fastmmio.deadline import DeadlineTimer

# ---- guest/raw.py ------------------------------------------------------------------------------


def test_raw_image_of_the_doorbell_loop_is_the_doorbell_image():
    """build_raw_image with the doorbell loop's bytes reproduces build_image: same regions,
    same boot state (the raw builder reuses the page tables, GDT, TSS and boot state)."""
    access = Access(AccessKind.WRITE, 1, layout.DOORBELL_GPA, 0)
    for cpl in (0, 3):
        ref = build_image(access, cpl)
        code = doorbell_loop(access).encode(layout.CODE_GPA)
        raw = build_raw_image(code, cpl, program=ref.program)
        assert raw.regions == ref.regions
        assert raw.boot == ref.boot
        assert (raw.code_gpa, raw.code_size) == (ref.code_gpa, ref.code_size)


def test_raw_image_options():
    idt = bytes(32)
    img = build_raw_image(b"\x90", 3, cr3=0x8_0000, idt=idt, gprs={"rax": -1, "r15": 5}, rip=0x1_0001,
                          rsp=0x1234, rflags=0x2)
    b = img.boot
    assert (b.cr3, b.idt_limit, b.rip, b.rsp, b.rflags) == (0x8_0000, 31, 0x1_0001, 0x1234, 0x2)
    assert b.gprs == {"rax": 0xFFFF_FFFF_FFFF_FFFF, "r15": 5}
    assert any(r.name == "idt" and r.gpa == layout.IDT_GPA for r in img.regions)


@pytest.mark.parametrize("kwargs,match", [
    ({"code": b"\x90", "cpl": 2}, "CPL must be 0 or 3"),
    ({"code": b"", "cpl": 3}, "at least one code byte"),
    ({"code": b"\x90" * 0x10000, "cpl": 3}, "does not fit"),
    ({"code": b"\x90", "cpl": 3, "gprs": {"rip": 1}}, "unknown general register"),
    ({"code": b"\x90", "cpl": 3, "idt_limit": 0x10000}, "does not fit 16 bits"),
])
def test_raw_image_bad_arguments(kwargs, match):
    with pytest.raises(UsageError, match=match):
        build_raw_image(**kwargs)


# ---- generators ---------------------------------------------------------------------------------


def test_generate_is_deterministic_and_independent_of_order():
    """Program (seed, index) is the same whatever was generated before: a finding can be
    reproduced alone with --only."""
    a = [H.generate(11, i, cpls=(3, 0)) for i in range(40)]
    b = [H.generate(11, i, cpls=(3, 0)) for i in reversed(range(40))][::-1]
    for p, q in zip(a, b):
        assert (p.name, p.cpl, p.code, p.spec, p.allowed) == (q.name, q.cpl, q.code, q.spec, q.allowed)
    assert len({p.code for p in a}) > 30
    assert H.generate(12, 0).origin == "12:0"


def test_every_kind_builds_valid_machines_at_both_cpls():
    """Each kind's programs build an image whose regions lie in RAM, fit their areas, and whose
    ioeventfds obey kvm_assign_ioeventfd()'s rules (length 0/1/2/4/8, no DATAMATCH with 0,
    datamatch fitting the length)."""
    for kind in H.KINDS:
        for cpl in (0, 3):
            for i in range(25):
                p = H.generate(5, i, kinds=(kind,), cpls=(cpl,))
                assert p.kind == kind and p.cpl == cpl and p.allowed <= DEFINED_OUTCOMES and p.allowed
                m = p.machine()
                assert m.image.boot.cpl == cpl
                for r in m.image.regions:
                    assert 0 < r.gpa and r.gpa + len(r.data) <= layout.RAM_SIZE, (p.name, r.name)
                for ev in m.spec.ioeventfds:
                    assert ev.length in (0, 1, 2, 4, 8)
                    assert ev.datamatch is None or (ev.length and ev.datamatch < 1 << (8 * ev.length))


def test_loops_only_allow_the_watchdog_and_io_only_defined_endings():
    for i in range(60):
        p = H.generate(9, i, kinds=("loop",), cpls=(3, 0))
        assert p.allowed == frozenset({"watchdog"})
        q = H.generate(9, i, kinds=("io",), cpls=(3, 0))
        assert DONE in q.allowed and "watchdog" not in q.allowed


def test_generate_refuses_bad_kinds_and_cpls():
    with pytest.raises(UsageError, match="unknown hostile kind"):
        H.generate(1, 0, kinds=("nope",))
    with pytest.raises(UsageError, match="CPL must be 0 or 3"):
        H.generate(1, 0, cpls=(1,))


def test_invalid_opcodes_decode_as_invalid_or_privileged():
    """Each entry of the invalid-opcode table is what it claims: iced-x86 decodes it as
    invalid in 64-bit mode, except the encodings defined to raise #UD (UD0/UD1/UD2, SDM Vol.
    2B) and those that #UD only by CPU or control-register state (VIA's XSTORE on Intel,
    AVX-512 and AVX with CR4.OSXSAVE=0, XSETBV likewise); every privileged entry decodes as
    a valid instruction (its #GP at CPL3 is SDM Vol. 3A 5.9)."""
    defined_ud_or_state = {"ud2", "ud1", "ud0", "xstore-via-only", "evex-no-avx512",
                           "xsetbv-no-osxsave", "ymm-no-osxsave"}
    for name, code in H.INVALID_OPCODES:
        ins = next(iter(Decoder(64, code + b"\x90" * 16)))
        assert ins.is_invalid == (name not in defined_ud_or_state), name
    for name, code in H.PRIVILEGED:
        ins = next(iter(Decoder(64, code + b"\x90" * 16)))
        assert not ins.is_invalid and ins.len == len(code), name


def test_string_spans_stay_in_their_area():
    import random

    rng = random.Random(3)
    for _ in range(2000):
        count, width, down = rng.choice((0, 1, 64, 255)), rng.choice((1, 2, 4, 8)), rng.random() < 0.5
        start = H._string_span(rng, count, width, down, H.SCRATCH_GPA, H.SCRATCH_SIZE)
        lo, hi = (start - count * width + width, start + width) if down else (start, start + count * width)
        assert H.SCRATCH_GPA <= lo and hi <= H.SCRATCH_GPA + H.SCRATCH_SIZE
    with pytest.raises(UsageError):
        H._string_span(rng, 1 << 20, 8, False, H.SCRATCH_GPA, H.SCRATCH_SIZE)


def test_random_spec_registrations_never_collide():
    """At most one ioeventfd per (bus, address): ioeventfd_check_collision() never fires."""
    import random

    for i in range(300):
        spec = random_spec(random.Random(i))
        keys = [(e.pio, e.addr) for e in spec.ioeventfds]
        assert len(keys) == len(set(keys))


# ---- page-table surgery and IDT gates -----------------------------------------------------------


def _reader(tables):
    def read_qword(gpa):
        off = gpa - tables.base
        return struct.unpack_from("<Q", tables.data, off)[0] if 0 <= off < len(tables.data) else 0
    return read_qword


def test_entry_offsets_follow_the_4_level_walk():
    """The four offsets are the PML4E, PDPTE, PDE and PTE that paging.walk (SDM 4.5) reads."""
    t = build_page_tables(user=True)
    for linear in (layout.CODE_GPA, layout.MMIO_BASE + 0x1000, layout.RO_BASE, layout.STACK_TOP - 8):
        offs = H.entry_offsets(t, linear)
        assert len(offs) == 4
        res = walk(_reader(t), t.cr3, linear)
        assert res is not None
        assert tuple(struct.unpack_from("<Q", t.data, o)[0] for o in offs) == res.entries


def test_map_page_changes_one_translation():
    t = build_page_tables(user=True)
    t2 = H.map_page(t, H.BELOW_HOLE, H.REMAP_RAM_GPA, H._pte_flags(3))
    assert walk(_reader(t), t.cr3, H.BELOW_HOLE) is None  # not mapped by the default tables
    r = walk(_reader(t2), t2.cr3, H.BELOW_HOLE + 0x123)
    assert r is not None and r.phys == H.REMAP_RAM_GPA + 0x123 and r.user and r.writable
    diff = [i for i in range(0, len(t.data), 8) if t.data[i:i + 8] != t2.data[i:i + 8]]
    assert len(diff) == 1
    with pytest.raises(UsageError, match="no page table covers"):
        H.map_page(t, 0x7000_0000_0000, 0, PTE_P)


def test_with_entry_makes_the_walk_fail():
    t = build_page_tables(user=True)
    offs = H.entry_offsets(t, layout.CODE_GPA)
    broken = H.with_entry(t, offs[1], 0)
    assert walk(_reader(broken), broken.cr3, layout.CODE_GPA) is None


def test_idt_gate_layout():
    """SDM Vol. 3A Figure 6-8 (64-bit IDT gate): offset 15:0 | selector | IST | type | DPL | P |
    offset 31:16, then offset 63:32."""
    lo, hi = struct.unpack("<QQ", H.idt_gate(0x1234_5678_9ABC_DEF0, selector=0x08, dpl=3, ist=2))
    assert lo & 0xFFFF == 0xDEF0 and (lo >> 48) & 0xFFFF == 0x9ABC and hi == 0x1234_5678
    assert (lo >> 16) & 0xFFFF == 0x08 and (lo >> 32) & 7 == 2
    assert (lo >> 40) & 0xF == 0xE and (lo >> 45) & 3 == 3 and (lo >> 47) & 1 == 1


# ---- runner -------------------------------------------------------------------------------------


def _err(kind: str) -> GuestError:
    e = GuestError(f"{kind} happened")
    e.kind = kind  # type: ignore[attr-defined]
    return e


class _FakeBackend:
    """Stands in for RealBackend in run_program: raises what it is told to on run_batch."""

    raise_: BaseException | None = None

    def __init__(self, device, watchdog_s):
        pass

    def open(self, machine):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run_batch(self, n):
        if _FakeBackend.raise_ is not None:
            raise _FakeBackend.raise_

        class R:
            user_exits = 3
        return R()


@pytest.mark.parametrize("raised,outcome,detail", [
    (None, "done", ""),
    (_err("shutdown"), "shutdown", "shutdown"),
    (_err("watchdog"), "watchdog", "watchdog"),
    (_err("internal-error"), "kvm-error", "internal-error"),
    (_err("hlt"), "kvm-error", "hlt"),
    (HostError("KVM_SET_SREGS refused"), "refused", "HostError"),
    (KeyError(9), "crash", "KeyError"),
    (struct.error("bad"), "crash", "error"),
])
def test_run_program_classifies_every_ending(monkeypatch, raised, outcome, detail):
    monkeypatch.setattr(runner, "RealBackend", _FakeBackend)
    monkeypatch.setattr(_FakeBackend, "raise_", raised)
    p = Program("t", "t", 3, b"\x90", plain_spec())
    out = runner.run_program(p)
    assert (out.outcome, out.detail) == (outcome, detail)
    if outcome == "crash":
        assert "Traceback" in out.message


def test_campaign_reports_crashes_and_unexpected_outcomes(monkeypatch):
    outs = iter([runner.Outcome("done", "", "", 0.0), runner.Outcome("crash", "KeyError", "Traceback ...\nKeyError: 9", 0.0),
                 runner.Outcome("watchdog", "watchdog", "w", 0.0)])
    monkeypatch.setattr(runner, "run_program", lambda p, d, w: next(outs))
    progs = [Program("a", "k", 3, b"\x90", plain_spec(), allowed=frozenset({"done"}), origin=f"0:{i}") for i in range(3)]
    s = runner.campaign(iter(progs), runs=10, hang_guard=False)
    assert s.runs == 3 and s.crashes == 1 and s.unexpected == 1 and not s.ok
    assert s.outcomes == {"done": 1, "crash:KeyError": 1, "watchdog": 1}
    text = "\n".join(s.lines())
    assert "crash: a at CPL3 (0:1): KeyError: 9" in text and "unexpected: a at CPL3 (0:2)" in text


def test_leak_comparison():
    base = runner.ResourceSnapshot(10, {"eventfd": 0}, 200, 0, 2, 300_000, 30_000)
    same = dataclasses.replace(base, maps=210, vm_size_kb=310_000)
    assert runner.compare(base, same) == []
    leaky = runner.ResourceSnapshot(13, {"kvm-vm": 1, "kvm-vcpu": 1, "eventfd": 1}, 200 + 65, 1, 3, 300_000 + 300 * 1024, 30_000)
    found = " ".join(runner.compare(base, leaky))
    for needle in ("open fds 10 -> 13", "kvm-vm fds 0 -> 1", "kvm-vcpu fds 0 -> 1", "eventfd fds 0 -> 1",
                   "KVM mappings 0 -> 1", "memory mappings", "threads 2 -> 3", "address space"):
        assert needle in found


def test_leak_bounds_grow_with_runs_but_catch_a_per_run_leak():
    """Allocator steps (a 64 MiB malloc arena, a few mappings) over tens of thousands of runs
    are not leaks; a run's memslots (2 mappings, 2 MiB) left behind every run are, within a
    few hundred runs."""
    base = runner.ResourceSnapshot(10, {}, 200, 0, 2, 300_000, 30_000)
    arena = dataclasses.replace(base, maps=208, vm_size_kb=300_000 + 83 * 1024)
    assert runner.compare(base, arena, runs=31_000) == []
    leaked = dataclasses.replace(base, maps=200 + 2 * 300, vm_size_kb=300_000 + 2 * 1024 * 300)
    found = " ".join(runner.compare(base, leaked, runs=300))
    assert "memory mappings" in found and "address space" in found


def test_resource_snapshot_sees_an_eventfd():
    import os

    before = runner.ResourceSnapshot.take()
    fd = os.eventfd(0)
    try:
        after = runner.ResourceSnapshot.take()
    finally:
        os.close(fd)
    assert after.fd_kinds.get("eventfd", 0) == before.fd_kinds.get("eventfd", 0) + 1
    assert "eventfd fds" in " ".join(runner.compare(before, after))


def test_hang_guard_ends_a_stuck_process():
    """A run that outlives its bound: the guard names the program, dumps the stacks and exits
    with status 3 instead of hanging."""
    code = (
        "import time\n"
        "from fastmmio.fuzz.runner import HangGuard\n"
        "g = HangGuard()\n"
        "g.arm(0.3, 'program X at CPL3 (1:2)')\n"
        "time.sleep(30)\n"
    )
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == runner.HANG_EXIT_STATUS
    assert "HANG: program X at CPL3 (1:2) did not end" in proc.stderr
    assert "time.sleep" in proc.stderr or "line 5" in proc.stderr
    assert time.monotonic() - t0 < 20


def _run_guard_script(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: a guard that fires ends that process (``os._exit``),
    never pytest itself."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_hang_guard_disarmed_stays_quiet():
    """Disarmed before its bound, the guard neither prints nor ends the process."""
    proc = _run_guard_script(
        "import time\n"
        "from fastmmio.fuzz.runner import HangGuard\n"
        "g = HangGuard()\n"
        "g.arm(0.2, 'x')\n"
        "g.disarm()\n"
        "time.sleep(0.6)\n"
        "g.close()\n"
        "print('survived')\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "survived\n" and "HANG" not in proc.stderr


def test_hang_guard_takes_a_huge_bound():
    """HangGuard().arm(1e12, ...) neither raises (faulthandler and a lock timeout both overflow
    a time_t there) nor kills its timer thread: a later short arming still ends the process."""
    proc = _run_guard_script(
        "import time\n"
        "from fastmmio.fuzz.runner import HangGuard\n"
        "g = HangGuard()\n"
        "g.arm(1e12, 'huge')\n"
        "time.sleep(0.3)\n"
        "g.disarm()\n"
        "g.arm(0.2, 'program Y')\n"
        "time.sleep(30)\n"
    )
    assert proc.returncode == runner.HANG_EXIT_STATUS, proc.stderr
    assert "HANG: program Y did not end" in proc.stderr and "huge" not in proc.stderr


@pytest.mark.parametrize("bound", [1e12, math.inf])
def test_deadline_timer_survives_a_huge_bound(bound):
    """The one deadline thread (run-loop watchdog and hang guard): a bound past a lock
    timeout's range is waited in steps, so the thread lives and a later arming fires."""
    t = DeadlineTimer()
    fired = threading.Event()
    try:
        t.arm(bound, fired.set)
        time.sleep(0.2)
        assert t._thread is not None and t._thread.is_alive()
        assert not t.disarm() and not fired.is_set()
        t.arm(0.05, fired.set)
        assert fired.wait(5) and t.disarm()
    finally:
        t.close()


# ---- the real backend's watchdog bound ----------------------------------------------------------


@pytest.mark.parametrize("bound", [0, -1, math.nan, math.inf])
def test_real_backend_refuses_a_bad_watchdog_bound(bound):
    with pytest.raises(UsageError, match="watchdog bound"):
        RealBackend(watchdog_s=bound)


def test_watchdog_survives_a_huge_bound():
    """Arming with a bound beyond what a lock timeout can hold must not kill the timer thread
    (it waits in steps): a later, short arming still fires and delivers its signal."""
    wd = Watchdog(signal.SIGUSR2)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
    fired = threading.Event()
    try:
        wd.arm(1e15, threading.get_ident(), lambda: None)
        time.sleep(0.2)
        assert wd._thread is not None and wd._thread.is_alive()
        assert not wd.disarm()
        wd.arm(0.05, threading.get_ident(), fired.set)
        assert signal.sigtimedwait([signal.SIGUSR2], 5) is not None
        assert fired.is_set() and wd.disarm()
    finally:
        wd.close()
        while signal.sigtimedwait([signal.SIGUSR2], 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
