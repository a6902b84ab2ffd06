"""VM exits as data (fastmmio.sim.vmx.exits): SDM Appendix C, 27.2.1, 27.2.4."""

from __future__ import annotations

import pytest

from fastmmio.sim.vmx import layouts as L
from fastmmio.sim.vmx.errors import VmxError
from fastmmio.sim.vmx.exits import (
    EXIT_REASON_NUMBERS,
    EXIT_REASONS,
    IO_QUAL,
    ExitInfo,
    instruction_length_defined,
    io_qualification,
)
from fastmmio.sim.vmx.processor import READ, WRITE
from fastmmio.sim.vmx.testbed import Testbed


def test_basic_exit_reason_numbers_table_c1():
    """SDM Appendix C Table C-1."""
    expect = {"EXCEPTION_NMI": 0, "CPUID": 10, "HLT": 12, "VMCALL": 18, "CR_ACCESS": 28,
              "IO_INSTRUCTION": 30, "EPT_VIOLATION": 48, "EPT_MISCONFIG": 49, "INVEPT": 50,
              "INVVPID": 53, "PML_FULL": 62, "XRSTORS": 64}
    for name, num in expect.items():
        assert EXIT_REASON_NUMBERS[name] == num and EXIT_REASONS[num] == name
    assert 35 not in EXIT_REASONS and 38 not in EXIT_REASONS and 42 not in EXIT_REASONS


@pytest.mark.parametrize("name,defined", [
    ("IO_INSTRUCTION", True), ("CPUID", True), ("HLT", True), ("VMCALL", True),
    ("MSR_WRITE", True), ("EPT_VIOLATION", False), ("EPT_MISCONFIG", False),
    ("EXTERNAL_INTERRUPT", False), ("APIC_ACCESS", False)])
def test_instruction_length_defined_per_27_2_4(name, defined):
    """SDM 27.2.4: the instruction length is defined for exits caused by executing CPUID,
    HLT, IN/OUT, VMCALL, WRMSR...; "All VM exits other than those listed ... leave this field
    undefined" (EPT violations and misconfigurations among them)."""
    assert instruction_length_defined(EXIT_REASON_NUMBERS[name]) is defined


def test_exit_info_for_ept_violation_and_misconfig():
    """SDM 27.2.1: both fill the guest-physical-address field; a misconfiguration's
    qualification is 0 (Table 27-7 applies to violations only); the GLA is valid for an EPT
    violation with qualification bit 7. The length the processor wrote is kept, flagged as
    architecturally undefined."""
    tb = Testbed("none")
    tb.map_ept_ram(tb.ram_size - 0x10000, 0x10000)
    tb.map_guest(0x5000_0000, 0x40000)
    p = tb.proc
    v = p.translate(0x5000_0010, WRITE)
    info = p.exit_info(v, instruction_length=3)
    assert info.reason == 48 and info.name == "EPT_VIOLATION"
    assert info.guest_physical_address == 0x40010 and info.guest_linear_address == 0x5000_0010
    assert info.instruction_length == 3 and not info.instruction_length_defined
    assert "write" in info.describe() and "(undefined)" in info.describe()
    tb.ept.set_entry(0x40000, 1, L.EPT_W | L.EPT_X)
    m = p.translate(0x5000_0010, READ)
    info = p.exit_info(m)
    assert (info.reason, info.qualification, info.guest_physical_address) == (49, 0, 0x40010)
    assert info.guest_linear_address is None and info.instruction_length is None
    p.vmexit(info)
    assert p.events["exit.EPT_MISCONFIG"] == 1


def test_exit_info_rejects_guest_faults_and_bad_values():
    tb = Testbed("none")
    tb.map_ept_ram(tb.ram_size - 0x10000, 0x10000)
    f = tb.proc.translate(0x1234_5000, READ)
    assert f.kind == "page_fault"
    with pytest.raises(VmxError):
        tb.proc.exit_info(f)
    with pytest.raises(VmxError):
        ExitInfo(99)
    with pytest.raises(VmxError):
        ExitInfo(EXIT_REASON_NUMBERS["CPUID"])  # defined length must be supplied
    with pytest.raises(VmxError):
        ExitInfo(EXIT_REASON_NUMBERS["CPUID"], instruction_length=16)


def test_io_qualification_table_27_5():
    """SDM 27.2.1 Table 27-5: size-1 in 2:0, IN in 3, string 4, REP 5, immediate 6, port
    31:16."""
    q = io_qualification(0xE000, 2, is_in=False, immediate=False)
    assert q == (0xE000 << 16) | 1
    q = io_qualification(0x4D0, 1, is_in=True, immediate=True)
    assert q == (0x4D0 << 16) | (1 << 3) | (1 << 6)
    assert IO_QUAL.decode(q)["port"] == 0x4D0
    with pytest.raises(VmxError):
        io_qualification(0x80, 8, is_in=False)
