"""#VMEXIT information of the SVM processor: next RIP (APM 15.7.1), decode assists (15.8.4),
IOIO intercepts (15.10.2), and the SVM formats kept as data (fastmmio.sim.svm.layouts)."""

from __future__ import annotations

import pytest

from fastmmio.sim.svm import layouts as S
from fastmmio.sim.svm.errors import SvmError
from fastmmio.sim.svm.processor import FETCH, READ, WRITE, Fault
from fastmmio.sim.svm.testbed import SvmTestbed

LA = 0x7F12_3456_7000  # data page, its nested leaf made not present
DATA = 0x40000
CODE_LA = 0x400000
CODE = 0x50000
CODE_BYTES = bytes(range(0x90, 0x90 + 32))


def machine(code_us: bool = True, **kw) -> SvmTestbed:
    tb = SvmTestbed("apm-max", **kw)
    tb.map_ept_ram(tb.ram_size - 0x10000, 0x10000)
    tb.map_ept_ram(CODE, 0x1000)
    tb.map_guest(LA, DATA)
    tb.map_guest(CODE_LA, CODE, us=code_us)
    tb.memory.write_bytes(tb.gpa_to_hpa(CODE), CODE_BYTES)
    tb.memory.write_bytes(tb.gpa_to_hpa(CODE) + 0xFFB, CODE_BYTES[:5])
    return tb


def npf(tb: SvmTestbed, access: int = WRITE) -> Fault:
    f = tb.proc.translate(LA, access)
    assert isinstance(f, Fault) and f.kind == "npf"
    return f


# ------------------------------------------------------------------------------------------
# next RIP (15.7.1)
# ------------------------------------------------------------------------------------------


def test_ioio_intercept_saves_next_rip_and_exitinfo():
    """APM 15.7.1: nRIP is saved for IOIO intercepts; 15.10.2: EXITINFO1 holds the port,
    the operand size and the direction (Figure 15-2), EXITINFO2 "the rIP of the instruction
    following the IN/OUT"."""
    tb = machine()
    ex = tb.proc.ioio_exit(0x510, 2, False, rip=0x1000, insn_len=2)
    assert ex.name == "IOIO" and ex.next_rip == ex.exitinfo2 == 0x1002
    d = S.IOIO_EXITINFO1.decode(ex.exitinfo1)
    assert (d["port"], d["sz16"], d["sz8"], d["sz32"], d["type_in"], d["a64"]) == (
        0x510, 1, 0, 0, 0, 1)
    assert S.IOIO_EXITINFO1.decode(S.ioio_exitinfo1(0x60, 1, True))["type_in"] == 1
    assert tb.proc.events["exit.IOIO"] == 1


def test_instruction_intercepts_save_next_rip_others_reset_it():
    """APM 15.7.1: nRIP "is saved ... on all #VMEXITs that are due to instruction intercepts
    ... as well as MSR and IOIO intercepts and exceptions caused by the INT3, INTO, and
    BOUND instructions. For all other intercepts, nRIP is reset to zero"."""
    p = machine().proc
    assert p.intercept_exit(S.EXIT_CPUID, 0x2000, 2).next_rip == 0x2002
    assert p.intercept_exit(S.EXIT_MSR, 0x2000, 2).next_rip == 0x2002
    assert p.intercept_exit(S.exit_code("VMMCALL"), 0x2000, 3).next_rip == 0x2003
    assert p.intercept_exit(S.exit_code("INTR"), 0x2000).next_rip == 0
    assert p.intercept_exit(S.EXIT_EXCP_BP, 0x2000, 1, by_instruction=True).next_rip == 0x2001
    assert p.intercept_exit(S.EXIT_EXCP_BP, 0x2000).next_rip == 0
    assert S.EXIT_NPF not in S.NRIP_SAVED
    with pytest.raises(SvmError):
        p.intercept_exit(S.EXIT_CPUID, 0x2000)  # nRIP saved: the length is needed


@pytest.mark.parametrize("switch,expected", [("no", 0), ("yes", 0x3003)])
def test_next_rip_on_npf_is_a_property(switch, expected):
    """APM 15.7.1 does not list #NPF, so nRIP is zero (``next_rip_on_npf=no``); KVM's fast
    MMIO path (01cde4eaaeca) tests ``next_rip != 0`` because hardware may fill it anyway
    (``next_rip_on_npf=yes``)."""
    tb = machine(next_rip_on_npf=switch)
    tb.memory.write_u64(tb.npt.entry_address(DATA, 1), S.npt_mmio_spte_mask(46))
    ex = tb.proc.npf_exit(npf(tb), rip=0x3000, insn_len=3)
    assert ex.next_rip == expected


def test_without_nrips_next_rip_is_zero():
    """CPUID Fn8000_000A_EDX[NRIPS] = 0: no nRIP is saved (15.7.1)."""
    p = machine(nrips=False, next_rip_on_npf="yes").proc
    assert p.ioio_exit(0x510, 1, False, rip=0x1000, insn_len=1).next_rip == 0
    with pytest.raises(SvmError):
        machine(next_rip_on_npf="maybe")


