"""Assemble a complete :class:`~fastmmio.image.GuestImage` for one access and CPL."""

from __future__ import annotations

from fastmmio import layout
from fastmmio.errors import UsageError
from fastmmio.guest import gdt
from fastmmio.guest.boot import long_mode_boot_state
from fastmmio.image import GuestImage, Region
from fastmmio.guest.paging import build_page_tables
from fastmmio.guest.program import Access, doorbell_loop

MAILBOX_SIZE = 0x40  # the five u64 fields of layout.MAILBOX_*, rounded up


def build_image(access: Access, cpl: int, done_port: int = layout.DONE_PORT,
                touch: tuple[int, ...] = ()) -> GuestImage:
    """The doorbell-loop guest for ``access`` at ``cpl`` (0 or 3).

    Regions: the paging structures at ``PML4_GPA`` (U bit at every level when ``cpl`` is 3),
    the GDT, the TSS, the code at ``CODE_GPA`` and a zeroed mailbox. The boot state is
    64-bit long mode with RIP at the code and CR3 at the PML4.
    """
    if cpl not in (0, 3):
        raise UsageError(f"guest CPL must be 0 or 3, not {cpl}")
    if access.cpl0_only and cpl != 0:
        # its first iteration would raise #GP (SDM Vol. 2B, MOV CR); the simulator's unicorn
        # runs every guest at its own CPL0 and would not, so no image is built for it
        raise UsageError(f"{access.kind.value} is a CPL0-only access (#GP at CPL{cpl})")
    tables = build_page_tables(user=cpl == 3)
    code = doorbell_loop(access, done_port, touch).encode(layout.CODE_GPA)
    if layout.CODE_GPA + len(code) > layout.STACK_TOP - layout.PAGE_SIZE:
        raise UsageError("guest code too large for its area")
    regions = (
        Region(tables.base, tables.data, "page-tables"),
        Region(layout.GDT_GPA, gdt.build_gdt(), "gdt"),
        Region(layout.TSS_GPA, gdt.build_tss(), "tss"),
        Region(layout.CODE_GPA, code, "code"),
        Region(layout.MAILBOX_GPA, bytes(MAILBOX_SIZE), "mailbox"),
    )
    boot = long_mode_boot_state(cpl, rip=layout.CODE_GPA, cr3=tables.cr3)
    return GuestImage(
        regions=regions,
        boot=boot,
        program="doorbell-loop:" + "".join(f"touch@{a:#x}+" for a in touch)
        + access.describe(),
        code_gpa=layout.CODE_GPA,
        code_size=len(code),
    )
