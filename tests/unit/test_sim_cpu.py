"""The guest CPU glue (sim/cpu.py): unicorn executes a real doorbell-loop image while the
processor model supplies every translation and decides every VM exit.

These tests use the processor model's Testbed (EPT built directly, no KVM model) and a small
recording handler, so they check the glue alone: exits are delivered with the SDM's exit
information, the handler's register changes take effect, and the walk/exit events appear.
"""

from __future__ import annotations

import pytest

from fastmmio import layout
from fastmmio.guest.build import build_image
from fastmmio.guest.program import Access, AccessKind
from fastmmio.sim.cpu import GuestCpu
from fastmmio.sim.vmx.exits import EXIT_EPT_VIOLATION, EXIT_IO_INSTRUCTION
from fastmmio.sim.vmx.testbed import Testbed

RAM = 0x0040_0000  # guest RAM [0, 4 MiB): the MMIO hole at 4 MiB is outside it (EPT not present)


class Recorder:
    def __init__(self):
        self.exits = []
        self.done = 0

    def ept_exit(self, info, regs):
        self.exits.append(("ept", info.reason, info.guest_physical_address,
                           info.qualification, info.instruction_length))
        regs["rip"] += info.instruction_length  # like KVM's fast MMIO path: skip the store
        return True

    def io_exit(self, info, regs, port, size, is_in, value):
        if port == layout.DONE_PORT:
            self.done += 1
            return False
        self.exits.append(("io", info.reason, port, size, value))
        if is_in:
            regs["rax"] = 0xAB
        return True

    def cpuid_exit(self, info, regs):
        self.exits.append(("cpuid", info.reason))
        regs.update(rax=1, rbx=2, rcx=3, rdx=4)
        regs["rip"] += 2
        return True


def _machine(access: Access, cpl: int = 3, config: str = "sdm-max", **kw):
    tb = Testbed(config, ram_size=RAM, **kw)
    image = build_image(access, cpl)
    for r in image.regions:
        for off in range(0, len(r.data), 8):
            chunk = r.data[off:off + 8].ljust(8, b"\0")
            tb.write_gpa_u64(r.gpa + off, int.from_bytes(chunk, "little"))
    tb.map_ept_ram(0, 0x0021_0000)  # RAM slot and RO slot, 4 KiB EPT leaves
    for gpa in range(0, 0x0021_0000, 0x1000):
        tb.gpa_to_hpa(gpa)
    b = image.boot
    tb.proc.load_guest_state(cr0=b.cr0, cr3=b.cr3, cr4=b.cr4, efer=b.efer, cpl=b.cpl)
    handler = Recorder()
    cpu = GuestCpu(tb.memory, tb.proc, b, handler)
    cpu.map_host_range(tb.ram_hpa, 0x0021_0000)
    return tb, cpu, handler


def _batch(tb, cpu, n):
    tb.write_gpa_u64(layout.MAILBOX_GPA + layout.MAILBOX_ITERATIONS, n)
    return cpu.run(timeout_us=5_000_000)


def test_mmio_write_exits_once_per_store_with_sdm_exit_information():
    """A store to a GPA with no EPT entry: an EPT violation (SDM 28.2.3.2) per iteration, with
    qualification bits 1 (write) and 7/8 (linear address valid, access to the translation)
    (27.2.1 Table 27-7), the GPA, and an instruction length although the SDM leaves it
    undefined for this exit (27.2.4)."""
    tb, cpu, h = _machine(Access(AccessKind.WRITE, 1, layout.DOORBELL_GPA, 0x42))
    stop = _batch(tb, cpu, 10)
    assert stop.kind == "handler" and h.done == 1
    assert len(h.exits) == 10
    kind, reason, gpa, qual, length = h.exits[0]
    assert (kind, reason, gpa) == ("ept", EXIT_EPT_VIOLATION, layout.DOORBELL_GPA)
    assert qual & 0b111 == 0b010 and qual & (1 << 7) and qual & (1 << 8)
    assert qual & 0b111000 == 0  # no EPT entry present: R/W/X all 0
    assert length == 3  # mov [rsi], r13b: REX.R 88 /r
    assert tb.proc.events["exit.EPT_VIOLATION"] == 10
    assert tb.read_gpa_u64(layout.MAILBOX_GPA + layout.MAILBOX_BATCHES) == 1