# ------------------------------------------------------------------------------------------
# decode assists (15.8.4)
# ------------------------------------------------------------------------------------------


def test_data_npf_records_15_instruction_bytes_uncounted():
    """APM 15.8.4: on a nested page fault "guest instruction bytes at guest CS:RIP are
    stored ... Up to 15 bytes are recorded"; "The default number of bytes is always 15".
    The processor's own fetch is not a guest memory reference."""
    tb = machine()
    f = npf(tb)
    tb.proc.reset_events()
    ex = tb.proc.npf_exit(f, rip=CODE_LA + 4, insn_len=3)
    assert ex.insn_count == 15 and ex.insn_bytes == CODE_BYTES[4:19]
    ev = tb.proc.reset_events()
    assert dict(ev) == {"exit.NPF": 1}
    assert S.guest_instruction_bytes_field(ex.insn_bytes)[0] == 15


def test_fewer_bytes_when_the_next_page_faults():
    """APM 15.8.4: "If a faulting condition occurs, such as not-present page ... the Guest
    Instruction Bytes field records as many bytes as could be fetched": 5 bytes before the
    end of a code page whose successor is not mapped."""
    tb = machine()
    ex = tb.proc.npf_exit(npf(tb), rip=CODE_LA + 0xFFB, insn_len=3)
    assert ex.insn_count == 5 and ex.insn_bytes == CODE_BYTES[:5]


def test_fetch_npf_records_no_bytes():
    """APM 15.8.4: "This field is filled in only during data page faults. Instruction-fetch
    page faults provide no additional information"."""
    tb = machine()
    ex = tb.proc.npf_exit(npf(tb, FETCH), rip=CODE_LA)
    assert ex.insn_bytes == b"" and ex.insn_count == 0


def test_sev_es_records_no_bytes():
    """SEV-ES (APM 15.35): guest memory and state are encrypted; the VMCB gets no
    instruction bytes (KVM never emulates from them for SEV-ES guests)."""
    tb = machine(sev_es=True)
    assert tb.proc.npf_exit(npf(tb), rip=CODE_LA).insn_count == 0


@pytest.mark.parametrize("smap,code_us,expected", [
    (True, True, 0), (False, True, 15), (True, False, 15)])
def test_erratum_1096(smap, code_us, expected):
    """Erratum 1096 (family 17h models 00h-0Fh; KVM ``svm_need_emulation_on_page_fault``):
    the microcode reads CS:RIP with CPL-0 data privileges and gives up on a SMAP fault, so
    with CR4.SMAP = 1 and a user code page the count is 0; otherwise 15."""
    tb = machine(code_us=code_us, erratum_1096=True)
    if smap:
        tb.proc.load_guest_state(cr4=tb.proc.cr4 | (1 << 21))
    assert tb.proc.npf_exit(npf(tb), rip=CODE_LA).insn_count == expected


def test_no_decode_assists_no_field_and_other_intercepts_clear_the_count():
    """Without DecodeAssists (CPUID Fn8000_000A_EDX) the field is not written; with it, "All
    other intercepts clear bits 7:0 in this field to zero" (15.8.4)."""
    tb = machine(decode_assists=False)
    assert tb.proc.npf_exit(npf(tb), rip=CODE_LA).insn_bytes is None
    tb = machine()
    assert tb.proc.intercept_exit(S.EXIT_CPUID, CODE_LA, 2).insn_bytes == b""
    with pytest.raises(SvmError):
        tb.proc.npf_exit(tb.proc.translate(0x1234_5678_9000, READ), rip=CODE_LA)


# ------------------------------------------------------------------------------------------
# formats as data
# ------------------------------------------------------------------------------------------


def test_npt_mmio_spte_mask_like_kvm():
    """``kvm_mmu_reset_all_pte_masks`` (mmu/spte.c): bit 51 plus present below a 52-bit
    MAXPHYADDR, none at 52; ``svm_adjust_mmio_mask`` under SME: bits phys_bits..51 plus
    present, one bit up when phys_bits is the C-bit, none when that reaches 52."""
    assert S.npt_mmio_spte_mask(46) == (1 << 51) | 1
    assert S.npt_mmio_spte_mask(52) == 0
    assert S.npt_mmio_spte_mask(43, sme_c_bit=47) == (((1 << 9) - 1) << 43) | 1
    assert S.npt_mmio_spte_mask(43, sme_c_bit=43) == (((1 << 8) - 1) << 44) | 1
    assert S.npt_mmio_spte_mask(51, sme_c_bit=51) == 0
    with pytest.raises(SvmError):
        S.npt_mmio_spte_mask(60)


def test_npf_exitinfo1_layout_bits():
    """APM 15.25.6: P bit 0, RW 1, US 2, RSV 3, ID 4; bit 32 final GPA, bit 33 guest
    page-table walk."""
    assert [S.NPF_EXITINFO1[n].lsb for n in ("p", "rw", "us", "rsv", "id", "final_gpa",
                                             "guest_walk")] == [0, 1, 2, 3, 4, 32, 33]
    assert S.exit_name(0x400) == "NPF" and S.exit_name(0x7B) == "IOIO"
    with pytest.raises(SvmError):
        S.exit_name(0x9999)
