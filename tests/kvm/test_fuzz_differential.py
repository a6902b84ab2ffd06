"""Differential fuzzing on this host: random programs (fastmmio.fuzz.programs) run on the
simulator (upstream variant) and on /dev/kvm must agree on every compared field
(fastmmio.fuzz.differential.compare: registers, data area, read-only slot, mailbox, the rest of
RAM, every userspace exit in order and as a histogram, every ioeventfd count, the coalesced-ring
entry count).

* ``test_backends_agree_on_random_programs``: a bounded hypothesis run (derandomized, so CI
  sees the same programs every time; ``FASTMMIO_FUZZ_DIFF_EXAMPLES`` changes the count), the
  simulator configured like the host; ``..._caching_mmio_sptes`` half as many with the
  simulator's kvm.mmio_caching on (VMX's MMIO SPTE / EPT misconfiguration / fast MMIO paths,
  which this PVM host does not have). A disagreement is shrunk by
  :func:`fastmmio.fuzz.differential.shrink` (at most :data:`SHRINK_RUNS` reruns: hypothesis's
  own shrinker, at two VMs per call, ran into its 5-minute limit on a planted failure) and
  the small program is written to ``tests/kvm/regressions/new-failure.json``, where the
  replay test below picks it up. Rename it after the cause and fill its ``cause`` field once
  explained or fixed.
* ``test_regression``: every ``tests/kvm/regressions/*.json`` (program plus machine, as data)
  is replayed in both configurations and must agree.
* The comparison itself is checked to see what it claims to see (a planted difference in
  each field is reported), so an agreement is not an artefact of comparing nothing.

``python -m fastmmio.fuzz diff --examples N --seconds S`` (``make fuzz-diff``) runs many more.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings

from fastmmio import layout
from fastmmio.fuzz.differential import (
    DiffRunner,
    compare,
    load_regression,
    rflags_mask,
    save_regression,
    shrink,
)
from fastmmio.fuzz.programs import DiffProgram, MemRef, Op, programs
from fastmmio.machine import CoalescedZone, IoEventFdSpec

REGRESSIONS = Path(__file__).parent / "regressions"
NEW_FAILURE = Path(os.environ.get("FASTMMIO_FUZZ_DIFF_SAVE", REGRESSIONS / "new-failure.json"))
EXAMPLES = int(os.environ.get("FASTMMIO_FUZZ_DIFF_EXAMPLES", "80"))


@functools.lru_cache(maxsize=None)
def runner(device: str, mmio_caching: str = "host") -> DiffRunner:
    return DiffRunner(device, mmio_caching=mmio_caching)


SHRINK_RUNS = 150


_SHRUNK: dict[str, object] = {}


def _shrunk(r: DiffRunner, program: DiffProgram):
    """The shrunk case of a disagreeing program (kept by digest: hypothesis replays the
    failing example once more before it reports it)."""
    if program.digest() in _SHRUNK:
        return _SHRUNK[program.digest()]
    signature = r.run(program).signature
    small = shrink(program, lambda p: r.run(p).signature == signature, max_runs=SHRINK_RUNS,
                   excluded=r.excluded)
    result = r.run(small)
    save_regression(result, NEW_FAILURE.parent, origin="tests/kvm/test_fuzz_differential.py "
                    f"(simulator {r.sim_options.describe()})", name=NEW_FAILURE.stem)
    _SHRUNK[program.digest()] = result
    return result


def _agree(r: DiffRunner, program: DiffProgram) -> None:
    result = r.run(program)
    if not result.agree:
        small = _shrunk(r, program)
        pytest.fail(f"shrunk case saved to {NEW_FAILURE}\n{small.report()}\n\n"
                    f"as generated:\n{result.report()}", pytrace=False)


HYPOTHESIS = dict(deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                         HealthCheck.data_too_large, HealthCheck.filter_too_much])


@settings(max_examples=EXAMPLES, **HYPOTHESIS)
@given(program=programs(max_ops=24))
def test_backends_agree_on_random_programs(kvm_device, program):
    """Registers, memory, the exit trace and eventfd counts agree for every generated program
    (with the exclusions documented in fastmmio.fuzz.differential), the simulator configured
    like this host's KVM (kvm.mmio_caching from sysfs)."""
    _agree(runner(kvm_device), program)