def test_port_io_and_cpuid_are_delivered_as_exits_and_the_guest_goes_on():
    tb, cpu, h = _machine(Access(AccessKind.OUT, 2, layout.DOORBELL_PORT, 0x1234))
    _batch(tb, cpu, 7)
    assert h.exits == [("io", EXIT_IO_INSTRUCTION, layout.DOORBELL_PORT, 2, 0x1234)] * 7
    assert tb.proc.events["exit.IO_INSTRUCTION"] == 8  # seven doorbells and the done port

    tb, cpu, h = _machine(Access(AccessKind.CPUID))
    _batch(tb, cpu, 5)
    assert [e[0] for e in h.exits] == ["cpuid"] * 5
    # the handler's results reached the guest: rcx/rdx are not touched again by the epilogue
    # (RDTSC rewrites rax/rdx, the loop xors ebx), so rcx still holds what the last CPUID set
    assert cpu.regs()["rcx"] == 3


def test_in_returns_the_value_the_handler_left_in_rax():
    tb, cpu, h = _machine(Access(AccessKind.IN, 1, layout.DOORBELL_PORT))
    _batch(tb, cpu, 3)
    assert tb.read_gpa_u64(layout.MAILBOX_GPA + layout.MAILBOX_LAST_READ) & 0xFF == 0xAB


def test_batches_repeat_and_the_cold_walk_happens_once_with_vpid():
    """With VPID enabled (KVM's default) exits invalidate nothing (SDM 28.3.3.1), so after the
    first batch the code, stack and mailbox translations stay cached: a second batch makes no
    guest-paging reference at all."""
    tb, cpu, h = _machine(Access(AccessKind.OUT, 1, layout.DOORBELL_PORT, 1),
                          vpid_enabled=True, vpid=1)
    _batch(tb, cpu, 4)
    before = sum(v for k, v in tb.proc.events.items() if k.startswith("walk.ref.guest"))
    assert before > 0
    _batch(tb, cpu, 4)
    after = sum(v for k, v in tb.proc.events.items() if k.startswith("walk.ref.guest"))
    assert after == before


def test_vpid_off_refetches_translations_after_every_exit():
    """With "enable VPID" = 0, every VM exit and entry invalidates combined mappings
    (SDM 28.3.3.1): after each port-I/O exit, handled inline while unicorn keeps running its
    chained blocks, the next instruction fetch walks the guest's four levels again. Four more
    doorbells cost exactly four more guest walks (16 guest-structure references)."""
    def guest_refs_of_batch(n):
        tb, cpu, h = _machine(Access(AccessKind.OUT, 1, layout.DOORBELL_PORT, 1),
                              vpid_enabled=False)
        _batch(tb, cpu, 4)
        before = sum(v for k, v in tb.proc.events.items() if k.startswith("walk.ref.guest"))
        _batch(tb, cpu, n)
        return sum(v for k, v in tb.proc.events.items() if k.startswith("walk.ref.guest")) - before

    assert guest_refs_of_batch(8) - guest_refs_of_batch(4) == 4 * 4


def test_never_ending_guest_is_stopped_by_the_budget():
    tb, cpu, h = _machine(Access(AccessKind.NONE))
    tb.write_gpa_u64(layout.MAILBOX_GPA + layout.MAILBOX_ITERATIONS, 1 << 60)
    stop = cpu.run(timeout_us=200_000)
    assert stop.kind == "budget"


def test_guest_page_fault_without_handler_is_a_shutdown():
    """An access the guest's own tables do not map raises #PF; the image has no IDT
    handlers, so delivery ends in a triple fault (SDM 6.15, double-fault class)."""
    tb, cpu, h = _machine(Access(AccessKind.WRITE, 8, 0x7000_0000, 1))
    stop = _batch(tb, cpu, 1)
    assert stop.kind == "shutdown" and "page_fault" in stop.detail


def test_the_simulators_own_lookups_are_not_counted():
    """Processor.uncounted(): reading an instruction's bytes to decode it (the VM-exit
    instruction length, the exact address of an EPT exit) is not a guest memory reference, so
    it adds no event and no ref_log entry; the guest's own references still do."""
    tb, cpu, h = _machine(Access(AccessKind.OUT, 1, layout.DOORBELL_PORT, 1), config="none")
    tb.proc.ref_log = []
    before = dict(tb.proc.events)
    with tb.proc.uncounted():
        assert isinstance(tb.proc.translate(layout.CODE_GPA, 2), int)  # FETCH
    assert dict(tb.proc.events) == before and tb.proc.ref_log == []
    tb.proc.translate(layout.CODE_GPA, 2)
    assert sum(v for k, v in tb.proc.events.items() if k.startswith("walk.ref.")) > \
        sum(v for k, v in before.items() if k.startswith("walk.ref."))
    assert tb.proc.ref_log
