"""The differential fuzzer's program generator, comparison and shrinker, without KVM
(fastmmio.fuzz.programs, fastmmio.fuzz.differential). The runs against /dev/kvm are in
tests/kvm/test_fuzz_differential.py."""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from iced_x86 import Decoder, Mnemonic, OpKind

from fastmmio import layout
from fastmmio.errors import IoEventFdError, UsageError
from fastmmio.fuzz.differential import Observation, compare, rflags_mask, run_sim, shrink
from fastmmio.fuzz.programs import (
    ACC,
    REGIONS,
    DiffProgram,
    MemRef,
    Op,
    collides,
    ioeventfd_sets,
    programs,
    sext32,
    valid_set,
)
from fastmmio.machine import IoEventFdSpec
from fastmmio.sim.kvm.eventfd import EventFd, IoEventFds
from fastmmio.sim.kvm.iobus import KvmIoBuses

def fast(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# what the simulator's KVM emulator executes (sim/kvm/emulator.py _execute), plus port I/O
# (handle_io) and the plain register loads of immediates
ALLOWED = {Mnemonic.MOV, Mnemonic.MOVZX, Mnemonic.MOVSX, Mnemonic.MOVSXD, Mnemonic.MOVNTI,
           Mnemonic.IN, Mnemonic.OUT, Mnemonic.JMP}


@fast(150)
@given(programs())
def test_generated_programs_are_valid_and_round_trip(program):
    """Every op is naturally aligned inside its region (so never crosses a page), the done port
    is never a target, the code encodes, ends with `out DONE_PORT, al; jmp $`, uses only forms
    the simulator's emulator executes, and the JSON form gives back the same program."""
    program.validate()
    for op in program.ops:
        if op.kind in ("store", "load"):
            lo, size = REGIONS[op.region]
            assert lo <= op.addr and op.addr + op.width <= lo + size and op.addr % op.width == 0
            assert op.addr // layout.PAGE_SIZE == (op.addr + op.width - 1) // layout.PAGE_SIZE
        if op.kind in ("in", "out"):
            assert op.addr != layout.DONE_PORT
    insns = list(Decoder(64, program.code(), ip=layout.CODE_GPA))
    assert {i.mnemonic for i in insns} <= ALLOWED
    out, jmp = insns[-2], insns[-1]
    assert out.mnemonic == Mnemonic.OUT and out.immediate8 == layout.DONE_PORT
    assert jmp.mnemonic == Mnemonic.JMP and jmp.near_branch_target == jmp.ip
    assert DiffProgram.from_json(program.to_json()) == program


@fast(300)
@given(ioeventfd_sets())
def test_generated_ioeventfd_sets_are_accepted(evs):
    """kvm_assign_ioeventfd() (the simulator's model of it) accepts every generated set."""
    model = IoEventFds(KvmIoBuses())
    for e in evs:
        model.assign_spec(e)
    assert len({e.name for e in evs}) == len(evs)


specs = st.builds(IoEventFdSpec, st.just("x"), st.booleans(), st.sampled_from((0x10, 0x11)),
                  st.sampled_from((0, 1, 2, 4, 8)), st.one_of(st.none(), st.sampled_from((0, 1))))


@fast(300)
@given(a=specs, b=specs)
def test_collides_is_the_kernels_collision_rule(a, b):
    """collides()/valid_set() agree with the KVM model's ioeventfd_check_collision (EEXIST)
    and its EINVAL for length 0 with DATAMATCH (virt/kvm/eventfd.c kvm_assign_ioeventfd)."""
    model = IoEventFds(KvmIoBuses())
    refused = []
    for s in (a, b):
        try:
            model.assign_spec(s)
        except IoEventFdError as exc:
            refused.append(s)
            if not (s.length == 0 and s.datamatch is not None):
                assert exc.errno_name == "EEXIST"
    assert [s for s in (a, b) if s not in valid_set([a, b])] == refused or a == b
    if a.length == 0 and a.datamatch is not None or b.length == 0 and b.datamatch is not None:
        return
    assert collides(a, b) == (b in refused)


# programs drawn for the tests that look across many (forms covered, forms kept away)
COVERAGE_PROGRAMS = 400


@functools.lru_cache(maxsize=None)
def _collect(n: int) -> tuple[DiffProgram, ...]:
    """``n`` programs drawn by the generator (derandomized: the same ones on every call; the
    tests that only read them share one draw)."""
    seen: list[DiffProgram] = []

    @fast(n)
    @given(programs())
    def grab(p):
        seen.append(p)

    grab()
    return tuple(seen)


def test_generator_covers_every_form():
    """Across a few hundred programs: every access kind, width, region, load/store form,
    addressing form, port form, every kind of ioeventfd (MMIO, read-only slot, PIO;
    lengths 0/1/2/4/8; wildcard and DATAMATCH) and both kinds of coalesced zone appear."""
    progs = _collect(COVERAGE_PROGRAMS)
    c: Counter = Counter()
    for p in progs:
        for op in p.ops:
            c[("kind", op.kind)] += 1
            if op.kind in ("store", "load"):
                c[(op.kind, op.form, op.width)] += 1
                c[("region", op.region)] += 1
                c[("mode", op.mem.mode)] += 1
                c[("addr32", op.mem.addr32)] += 1
                c[("segment", op.mem.segment)] += 1
                c[("high8", op.reg in ("AH", "CH", "DH", "BH"))] += 1
            if op.kind in ("in", "out"):
                c[(op.kind, op.form, op.width)] += 1
        for z in p.coalesced:
            c[("coalesced", z.pio)] += 1
        for e in p.ioeventfds:
            where = "pio" if e.pio else "mmio" if e.addr >= layout.MMIO_BASE else "ro"
            c[("ioeventfd", where, e.length, e.datamatch is None)] += 1
    want = [("kind", k) for k in ("set", "store", "load", "out", "in")]
    want += [("store", "mov", w) for w in (1, 2, 4, 8)] + [("store", "mov_imm", w) for w in (1, 2, 4, 8)]
    want += [("store", "movnti", w) for w in (4, 8)]
    want += [("load", "mov", w) for w in (1, 2, 4, 8)] + [("load", f, w) for f in ("movzx", "movsx")
                                                         for w in (1, 2)]
    want += [("load", "movsxd", 4), ("load", "movsxd", 2)]
    want += [("region", r) for r in REGIONS] + [("mode", m) for m in
                                                ("base", "base_disp", "sib", "rip", "abs", "moffs")]
    want += [("addr32", True), ("segment", "FS"), ("segment", "GS"), ("high8", True)]
    want += [(k, f, w) for k in ("in", "out") for f in ("dx", "imm8") for w in (1, 2, 4)]
    want += [("ioeventfd", "mmio", n, True) for n in (0, 1, 2, 4, 8)]
    want += [("ioeventfd", "mmio", n, False) for n in (1, 2, 4, 8)]
    want += [("ioeventfd", "pio", n, True) for n in (0, 1, 2, 4)] + [("ioeventfd", "pio", 2, False)]
    want += [("ioeventfd", "ro", 0, True), ("coalesced", True), ("coalesced", False)]
    missing = [w for w in want if not c[w]]
    assert not missing, missing


def _store_to(mem: MemRef, reg: str = "ECX", width: int = 4) -> DiffProgram:
    return DiffProgram(ops=(Op("store", width, reg, "mov", 0x5EED_1234 & ((1 << 8 * width) - 1),
                               "ram", layout.DATA_GPA + 0x18, mem),))


@pytest.mark.parametrize("mem", [
    MemRef("base", base="RSI"),
    MemRef("base", base="R13"),  # needs a disp8 of 0 (mod=01): no [r13] encoding
    MemRef("base", base="RSP"),  # needs a SIB byte
    MemRef("base_disp", base="RBP", disp=-0x80),
    MemRef("base_disp", base="R12", disp=0x7FFF_FFFF),
    MemRef("sib", base="RAX", index="R9", scale=8, disp=-3, index_value=-0x20),
    MemRef("sib", base="RDI", index="RBX", scale=2, disp=0x100, index_value=0x7F, addr32=True),
    MemRef("base_disp", base="RDX", disp=-0x8000_0000, addr32=True),
    MemRef("rip"), MemRef("abs"), MemRef("moffs"),
    MemRef("base", base="RSI", segment="FS"), MemRef("rip", segment="GS"),
], ids=lambda m: f"{m.mode}-{m.base or '-'}-{m.index or '-'}{'-a32' if m.addr32 else ''}{'-' + m.segment if m.segment else ''}")
def test_every_addressing_form_reaches_its_address(mem):
    """The address registers are set so that the effective address (SDM Vol. 1 3.7.5:
    base + index*scale + disp, modulo 2^32 with the address-size prefix; RIP-relative from the
    next instruction) is the op's address: on the simulator the store lands there."""
    reg = ACC[4] if mem.mode == "moffs" else "ECX"
    p = _store_to(mem, reg)
    obs = run_sim(p.machine())
    assert obs.outcome == "done", obs.message
    off = 0x18
    assert obs.memory["data"][off:off + 4] == (0x5EED_1234).to_bytes(4, "little")
    assert obs.memory["data"][:off] == bytes(off)


@pytest.mark.parametrize("op, why", [
    (Op("out", 1, "AL", "imm8", None, "", layout.DONE_PORT), "done port"),
    (Op("out", 8, "RAX", "dx", None, "", 0xE000), "port access width"),
    (Op("in", 1, "AL", "imm8", None, "", 0xE000), "8-bit immediate"),
    (Op("store", 4, "ECX", "mov", 1, "ram", layout.DATA_GPA + 2, MemRef("base", base="RSI")), "aligned"),
    (Op("store", 4, "ECX", "mov", 1, "ram", layout.DATA_GPA - 4, MemRef("base", base="RSI")), "outside"),
    (Op("store", 4, "ECX", "mov", 1, "mmio", layout.RO_BASE, MemRef("base", base="RSI")), "outside"),
    (Op("store", 4, "ESI", "mov", 1, "ram", layout.DATA_GPA, MemRef("base", base="RSI")), "overwrite"),
    (Op("load", 4, "ECX", "mov", None, "ram", layout.DATA_GPA, MemRef("moffs")), "accumulator"),
    (Op("load", 4, "ECX", "mov", None, "ram", layout.DATA_GPA,
        MemRef("sib", base="RSI", index="RSP")), "index"),
    (Op("load", 4, "ECX", "mov", None, "ram", layout.DATA_GPA,
        MemRef("sib", base="RSI", index="RSI")), "one register"),
    (Op("store", 8, "", "mov_imm", 0x1_0000_0000, "ram", layout.DATA_GPA, MemRef("base", base="RSI")),
     "imm32"),
    (Op("load", 1, "AH", "mov", None, "ram", layout.DATA_GPA, MemRef("base", base="R8")), "encode"),
])
def test_invalid_ops_are_refused(op, why):
    """validate() (used on every regression file) refuses what would leave the program's
    contract: a clear UsageError, never a traceback."""
    with pytest.raises(UsageError, match=why):
        DiffProgram(ops=(op,)).validate()


@pytest.mark.parametrize("doc", [{}, {"ops": [{"kind": "bogus"}]}, {"ops": [{"kind": "set"}]},
                                 {"ops": [], "gprs": {"rip": 1}}, {"ops": [{"nope": 1}]}])
def test_bad_program_json_is_a_usage_error(doc):
    with pytest.raises(UsageError):
        DiffProgram.from_json(doc)


def test_sext32():
    """MOV r/m64, imm32 sign-extends its immediate (SDM Vol. 2B, MOV)."""
    assert sext32(0x7FFF_FFFF) == 0x7FFF_FFFF
    assert sext32(0x8000_0000) == 0xFFFF_FFFF_8000_0000
    assert sext32(0x1_2345_6789) == 0x2345_6789


def _obs(**kw) -> Observation:
    base = dict(regs={"rax": 1, "rflags": 0x3002}, memory={"data": b"\0" * 4},
                exits=[("io", 0xE000, 1, True, 5, 1)], histogram={("io", 0xE000, 1, True, 5): 1},
                eventfds={"a": 1}, user_exits=1)
    base.update(kw)
    return Observation("x", **base)


def test_compare_masks_iopl_under_pvm_only():
    """RFLAGS.IOPL is excluded under PVM (the reason is in fastmmio.fuzz.differential) and
    compared elsewhere."""
    a, b = _obs(), _obs(regs={"rax": 1, "rflags": 0x0002})
    assert compare(a, b, "pvm") == []
    assert [d.where for d in compare(a, b, "vmx")] == ["regs.rflags"]
    assert rflags_mask("pvm") & 0x3000 == 0 and rflags_mask("svm") & 0x3000 == 0x3000


def test_compare_skips_order_when_a_side_kept_a_sample_only():
    """Exit order is compared only when both sides kept every exit; the exact histogram is
    compared always."""
    a = _obs(exits=[("io", 1, 1, True, 0, 1), ("io", 2, 1, True, 0, 1)])
    b = _obs(exits=[("io", 2, 1, True, 0, 1), ("io", 1, 1, True, 0, 1)])
    assert [d.where for d in compare(a, b, "vmx")] == ["exits"]
    b.exits_complete = False
    assert compare(a, b, "vmx") == []


def test_shrink_keeps_the_failure_and_drops_the_rest():
    """shrink() drops every step, ioeventfd, register and data seed the predicate does not
    need, and simplifies the addressing of the step it needs."""
    evs = (IoEventFdSpec("mmio-0", False, layout.MMIO_BASE, 4), IoEventFdSpec("pio-1", True, 0xE000, 1))
    needed = Op("load", 2, "R9W", "movsxd", None, "mmio", layout.MMIO_BASE + 4,
                MemRef("sib", base="RAX", index="RBX", scale=4, disp=8, index_value=3, segment="FS"))
    filler = [Op("set", 8, "RCX", "imm64", i) for i in range(9)]
    prog = DiffProgram(ops=tuple(filler[:4] + [needed] + filler[4:]), gprs={"rax": 1, "r9": 2},
                       ioeventfds=evs, data_seed=7)
    calls = []

    def fails(p: DiffProgram) -> bool:
        calls.append(p)
        return any(o.form == "movsxd" for o in p.ops)

    small = shrink(prog, fails, max_runs=200)
    assert len(small.ops) == 1 and small.ops[0].form == "movsxd"
    assert small.ops[0].mem == MemRef("base", base="RAX")
    assert small.gprs == {} and small.ioeventfds == () and small.data_seed == 0
    assert len(calls) <= 200
    capped = []
    shrink(prog, lambda p: capped.append(p) or True, max_runs=5)
    assert len(capped) == 5


def test_movsxd_r16_page_end_exclusion_is_needed_and_enforced():
    """movsxd_crosses_page(): unicorn (the simulator's CPU) really loads 4 bytes for
    `movsxd ax, [page_end - 2]` (it asks for the next page, which the processor would not
    touch: SDM Vol. 2B MOVSXD reads a word for a 16-bit operand), so the generator keeps that
    form away from offset 0xFFE, and validate() refuses it in regression files."""
    from iced_x86 import Code, Instruction, MemoryOperand, Register
    from unicorn import UC_ARCH_X86, UC_HOOK_TLB_FILL, UC_MODE_64, UC_PROT_ALL, UC_TLB_VIRTUAL, Uc, UcError

    from fastmmio.guest.asm import Asm

    asm = Asm()
    asm.emit(Instruction.create_reg_mem(Code.MOVSXD_R16_RM16, Register.AX,
                                        MemoryOperand(displ=0x1FFE, displ_size=4)))
    code = asm.encode(0)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    uc.mem_map(0, 0x3000)
    uc.mem_write(0, code)
    pages = []

    def fill(uc, vaddr, _type, entry, _user):
        pages.append(vaddr >> 12)
        if vaddr >> 12 == 2:
            return False
        entry.paddr, entry.perms = vaddr & ~0xFFF, UC_PROT_ALL
        return True

    uc.hook_add(UC_HOOK_TLB_FILL, fill)
    with pytest.raises(UcError):
        uc.emu_start(0, len(code))
    assert 2 in pages
    bad = Op("load", 2, "AX", "movsxd", None, "ro", layout.RO_BASE + 0xFFE, MemRef("base", base="RSI"))
    with pytest.raises(UsageError, match="movsxd r16"):
        DiffProgram(ops=(bad,)).validate()
    assert not any(op.form == "movsxd" and op.width == 2 and op.addr & 0xFFF == 0xFFE
                   for p in _collect(COVERAGE_PROGRAMS) for op in p.ops)


def test_excluded_only_where_the_fast_mmio_bus_decides(monkeypatch):
    """DiffRunner.excluded: with the simulator caching MMIO SPTEs and the host not, a load at a
    length-0 MMIO ioeventfd (handle_ept_misconfig skips it on KVM_FAST_MMIO_BUS) and a store
    there inside a coalesced MMIO zone (the fast bus has no coalesced zone; KVM_MMIO_BUS
    offers it to the zone first) are not comparable; nothing else is, and nothing at all when
    both sides have the same setting."""
    import fastmmio.fuzz.differential as D
    from fastmmio.machine import CoalescedZone
    from fastmmio.result import HostInfo

    info = HostInfo("cpu", None, "kernel", "pvm", True, 3, "test")
    ev = IoEventFdSpec("len0", False, layout.MMIO_BASE + 0x30, 0)
    zone = CoalescedZone(layout.MMIO_BASE + 0x20, 0x20)
    at = dict(region="mmio", addr=ev.addr, mem=MemRef("base", base="RSI"))
    load = DiffProgram(ops=(Op("load", 2, "AX", "mov", None, **at),), ioeventfds=(ev,))
    store = DiffProgram(ops=(Op("store", 2, "AX", "mov", None, **at),), ioeventfds=(ev,))
    store_in_zone = dataclasses.replace(store, coalesced=(zone,))
    beside = dataclasses.replace(load, ops=(Op("load", 2, "AX", "mov", None, "mmio", ev.addr + 2,
                                              MemRef("base", base="RSI")),))
    for host, sim, expect in (("N", "on", [True, False, True, False]),
                              ("Y", "on", [False] * 4), ("N", "host", [False] * 4),
                              ("N", "off", [False] * 4)):
        monkeypatch.setattr(D, "host_mmio_caching", lambda host=host: host == "Y")
        r = D.DiffRunner(info=info, mmio_caching=sim)
        got = [r.excluded(p) is not None for p in (load, store, store_in_zone, beside)]
        assert got == expect, (host, sim)
    with pytest.raises(UsageError):
        D.DiffRunner(info=info, mmio_caching="maybe")


def test_host_mmio_caching_reads_the_module_parameter(tmp_path):
    """kvm.mmio_caching from /sys/module/kvm/parameters (Y/N); the kernel's default (on) when
    the file is missing."""
    from fastmmio.fuzz.differential import host_mmio_caching

    f = tmp_path / "mmio_caching"
    f.write_text("N\n")
    assert host_mmio_caching(f) is False
    f.write_text("Y\n")
    assert host_mmio_caching(f) is True
    assert host_mmio_caching(tmp_path / "missing") is True
