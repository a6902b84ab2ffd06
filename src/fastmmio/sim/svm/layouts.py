"""SVM formats as data: exit codes, EXITINFO1 layouts, TLB_CONTROL, the guest-instruction
bytes field, and the nested-table MMIO SPTE encoding KVM uses.

Sources: AMD64 Architecture Programmer's Manual vol. 2, chapter 15 (rev. with 15.36): exit
codes from Appendix C as spelled in Linux ``arch/x86/include/uapi/asm/svm.h``
(``SVM_EXIT_*``, prefix dropped); #NPF EXITINFO1 15.25.6; IOIO EXITINFO1 15.10.2
(Figure 15-2); TLB_CONTROL 15.16.1 (Table 15-9, names as Linux's ``TLB_CONTROL_*``); guest
instruction bytes 15.8.4 (Table 15-6); next RIP 15.7.1. Nested page-table entries use the
x86 long-mode format (15.25.3: "the same paging mode as the VMM used"), whose layouts are
the guest's (:mod:`fastmmio.x86.paging`, ``GUEST_*``).
"""

from __future__ import annotations

from fastmmio.sim.svm.errors import SvmError
from fastmmio.x86.bits import BitLayout, Field, bit_range

# --------------------------------------------------------------------------------------------
# Exit codes (APM Appendix C; Linux uapi/asm/svm.h names)
# --------------------------------------------------------------------------------------------

EXIT_CODES: dict[int, str] = {
    **{n: f"READ_CR{n}" for n in range(16)},
    **{0x10 + n: f"WRITE_CR{n}" for n in range(16)},
    **{0x20 + n: f"READ_DR{n}" for n in range(16)},
    **{0x30 + n: f"WRITE_DR{n}" for n in range(16)},
    **{0x40 + n: f"EXCP_{n}" for n in range(32)},
    0x60: "INTR", 0x61: "NMI", 0x62: "SMI", 0x63: "INIT", 0x64: "VINTR",
    0x65: "CR0_SEL_WRITE", 0x66: "IDTR_READ", 0x67: "GDTR_READ", 0x68: "LDTR_READ",
    0x69: "TR_READ", 0x6A: "IDTR_WRITE", 0x6B: "GDTR_WRITE", 0x6C: "LDTR_WRITE",
    0x6D: "TR_WRITE", 0x6E: "RDTSC", 0x6F: "RDPMC", 0x70: "PUSHF", 0x71: "POPF",
    0x72: "CPUID", 0x73: "RSM", 0x74: "IRET", 0x75: "SWINT", 0x76: "INVD", 0x77: "PAUSE",
    0x78: "HLT", 0x79: "INVLPG", 0x7A: "INVLPGA", 0x7B: "IOIO", 0x7C: "MSR",
    0x7D: "TASK_SWITCH", 0x7E: "FERR_FREEZE", 0x7F: "SHUTDOWN", 0x80: "VMRUN",
    0x81: "VMMCALL", 0x82: "VMLOAD", 0x83: "VMSAVE", 0x84: "STGI", 0x85: "CLGI",
    0x86: "SKINIT", 0x87: "RDTSCP", 0x88: "ICEBP", 0x89: "WBINVD", 0x8A: "MONITOR",
    0x8B: "MWAIT", 0x8C: "MWAIT_COND", 0x8D: "XSETBV", 0x8E: "RDPRU",
    0x400: "NPF", -1: "INVALID",
}
EXIT_CODE_NUMBERS: dict[str, int] = {v: k for k, v in EXIT_CODES.items()}

EXIT_NPF = 0x400
EXIT_IOIO = 0x7B
EXIT_MSR = 0x7C
EXIT_CPUID = 0x72
EXIT_HLT = 0x78
EXIT_VMMCALL = 0x81
EXIT_INVALID = -1
EXIT_EXCP_BP, EXIT_EXCP_OF, EXIT_EXCP_BR = 0x43, 0x44, 0x45  # #BP, #OF, #BR

