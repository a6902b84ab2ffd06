"""GDT, TSS and boot state for 64-bit long mode (SDM Vol. 3A 3.4.5, 5.2.1, 7.2.3, 7.7, 9.8.5,
26.3.1.1-2)."""

from __future__ import annotations

import struct

import pytest

from fastmmio import layout
from fastmmio.errors import UsageError
from fastmmio.guest import boot, gdt
from fastmmio.guest.build import build_image
from fastmmio.guest.program import Access, AccessKind


def region(image, name):
    return next(r for r in image.regions if r.name == name)


def unpack_descriptor(d: int) -> dict:
    """Decode an 8-byte segment descriptor (SDM Figure 3-8) independently of gdt.descriptor."""
    return {
        "limit": (d & 0xFFFF) | ((d >> 32) & 0xF0000),
        "base": ((d >> 16) & 0xFFFFFF) | ((d >> 56) << 24),
        "type": (d >> 40) & 0xF,
        "s": (d >> 44) & 1,
        "dpl": (d >> 45) & 3,
        "p": (d >> 47) & 1,
        "l": (d >> 53) & 1,
        "db": (d >> 54) & 1,
        "g": (d >> 55) & 1,
    }


@pytest.mark.parametrize("cpl", [0, 3])
def test_boot_state_is_ia32e_mode(cpl):
    """SDM 9.8.5 / 26.3.1.1: CR0.PE and PG, CR4.PAE, EFER.LME and LMA; CS.L=1 and D=0 (5.2.1);
    SS.DPL = CS.DPL = CPL (26.3.1.2); IOPL=3 so port I/O works at CPL3 (Vol. 1 18.5.1)."""
    b = build_image(Access(AccessKind.NONE), cpl).boot
    assert b.cr0 & boot.CR0_PE and b.cr0 & boot.CR0_PG
    assert b.cr4 & boot.CR4_PAE
    assert b.efer & boot.EFER_LME and b.efer & boot.EFER_LMA
    assert b.cs.l == 1 and b.cs.db == 0 and b.cs.s == 1 and b.cs.type & 0x8
    assert b.cpl == b.cs.dpl == b.ss.dpl == cpl
    assert b.cs.selector & 3 == cpl and b.ss.selector & 3 == cpl
    assert (b.rflags >> 12) & 3 == 3
    assert b.rflags & 2 and not b.rflags & (1 << 9)  # reserved bit 1 set, IF clear
    assert not b.cr4 & (1 << 2)  # CR4.TSD clear: RDTSC allowed at CPL3
    assert b.cr3 == layout.PML4_GPA
    assert b.rip == layout.CODE_GPA and b.rsp == layout.STACK_TOP
    assert b.tr.type == gdt.TYPE_TSS64_BUSY and b.tr.s == 0 and b.tr.present
    assert b.ldt.unusable == 1


@pytest.mark.parametrize("cpl", [0, 3])
def test_segment_registers_match_their_gdt_descriptors(cpl):
    """The hidden state loaded into CS/SS/DS and TR is what the GDT holds at each selector, so
    a reload (e.g. by KVM's emulator or an IRET) sees the same segment."""
    image = build_image(Access(AccessKind.NONE), cpl)
    raw = region(image, "gdt").data
    assert region(image, "gdt").gpa == image.boot.gdt_base == layout.GDT_GPA
    assert image.boot.gdt_limit == len(raw) - 1
    for seg in (image.boot.cs, image.boot.ss, image.boot.ds):
        (d,) = struct.unpack_from("<Q", raw, seg.selector & ~7)
        f = unpack_descriptor(d)
        assert f["type"] == seg.type and f["dpl"] == seg.dpl and f["l"] == seg.l
        assert f["s"] == seg.s and f["p"] == 1 and f["db"] == seg.db and f["g"] == seg.g
        assert f["base"] == 0 and f["limit"] == 0xFFFFF


def test_gdt_layout_and_tss_descriptor():
    """Null, kernel code64, kernel data, user data, user code64 (DPL3), then a 16-byte 64-bit
    TSS descriptor (SDM 7.2.3, Figure 7-4) whose upper dword holds base bits 63:32."""
    raw = gdt.build_gdt()
    q = struct.unpack(f"<{len(raw) // 8}Q", raw)
    assert len(q) == 7 and q[0] == 0
    kc, kd, ud, uc = (unpack_descriptor(x) for x in q[1:5])
    assert (kc["dpl"], kc["l"], kc["type"] & 8) == (0, 1, 8)
    assert (uc["dpl"], uc["l"], uc["type"] & 8) == (3, 1, 8)
    assert (kd["dpl"], kd["type"] & 8) == (0, 0) and (ud["dpl"], ud["type"] & 8) == (3, 0)
    t = unpack_descriptor(q[5])
    assert t["base"] == layout.TSS_GPA and t["limit"] == gdt.TSS_LIMIT
    assert t["type"] in (gdt.TYPE_TSS64_AVAIL, gdt.TYPE_TSS64_BUSY) and t["s"] == 0
    assert q[6] == layout.TSS_GPA >> 32
    assert gdt.SEL_TSS == 5 * 8


def allowed(tss: bytes, port: int, width: int) -> bool:
    """The I/O permission check of SDM Vol. 1 18.5.2: every bit for ports port..port+width-1
    must be 0 and lie within the TSS limit."""
    base = struct.unpack_from("<H", tss, 102)[0]
    limit = len(tss) - 1
    for p in range(port, port + width):
        byte = base + p // 8
        if byte > limit or tss[byte] >> (p % 8) & 1:
            return False
    return True


def test_tss_contents():
    """64-bit TSS (SDM Figure 7-11): RSP0 at offset 4, I/O map base at 102; a full I/O
    permission bitmap allowing every port, then an all-ones byte (Vol. 1 18.5.2)."""
    tss = gdt.build_tss()
    assert gdt.TSS_SIZE == 104 and len(tss) == gdt.TSS_LIMIT + 1
    assert struct.unpack_from("<Q", tss, 4)[0] == gdt.KERNEL_STACK_TOP
    assert struct.unpack_from("<H", tss, 102)[0] == gdt.TSS_SIZE
    for port in (0, layout.DONE_PORT, layout.DOORBELL_PORT, layout.COALESCED_PORT, 0xFFFC):
        assert allowed(tss, port, 4)
    assert tss[-1] == 0xFF


def test_tss_does_not_reach_the_next_structure():
    assert layout.TSS_GPA + gdt.TSS_LIMIT + 1 <= layout.IDT_GPA
    assert layout.GDT_GPA + len(gdt.build_gdt()) <= layout.TSS_GPA


def test_regions_do_not_overlap_and_sit_in_the_ram_slot():
    image = build_image(Access(AccessKind.WRITE, 4, layout.DOORBELL_GPA, 1), 3)
    spans = sorted((r.gpa, r.gpa + len(r.data)) for r in image.regions)
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        assert a1 <= b0
    assert spans[0][0] >= layout.RAM_BASE and spans[-1][1] <= layout.RAM_BASE + layout.RAM_SIZE


def test_bad_cpl():
    with pytest.raises(UsageError):
        boot.long_mode_boot_state(2, rip=0x10000, cr3=0x1000)