@settings(max_examples=max(EXAMPLES // 2, 1), **HYPOTHESIS)
@given(program=programs(max_ops=24))
def test_backends_agree_with_the_simulator_caching_mmio_sptes(kvm_device, program):
    """The same with the simulator's kvm.mmio_caching on (VMX's MMIO SPTEs, EPT
    misconfigurations and KVM_FAST_MMIO_BUS), whatever the host's setting: the guest and the
    devices see the same except DiffRunner.excluded's case (a read at a length-0 ioeventfd,
    skipped by the fast path), which is not generated here."""
    r = runner(kvm_device, "on")
    assume(r.excluded(program) is None)
    _agree(r, program)


REGRESSION_FILES = sorted(REGRESSIONS.glob("*.json"))


@pytest.mark.parametrize("mmio_caching", ["host", "on"])
@pytest.mark.parametrize("path", REGRESSION_FILES, ids=[p.stem for p in REGRESSION_FILES])
def test_regression(kvm_device, path, mmio_caching):
    """A shrunk disagreement kept as data (its ``cause`` field says what it was), replayed
    with the simulator configured like the host and with its kvm.mmio_caching on."""
    r = runner(kvm_device, mmio_caching)
    program = load_regression(path)
    why = r.excluded(program)
    if why is not None:
        pytest.skip(f"{why} (its simulator side replays in tests/unit/test_fuzz_diff_compare.py)")
    result = r.run(program)
    assert result.agree, result.report()


def test_there_are_regression_cases():
    """The replay above is not vacuous: the fuzzer's findings are kept."""
    assert REGRESSION_FILES, f"no regression cases in {REGRESSIONS}"
    for path in REGRESSION_FILES:
        doc = json.loads(path.read_text())
        assert doc.get("cause"), f"{path.name}: say what the disagreement was"


# -- the comparison sees what it claims to see ------------------------------------------------

RICH = DiffProgram(
    ops=(
        Op("store", 4, "ECX", "mov", 0x1234_5678, "ram", layout.DATA_GPA + 0x10, MemRef("base", base="RSI")),
        Op("store", 2, "", "mov_imm", 0xBEEF, "mmio", layout.MMIO_BASE + 0x20, MemRef("base", base="RDI")),
        Op("store", 1, "BL", "mov", 0x77, "mmio", layout.MMIO_BASE, MemRef("base", base="RSI")),
        Op("store", 1, "AL", "mov", None, "ro", layout.RO_BASE + 8, MemRef("moffs")),
        Op("load", 8, "R9", "mov", None, "mmio", layout.MMIO_BASE + 0x40, MemRef("rip")),
        Op("out", 2, "AX", "dx", 0x1, "", layout.DOORBELL_PORT),
        Op("in", 1, "AL", "imm8", None, "", 0x61),
        Op("store", 2, "DX", "mov", 0xC0DE, "mmio", layout.COALESCED_GPA + 0x10, MemRef("base", base="RSI")),
    ),
    gprs={"rbx": 0x77, "r12": 0xABCD},
    ioeventfds=(IoEventFdSpec("mmio-0", False, layout.MMIO_BASE, 1),
                IoEventFdSpec("pio-1", True, layout.DOORBELL_PORT, 2, 1)),
    coalesced=(CoalescedZone(layout.COALESCED_GPA, layout.PAGE_SIZE),),
    device_read_value=0x8877_6655_4433_2211,
    data_seed=5,
)


@functools.lru_cache(maxsize=None)
def rich_case(device: str):
    return runner(device).run(dataclasses.replace(RICH, cpl=runner(device).cpl))


def test_rich_program_agrees_and_exercises_every_field(kvm_device):
    """A hand-written program touching every compared field agrees, and what it did is
    visible: both eventfds fired, four userspace exits (MMIO write, RO write, MMIO read, IN),
    one coalesced-ring entry, a data-area store, a loaded register."""
    r = rich_case(kvm_device)
    assert r.agree, r.report()
    k = r.kvm
    assert k.outcome == "done"
    assert k.eventfds == {"mmio-0": 1, "pio-1": 1}
    assert [(e[0], e[2], e[3]) for e in k.exits] == [("mmio", 2, True), ("mmio", 1, True),
                                                     ("mmio", 8, False), ("io", 1, False)]
    assert k.coalesced == 1
    assert k.regs["r9"] == 0x8877_6655_4433_2211
    assert k.memory["data"][0x10:0x14] == (0x1234_5678).to_bytes(4, "little")


@pytest.mark.parametrize("field", ["regs", "data", "ro", "mailbox", "ram", "exits", "histogram",
                                   "eventfd", "user_exits", "coalesced", "outcome"])
def test_compare_reports_a_planted_difference(kvm_device, field):
    """compare() names each field when (only) that field differs."""
    r = rich_case(kvm_device)
    sim = dataclasses.replace(r.sim, regs=dict(r.sim.regs), memory=dict(r.sim.memory),
                              exits=list(r.sim.exits), histogram=dict(r.sim.histogram),
                              eventfds=dict(r.sim.eventfds))
    if field == "regs":
        sim.regs["r12"] ^= 1
        want = "regs.r12"
    elif field in ("data", "ro", "mailbox", "ram"):
        mem = bytearray(sim.memory[field])
        at = 0x3000 if field == "ram" else 0
        mem[at] ^= 0xFF
        sim.memory[field] = bytes(mem)
        want = f"memory.{field}"
    elif field == "exits":
        sim.exits[0], sim.exits[1] = sim.exits[1], sim.exits[0]  # same histogram, other order
        want = "exits"
    elif field == "histogram":
        key = next(iter(sim.histogram))
        sim.histogram[key] += 1
        want = "histogram"
    elif field == "eventfd":
        sim.eventfds["mmio-0"] += 1
        want = "eventfd.mmio-0"
    elif field == "user_exits":
        sim.user_exits += 1
        want = "user_exits"
    elif field == "coalesced":
        sim.coalesced += 1
        want = "coalesced"
    else:
        sim.outcome = "error:shutdown"
        want = "outcome"
    diffs = compare(r.kvm, sim, runner(kvm_device).info.kvm_kind)
    assert [d.where for d in diffs] == [want]


def test_only_iopl_is_excluded_from_rflags(kvm_device):
    """Under PVM RFLAGS.IOPL is left out of the comparison (rflags_mask: PVM reports IOPL 0
    after running CPL3 I/O through its emulator, the simulator keeps the boot state's 3), and
    the real backend does report a different IOPL here; every other RFLAGS bit is compared."""
    info = runner(kvm_device).info
    r = rich_case(kvm_device)
    if info.kvm_kind != "pvm":
        assert rflags_mask(info.kvm_kind) == (1 << 64) - 1
        return
    assert r.kvm.regs["rflags"] & 0x3000 != r.sim.regs["rflags"] & 0x3000
    sim = dataclasses.replace(r.sim, regs=dict(r.sim.regs))
    sim.regs["rflags"] ^= 1 << 0  # CF
    assert [d.where for d in compare(r.kvm, sim, info.kvm_kind)] == ["regs.rflags"]
