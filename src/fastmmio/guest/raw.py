"""A guest image from arbitrary code bytes, on the same page tables, GDT, TSS and boot state as
the doorbell-loop guests of :func:`fastmmio.guest.build.build_image`.

For programs that are not the timed loop: hostile guests (:mod:`fastmmio.fuzz.hostile`),
random programs for differential tests, hand-written tests of the run loop. The caller may
replace the paging structures (or point CR3 elsewhere), install an IDT, preset general
registers, start elsewhere than the first code byte, and add regions; anything not given is
what ``build_image`` would use, so a raw image with the doorbell loop's bytes is that image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from fastmmio import layout
from fastmmio.errors import UsageError
from fastmmio.guest import gdt
from fastmmio.guest.boot import long_mode_boot_state
from fastmmio.guest.build import MAILBOX_SIZE
from fastmmio.image import GuestImage, Region
from fastmmio.guest.paging import PageTables, build_page_tables

CODE_LIMIT = layout.STACK_TOP - layout.PAGE_SIZE  # code may not run into the stack page
REGISTER_NAMES = frozenset(
    "rax rbx rcx rdx rsi rdi rbp r8 r9 r10 r11 r12 r13 r14 r15".split()
)


def build_raw_image(
    code: bytes,
    cpl: int,
    *,
    program: str = "raw",
    page_tables: PageTables | None = None,
    cr3: int | None = None,
    idt: bytes | None = None,
    idt_limit: int | None = None,
    gprs: Mapping[str, int] | None = None,
    rip: int | None = None,
    rsp: int = layout.STACK_TOP,
    rflags: int | None = None,
    extra_regions: Iterable[Region] = (),
) -> GuestImage:
    """``code`` at :data:`~fastmmio.layout.CODE_GPA`, in 64-bit long mode at ``cpl`` (0 or 3).

    - ``page_tables``: the paging structures to place (default: the identity map of
      :func:`~fastmmio.guest.paging.build_page_tables`, U/S at every level for CPL3).
    - ``cr3``: CR3 at boot (default: the tables' base). It need not point at the tables:
      junk, the MMIO hole or memory outside every memslot are all allowed here; whether KVM
      accepts them is for the backend to find out.
    - ``idt`` / ``idt_limit``: bytes placed at :data:`~fastmmio.layout.IDT_GPA` and IDTR.limit
      (default: no IDT, limit 0, so any exception escalates to a triple fault).
    - ``gprs``: initial general registers by name (``rax`` ... ``r15``).
    - ``rip`` (default: the first code byte), ``rsp``, ``rflags`` (default: IOPL=3, IF=0).
    - ``extra_regions``: more bytes to place (data buffers, junk tables); each must lie in a
      memslot of the machine it runs in.
    """
    if cpl not in (0, 3):
        raise UsageError(f"guest CPL must be 0 or 3, not {cpl}")
    if not code:
        raise UsageError("a raw guest needs at least one code byte")
    if layout.CODE_GPA + len(code) > CODE_LIMIT:
        raise UsageError(f"guest code of {len(code)} bytes does not fit below {CODE_LIMIT:#x}")
    for name in gprs or {}:
        if name not in REGISTER_NAMES:
            raise UsageError(f"unknown general register {name!r}")
    tables = page_tables if page_tables is not None else build_page_tables(user=cpl == 3)
    regions = [
        Region(tables.base, tables.data, "page-tables"),
        Region(layout.GDT_GPA, gdt.build_gdt(), "gdt"),
        Region(layout.TSS_GPA, gdt.build_tss(), "tss"),
        Region(layout.CODE_GPA, bytes(code), "code"),
        Region(layout.MAILBOX_GPA, bytes(MAILBOX_SIZE), "mailbox"),
    ]
    if idt is not None:
        regions.append(Region(layout.IDT_GPA, bytes(idt), "idt"))
    regions.extend(extra_regions)
    boot = long_mode_boot_state(
        cpl, rip=layout.CODE_GPA if rip is None else rip, cr3=tables.cr3 if cr3 is None else cr3, rsp=rsp
    )
    changes: dict = {"gprs": {k: v & 0xFFFF_FFFF_FFFF_FFFF for k, v in (gprs or {}).items()}}
    if idt_limit is not None:
        if not 0 <= idt_limit <= 0xFFFF:
            raise UsageError(f"IDT limit {idt_limit:#x} does not fit 16 bits")
        changes["idt_limit"] = idt_limit
    elif idt is not None:
        changes["idt_limit"] = max(len(idt) - 1, 0)
    if rflags is not None:
        changes["rflags"] = rflags
    boot = dataclasses.replace(boot, **changes)
    return GuestImage(
        regions=tuple(regions),
        boot=boot,
        program=program,
        code_gpa=layout.CODE_GPA,
        code_size=len(code),
    )