# APM 15.7.1: nRIP is saved "on all #VMEXITs that are due to instruction intercepts, as
# defined in Section 15.9, as well as MSR and IOIO intercepts and exceptions caused by the
# INT3, INTO, and BOUND instructions. For all other intercepts, nRIP is reset to zero."
# Instruction intercepts of Table 15-7 (CR/DR accesses, descriptor-table accesses and the
# instructions listed there).
NRIP_INSTRUCTION_INTERCEPTS = frozenset(
    list(range(0x00, 0x40))
    + [EXIT_CODE_NUMBERS[n] for n in (
        "CR0_SEL_WRITE", "IDTR_READ", "GDTR_READ", "LDTR_READ", "TR_READ", "IDTR_WRITE",
        "GDTR_WRITE", "LDTR_WRITE", "TR_WRITE", "RDTSC", "RDPMC", "PUSHF", "POPF", "CPUID",
        "RSM", "IRET", "SWINT", "INVD", "PAUSE", "HLT", "INVLPG", "INVLPGA", "VMRUN",
        "VMMCALL", "VMLOAD", "VMSAVE", "STGI", "CLGI", "SKINIT", "RDTSCP", "ICEBP", "WBINVD",
        "MONITOR", "MWAIT", "MWAIT_COND", "XSETBV", "RDPRU")])
NRIP_SAVED = NRIP_INSTRUCTION_INTERCEPTS | {EXIT_IOIO, EXIT_MSR}
# exceptions that save nRIP only when raised by INT3 / INTO / BOUND (the caller says so)
NRIP_IF_BY_INSTRUCTION = frozenset({EXIT_EXCP_BP, EXIT_EXCP_OF, EXIT_EXCP_BR})


def exit_code(name: str) -> int:
    """The exit code of a Linux ``SVM_EXIT_<name>`` (prefix dropped)."""
    try:
        return EXIT_CODE_NUMBERS[name]
    except KeyError:
        raise SvmError(f"unknown SVM exit name {name!r}") from None


def exit_name(code: int) -> str:
    try:
        return EXIT_CODES[code]
    except KeyError:
        raise SvmError(f"unknown SVM exit code {code:#x}") from None


# --------------------------------------------------------------------------------------------
# #NPF EXITINFO1 (APM 15.25.6)
# --------------------------------------------------------------------------------------------

NPF_EXITINFO1 = BitLayout("#NPF EXITINFO1", (
    Field("p", 0, 0, "0 if the nested page was not present, 1 otherwise"),
    Field("rw", 1, 1, "the nested-level access was a write (always for guest page-table "
                      "walks)"),
    Field("us", 2, 2, "the nested-level access was a user access (the MMU's nested "
                      "accesses are user accesses)"),
    Field("rsv", 3, 3, "reserved bits were set in the nested page-table entry"),
    Field("id", 4, 4, "the nested-level access was a code read (never for guest page-table "
                      "walks)"),
    Field("ss", 6, 6, "shadow-stack access"),
    Field("final_gpa", 32, 32, "fault while translating the guest's final physical address"),
    Field("guest_walk", 33, 33, "fault while translating the guest page tables"),
    Field("sss", 37, 37, "supervisor shadow-stack page in the nested leaf"),
), "EXITINFO1 of #VMEXIT(NPF), APM 15.25.6")

NPF_P = 1 << 0
NPF_RW = 1 << 1
NPF_US = 1 << 2
NPF_RSV = 1 << 3
NPF_ID = 1 << 4
NPF_FINAL_GPA = 1 << 32
NPF_GUEST_WALK = 1 << 33

# --------------------------------------------------------------------------------------------
# IOIO EXITINFO1 (APM 15.10.2, Figure 15-2)
# --------------------------------------------------------------------------------------------

IOIO_EXITINFO1 = BitLayout("IOIO EXITINFO1", (
    Field("type_in", 0, 0, "access type: 0 = OUT, 1 = IN"),
    Field("str", 2, 2, "string-based port access (INS, OUTS)"),
    Field("rep", 3, 3, "repeated port access"),
    Field("sz8", 4, 4, "8-bit operand size"),
    Field("sz16", 5, 5, "16-bit operand size"),
    Field("sz32", 6, 6, "32-bit operand size"),
    Field("a16", 7, 7, "16-bit address"),
    Field("a32", 8, 8, "32-bit address"),
    Field("a64", 9, 9, "64-bit address"),
    Field("seg", 12, 10, "effective segment number"),
    Field("port", 31, 16, "intercepted I/O port"),
), "EXITINFO1 of an IOIO intercept, APM 15.10.2 Figure 15-2")


