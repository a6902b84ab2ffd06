"""VM exits as data: basic exit reasons (SDM Appendix C, Table C-1), exit information, and the
exit-qualification formats the models need.

The instruction-length rule (SDM 27.2.4): the VM-exit instruction-length field is defined for
fault-like exits caused by executing the instructions listed there (CPUID, HLT, IN/OUT/INS/OUTS,
VMCALL, MOV CR, RDMSR/WRMSR, INVEPT, ...), for software exceptions, and in a few conditional
cases (task switches by instruction, some APIC accesses, failed VMFUNC). "All VM exits other
than those listed ... leave this field undefined": EPT violations and EPT misconfigurations
among them. Bare-metal processors fill it anyway (which KVM relies on outside nesting; d391f1207067), so :class:`ExitInfo`
carries both what the processor wrote and whether the architecture promises it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from fastmmio.sim.vmx.errors import VmxError
from fastmmio.sim.vmx.layouts import EPT_VIOLATION_QUAL, BitLayout, Field

# SDM Appendix C, Table C-1 (2016 edition). Names follow Linux's EXIT_REASON_* spelling.
EXIT_REASONS: dict[int, str] = {
    0: "EXCEPTION_NMI",
    1: "EXTERNAL_INTERRUPT",
    2: "TRIPLE_FAULT",
    3: "INIT_SIGNAL",
    4: "SIPI_SIGNAL",
    5: "IO_SMI",
    6: "OTHER_SMI",
    7: "INTERRUPT_WINDOW",
    8: "NMI_WINDOW",
    9: "TASK_SWITCH",
    10: "CPUID",
    11: "GETSEC",
    12: "HLT",
    13: "INVD",
    14: "INVLPG",
    15: "RDPMC",
    16: "RDTSC",
    17: "RSM",
    18: "VMCALL",
    19: "VMCLEAR",
    20: "VMLAUNCH",
    21: "VMPTRLD",
    22: "VMPTRST",
    23: "VMREAD",
    24: "VMRESUME",
    25: "VMWRITE",
    26: "VMOFF",
    27: "VMON",
    28: "CR_ACCESS",
    29: "DR_ACCESS",
    30: "IO_INSTRUCTION",
    31: "MSR_READ",
    32: "MSR_WRITE",
    33: "INVALID_STATE",
    34: "MSR_LOAD_FAIL",
    36: "MWAIT_INSTRUCTION",
    37: "MONITOR_TRAP_FLAG",
    39: "MONITOR_INSTRUCTION",
    40: "PAUSE_INSTRUCTION",
    41: "MCE_DURING_VMENTRY",
    43: "TPR_BELOW_THRESHOLD",
    44: "APIC_ACCESS",
    45: "EOI_INDUCED",
    46: "GDTR_IDTR",
    47: "LDTR_TR",
    48: "EPT_VIOLATION",
    49: "EPT_MISCONFIG",
    50: "INVEPT",
    51: "RDTSCP",
    52: "PREEMPTION_TIMER",
    53: "INVVPID",
    54: "WBINVD",
    55: "XSETBV",
    56: "APIC_WRITE",
    57: "RDRAND",
    58: "INVPCID",
    59: "VMFUNC",
    60: "ENCLS",
    61: "RDSEED",
    62: "PML_FULL",
    63: "XSAVES",
    64: "XRSTORS",
}
EXIT_REASON_NUMBERS: dict[str, int] = {v: k for k, v in EXIT_REASONS.items()}

EXIT_EPT_VIOLATION = 48
EXIT_EPT_MISCONFIG = 49
EXIT_IO_INSTRUCTION = 30
EXIT_CPUID = 10
EXIT_HLT = 12
EXIT_VMCALL = 18

# SDM 27.2.4: exits whose instruction length is always defined (instruction-caused,
# fault-like). Conditional ones (software exceptions under EXCEPTION_NMI, task switches by
# CALL/IRET/JMP, APIC accesses during software-interrupt delivery, failed VMFUNC) are in
# LENGTH_CONDITIONAL: the caller says whether the condition held.
LENGTH_DEFINED = frozenset(EXIT_REASON_NUMBERS[n] for n in (
    "CPUID", "GETSEC", "HLT", "INVD", "INVLPG", "RDPMC", "RDTSC", "RSM", "VMCALL", "VMCLEAR",
    "VMLAUNCH", "VMPTRLD", "VMPTRST", "VMREAD", "VMRESUME", "VMWRITE", "VMOFF", "VMON",
    "CR_ACCESS", "DR_ACCESS", "IO_INSTRUCTION", "MSR_READ", "MSR_WRITE", "MWAIT_INSTRUCTION",
    "MONITOR_INSTRUCTION", "PAUSE_INSTRUCTION", "GDTR_IDTR", "LDTR_TR", "INVEPT", "RDTSCP",
    "INVVPID", "WBINVD", "XSETBV", "RDRAND", "INVPCID", "ENCLS", "RDSEED", "XSAVES",
    "XRSTORS"))
LENGTH_CONDITIONAL = frozenset(EXIT_REASON_NUMBERS[n] for n in (
    "EXCEPTION_NMI", "TASK_SWITCH", "APIC_ACCESS", "VMFUNC"))


def exit_reason_name(reason: int) -> str:
    try:
        return EXIT_REASONS[reason]
    except KeyError:
        raise VmxError(f"unknown basic exit reason {reason}") from None


def instruction_length_defined(reason: int) -> bool:
    """Whether SDM 27.2.4 defines the VM-exit instruction length for this basic reason
    (conditional reasons answer False: the caller knows whether the condition held)."""
    return reason in LENGTH_DEFINED


@dataclass(frozen=True)
class ExitInfo:
    """What a VM exit leaves in the VMCS exit-information fields (SDM 27.2.1, 24.9).

    ``guest_physical_address`` is defined only for EPT violations and misconfigurations;
    ``guest_linear_address`` only when the architecture defines it (EPT violations with
    qualification bit 7, some I/O string instructions); ``None`` otherwise.
    ``instruction_length`` is what the processor wrote, which may be a value even when
    ``instruction_length_defined`` is False (bare metal fills it anyway).
    """

    reason: int
    qualification: int = 0
    guest_physical_address: int | None = None
    guest_linear_address: int | None = None
    instruction_length: int | None = None
    instruction_length_defined: bool = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.reason not in EXIT_REASONS:
            raise VmxError(f"unknown basic exit reason {self.reason}")
        if self.instruction_length_defined is None:
            object.__setattr__(self, "instruction_length_defined",
                               instruction_length_defined(self.reason))
        if self.instruction_length is not None and not 1 <= self.instruction_length <= 15:
            raise VmxError(f"instruction length must be 1..15, got {self.instruction_length}")
        if self.instruction_length_defined and self.instruction_length is None:
            raise VmxError(f"exit {self.name}: the architecture defines the instruction "
                           "length, so the processor must supply it")

    @property
    def name(self) -> str:
        return EXIT_REASONS[self.reason]

    def describe(self) -> str:
        parts = [f"exit {self.reason} {self.name}"]
        if self.reason == EXIT_EPT_VIOLATION:
            parts.append(EPT_VIOLATION_QUAL.describe(self.qualification))
        elif self.reason == EXIT_IO_INSTRUCTION:
            parts.append(IO_QUAL.describe(self.qualification))
        elif self.qualification:
            parts.append(f"qualification={self.qualification:#x}")
        if self.guest_physical_address is not None:
            parts.append(f"gpa={self.guest_physical_address:#x}")
        if self.guest_linear_address is not None:
            parts.append(f"gla={self.guest_linear_address:#x}")
        if self.instruction_length is not None:
            parts.append(f"len={self.instruction_length}"
                         + ("" if self.instruction_length_defined else " (undefined)"))
        return "; ".join(parts)


# SDM 27.2.1 Table 27-5: exit qualification for I/O instructions.
IO_QUAL = BitLayout("I/O qualification", (
    Field("size_minus_1", 2, 0, "size of access: 0 = 1 byte, 1 = 2 bytes, 3 = 4 bytes"),
    Field("direction_in", 3, 3, "0 = OUT, 1 = IN"),
    Field("string", 4, 4, "string instruction (INS/OUTS)"),
    Field("rep", 5, 5, "REP prefixed"),
    Field("operand_immediate", 6, 6, "0 = port in DX, 1 = immediate"),
    Field("port", 31, 16, "port number"),
), "Exit qualification for I/O instructions (Table 27-5)")


@functools.lru_cache(maxsize=4096)
def io_qualification(port: int, size: int, is_in: bool, string: bool = False,
                     rep: bool = False, immediate: bool = False) -> int:
    """Build an I/O-instruction exit qualification (SDM Table 27-5); kept per arguments (it
    is built at every I/O-instruction exit, and a guest uses a few ports)."""
    if size not in (1, 2, 4):
        raise VmxError(f"I/O size must be 1, 2 or 4, got {size}")
    return IO_QUAL.build(size_minus_1=size - 1, direction_in=is_in, string=string, rep=rep,
                         operand_immediate=immediate, port=port)
