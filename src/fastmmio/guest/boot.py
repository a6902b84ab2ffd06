"""The architectural state a guest starts in: 64-bit long mode at CPL0 or CPL3.

IA-32e mode needs CR0.PG and CR0.PE, CR4.PAE and EFER.LME, and then EFER.LMA is set
(SDM Vol. 3A 9.8.5 "Initializing IA-32e Mode"); a VM entry with "IA-32e mode guest" checks
the same relations (SDM 26.3.1.1 "Checks on Guest Control Registers, Debug Registers, and
MSRs": CR0.PG needs CR0.PE, IA-32e mode needs CR0.PG and CR4.PAE, EFER.LMA equals the
IA-32e-mode-guest control, EFER.LME equals LMA when CR0.PG is 1). CS.L=1, CS.D=0 selects
64-bit mode (5.2.1). The CPL is CS.DPL, SS.DPL must equal it (26.3.1.2).

RFLAGS.IOPL=3 so that IN/OUT at CPL3 is allowed without consulting the TSS I/O bitmap
(SDM Vol. 1 18.5.1 "I/O Privilege Level"). CR4.TSD stays 0 so RDTSC is allowed at CPL3
(SDM Vol. 2B, RDTSC). IF=0: the guest never takes interrupts.
"""

from __future__ import annotations

from fastmmio import layout
from fastmmio.errors import UsageError
from fastmmio.guest import gdt
from fastmmio.image import BootState

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_FIXED = 1 << 1  # bit 1 always reads as 1
RFLAGS_IOPL3 = 3 << 12

CR0_LONG_MODE = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
CR4_LONG_MODE = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
EFER_LONG_MODE = EFER_LME | EFER_LMA


def long_mode_boot_state(cpl: int, rip: int, cr3: int, rsp: int = layout.STACK_TOP) -> BootState:
    """64-bit long mode at ``cpl`` (0 or 3) with the GDT/TSS of :mod:`fastmmio.guest.gdt`.

    The IDT is empty (limit 0): any exception escalates to a triple fault, which KVM reports
    as ``KVM_EXIT_SHUTDOWN``, so a broken guest stops instead of looping.
    """
    if cpl not in (0, 3):
        raise UsageError(f"guest CPL must be 0 or 3, not {cpl}")
    data = gdt.data_segment(cpl)
    return BootState(
        rip=rip,
        rsp=rsp,
        rflags=RFLAGS_FIXED | RFLAGS_IOPL3,
        cr0=CR0_LONG_MODE,
        cr3=cr3,
        cr4=CR4_LONG_MODE,
        efer=EFER_LONG_MODE,
        cs=gdt.code_segment(cpl),
        ss=data,
        ds=data,
        es=data,
        fs=data,
        gs=data,
        tr=gdt.tss_segment(),
        ldt=gdt.ldt_segment(),
        gdt_base=layout.GDT_GPA,
        gdt_limit=len(gdt.build_gdt()) - 1,
        idt_base=layout.IDT_GPA,
        idt_limit=0,
    )