def ioio_exitinfo1(port: int, size: int, is_in: bool, string: bool = False,
                   rep: bool = False, address_size: int = 64, seg: int = 0) -> int:
    """Build an IOIO EXITINFO1 (APM Figure 15-2)."""
    if size not in (1, 2, 4):
        raise SvmError(f"I/O size must be 1, 2 or 4, got {size}")
    if address_size not in (16, 32, 64):
        raise SvmError(f"address size must be 16, 32 or 64, got {address_size}")
    if not 0 <= port <= 0xFFFF:
        raise SvmError(f"I/O port must be 0..65535, got {port}")
    return IOIO_EXITINFO1.build(type_in=is_in, str=string, rep=rep, sz8=size == 1,
                                sz16=size == 2, sz32=size == 4, a16=address_size == 16,
                                a32=address_size == 32, a64=address_size == 64, seg=seg,
                                port=port)


# --------------------------------------------------------------------------------------------
# TLB_CONTROL (APM 15.16.1, Table 15-9)
# --------------------------------------------------------------------------------------------

TLB_CONTROL_DO_NOTHING = 0x00
TLB_CONTROL_FLUSH_ALL_ASID = 0x01
TLB_CONTROL_FLUSH_ASID = 0x03
TLB_CONTROL_FLUSH_ASID_LOCAL = 0x07
TLB_CONTROL_NAMES = {
    0x00: "do_nothing",        # "Do not flush"
    0x01: "flush_all_asid",    # "Flush entire TLB"
    0x03: "flush_asid",        # "Flush this guest's TLB entries"
    0x07: "flush_asid_local",  # "Flush this guest's non-global TLB entries"
}
# 03h and 07h are optional: CPUID Fn8000_000A_EDX[FlushByAsid] = 1
TLB_CONTROL_NEEDS_FLUSH_BY_ASID = frozenset({0x03, 0x07})

# --------------------------------------------------------------------------------------------
# Guest instruction bytes (APM 15.8.4, Table 15-6): VMCB offset 0D0h, 16 bytes
# --------------------------------------------------------------------------------------------

GUEST_INSN_BYTES_MAX = 15  # "Up to 15 bytes are recorded"
VMCB_INSN_BYTES_OFFSET = 0xD0
VMCB_NEXT_RIP_OFFSET = 0xC8


def guest_instruction_bytes_field(data: bytes) -> bytes:
    """The 16-byte VMCB field: bits 3:0 the count, 7:4 zero, then the bytes (Table 15-6)."""
    if len(data) > GUEST_INSN_BYTES_MAX:
        raise SvmError(f"at most {GUEST_INSN_BYTES_MAX} instruction bytes, got {len(data)}")
    return bytes([len(data)]) + data + bytes(GUEST_INSN_BYTES_MAX - len(data))


# --------------------------------------------------------------------------------------------
# The MMIO SPTE KVM writes in nested page tables (data, so both models can use it)
# --------------------------------------------------------------------------------------------

PT_PRESENT_MASK = 1 << 0


def npt_mmio_spte_mask(phys_bits: int, sme_c_bit: int | None = None) -> int:
    """The bits KVM sets in an MMIO SPTE on nested paging, 0 when MMIO caching is off.

    ``kvm_mmu_reset_all_pte_masks`` (arch/x86/kvm/mmu/spte.c): reserved bit 51 plus present
    when the host MAXPHYADDR (``phys_bits``) is below 52, else no MMIO caching. Under SME
    ``svm_adjust_mmio_mask`` (arch/x86/kvm/svm/svm.c) uses bits ``phys_bits``..51 (the
    reduced physical-address width), moved one bit up when that bit is the C-bit, again 0
    at 52. A guest access through such an entry is a #NPF with EXITINFO1.RSV = 1 (APM
    15.25.6), because the set bits are reserved at the host's MAXPHYADDR.
    """
    if not 32 <= phys_bits <= 52:
        raise SvmError(f"physical-address width must be 32..52, got {phys_bits}")
    if sme_c_bit is None:
        return (1 << 51) | PT_PRESENT_MASK if phys_bits < 52 else 0
    mask_bit = phys_bits + 1 if sme_c_bit == phys_bits else phys_bits
    return bit_range(51, mask_bit) | PT_PRESENT_MASK if mask_bit < 52 else 0
