"""The doorbell loop decodes back to the kvm-unit-tests timed-loop shape (x86/vmexit.c)."""

from __future__ import annotations

import pytest
from iced_x86 import Decoder, Formatter, FormatterSyntax, Mnemonic, OpKind, Register

from fastmmio import layout
from fastmmio.errors import UsageError
from fastmmio.guest.build import build_image
from fastmmio.guest.program import Access, AccessKind

FMT = Formatter(FormatterSyntax.INTEL)


def decode(access: Access, cpl: int = 3):
    image = build_image(access, cpl)
    code = next(r for r in image.regions if r.name == "code")
    assert code.gpa == image.code_gpa == layout.CODE_GPA
    assert len(code.data) == image.code_size
    instrs = list(Decoder(64, code.data, ip=code.gpa))
    assert all(not i.is_invalid for i in instrs)
    assert sum(i.len for i in instrs) == len(code.data)
    return image, instrs


def loop_body(instrs):
    """Instructions between the loop label (target of the backward JNE) and the DEC."""
    jne = next(i for i in instrs if i.mnemonic == Mnemonic.JNE)
    start = next(k for k, i in enumerate(instrs) if i.ip == jne.near_branch_target)
    end = next(k for k, i in enumerate(instrs) if i.mnemonic == Mnemonic.DEC and k >= start)
    assert instrs[end].op0_register == Register.R15
    assert instrs[end + 1] is not None and instrs[end + 1].ip == jne.ip
    return [FMT.format(i) for i in instrs[start:end]]


CASES = [
    (Access(AccessKind.OUT, 1, layout.DOORBELL_PORT, 0), ["out dx,al"]),
    (Access(AccessKind.OUT, 2, layout.DOORBELL_PORT, 0), ["out dx,ax"]),
    (Access(AccessKind.OUT, 4, layout.DOORBELL_PORT, 0), ["out dx,eax"]),
    (Access(AccessKind.IN, 1, layout.DOORBELL_PORT), ["in al,dx"]),
    (Access(AccessKind.IN, 4, layout.DOORBELL_PORT), ["in eax,dx"]),
    (Access(AccessKind.WRITE, 1, layout.DOORBELL_GPA, 0), ["mov [rsi],r13b"]),
    (Access(AccessKind.WRITE, 2, layout.DOORBELL_GPA, 0), ["mov [rsi],r13w"]),
    (Access(AccessKind.WRITE, 4, layout.DOORBELL_GPA, 0), ["mov [rsi],r13d"]),
    (Access(AccessKind.WRITE, 8, layout.DOORBELL_GPA, 0), ["mov [rsi],r13"]),
    (Access(AccessKind.READ, 1, layout.RO_BASE), ["mov bl,[rsi]"]),
    (Access(AccessKind.READ, 8, layout.RO_BASE), ["mov rbx,[rsi]"]),
    (Access(AccessKind.CPUID), ["xor eax,eax", "xor ecx,ecx", "cpuid"]),
    (Access(AccessKind.NONE), []),
]


@pytest.mark.parametrize("access,body", CASES, ids=[c[0].describe() for c in CASES])
def test_loop_body_is_exactly_the_access(access, body):
    _, instrs = decode(access)
    assert loop_body(instrs) == body


@pytest.mark.parametrize("access,_", CASES, ids=[c[0].describe() for c in CASES])
def test_timed_loop_shape(access, _):
    """RDTSC, N accesses, RDTSC; results to the mailbox; OUT to the done port; back to top
    (kvm-unit-tests x86/vmexit.c: batch timed with raw RDTSC, loop overhead included)."""
    image, instrs = decode(access)
    text = [FMT.format(i) for i in instrs]
    rdtsc = [k for k, i in enumerate(instrs) if i.mnemonic == Mnemonic.RDTSC]
    assert len(rdtsc) == 2
    loop_start = next(k for k, i in enumerate(instrs) if i.ip == next(
        j for j in instrs if j.mnemonic == Mnemonic.JNE).near_branch_target)
    assert rdtsc[0] < loop_start < rdtsc[1]
    # Both RDTSCs combine EDX:EAX into RAX.
    for k in rdtsc:
        assert text[k + 1 : k + 3] == ["shl rdx,20h", "or rax,rdx"]
    # N from the mailbox, via RDI = MAILBOX_GPA.
    assert text[0] == f"mov edi,{layout.MAILBOX_GPA:X}h"
    assert text[1] == "mov r12,[rdi]"
    # Results: T0, T1, batch count, last read value, then OUT to the done port.
    tail = instrs[rdtsc[1] + 3 :]
    stores = [(i.mnemonic, i.memory_base, i.memory_displacement, i.op1_register) for i in tail[:4]]
    assert stores == [
        (Mnemonic.MOV, Register.RDI, layout.MAILBOX_T0, Register.R14),
        (Mnemonic.MOV, Register.RDI, layout.MAILBOX_T1, Register.RAX),
        (Mnemonic.INC, Register.RDI, layout.MAILBOX_BATCHES, Register.NONE),
        (Mnemonic.MOV, Register.RDI, layout.MAILBOX_LAST_READ, Register.RBX),
    ]
    assert tail[4].mnemonic == Mnemonic.OUT and tail[4].immediate8 == layout.DONE_PORT
    assert tail[5].mnemonic == Mnemonic.JMP and len(tail) == 6
    # The JMP goes back to the top, which re-reads N.
    assert instrs[-1].near_branch_target == image.boot.rip == layout.CODE_GPA


@pytest.mark.parametrize("access,_", CASES, ids=[c[0].describe() for c in CASES])
def test_loop_registers_survive_the_access(access, _):
    """The counter R15, target RSI and value R13 are not written by any loop-body
    instruction (CPUID writes RAX/RBX/RCX/RDX, SDM Vol. 2A CPUID; IN writes AL/AX/EAX)."""
    from iced_x86 import InstructionInfoFactory, OpAccess

    _, instrs = decode(access)
    jne = next(i for i in instrs if i.mnemonic == Mnemonic.JNE)
    start = next(k for k, i in enumerate(instrs) if i.ip == jne.near_branch_target)
    factory = InstructionInfoFactory()
    for ins in instrs[start:]:
        if ins.mnemonic == Mnemonic.DEC:
            break
        for used in factory.info(ins).used_registers():
            if used.access in (OpAccess.WRITE, OpAccess.READ_WRITE, OpAccess.COND_WRITE):
                full = used.register
                assert full not in (Register.R15, Register.RSI, Register.R13, Register.RDI)


def test_targets_and_values_are_loaded_before_the_loop():
    _, instrs = decode(Access(AccessKind.WRITE, 4, layout.RO_BASE + 8, 0xDEADBEEF))
    text = [FMT.format(i) for i in instrs]
    assert "mov rsi,200008h" in text
    assert "mov r13,0DEADBEEFh" in text
    _, instrs = decode(Access(AccessKind.OUT, 2, layout.DOORBELL_PORT, 0x1234))
    text = [FMT.format(i) for i in instrs]
    k = text.index("mov edx,0E000h")
    assert text[k + 1] == "mov eax,1234h"
    assert k > [i for i, t in enumerate(text) if t == "rdtsc"][0]  # after RDTSC clobbers EDX:EAX


def test_in_result_is_kept_in_rbx():
    _, instrs = decode(Access(AccessKind.IN, 4, layout.DOORBELL_PORT))
    text = [FMT.format(i) for i in instrs]
    k = [i for i, t in enumerate(text) if t == "rdtsc"][1]
    assert text[k - 1] == "mov rbx,rax"


def test_done_out_is_the_only_other_port_access():
    _, instrs = decode(Access(AccessKind.NONE))
    outs = [i for i in instrs if i.mnemonic in (Mnemonic.OUT, Mnemonic.IN)]
    assert len(outs) == 1 and outs[0].op0_kind == OpKind.IMMEDIATE8
    assert outs[0].immediate8 == layout.DONE_PORT


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="out", width=8, target=0xE000),
        dict(kind="out", width=1, target=0x10000),
        dict(kind="write", width=3, target=layout.DOORBELL_GPA),
        dict(kind="write", width=4, target=layout.DOORBELL_GPA + 2),
        dict(kind="write", width=1, target=layout.DOORBELL_GPA, value=0x100),
        dict(kind="cpuid", width=4),
        dict(kind="read", width=4, target=0),
    ],
)
def test_bad_access_is_a_usage_error(kwargs):
    with pytest.raises(UsageError):
        Access(**kwargs)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError):
        Access(kind="mwait")


def test_program_name_and_cpl():
    for cpl in (0, 3):
        image = build_image(Access(AccessKind.WRITE, 1, layout.DOORBELL_GPA, 0), cpl)
        assert image.program == "doorbell-loop:write:1@0x400000=0x0"
        assert image.cpl == cpl
    with pytest.raises(UsageError):
        build_image(Access(AccessKind.NONE), 1)
