"""Guest-physical layout and port numbers shared by the guest builder and both backends.

Everything a guest image touches lives at a fixed guest-physical address so that the real
backend and the simulator describe the same machine. All regions are identity-mapped
(linear == guest-physical) by the guest's 4-level page tables with 4 KiB pages, so a cold
two-dimensional walk of any of them is the SDM's full 24 references.

    GPA range                    memslot        contents
    0x0000_0000-0x001F_FFFF      slot 0, RAM    page tables, GDT/TSS, code, stack, mailbox, data
    0x0020_0000-0x0020_FFFF      slot 1, RO     KVM_MEM_READONLY memory, filled with RO_PATTERN
    0x0040_0000-0x0040_FFFF      (none)         MMIO hole: doorbells live here
    0x0041_0000-0x0041_0FFF      slot 2, RAM    only for routes with ``neighbour_ram``: RAM in
                                                the doorbell's 2 MiB region, stored to by the
                                                guest before each timed batch

The MMIO hole is alone in its 2 MiB region (0x0040_0000-0x005F_FFFF) unless slot 2 is there:
then KVM's EPT has a page table under that region's PDE (the RAM page's SPTE lives in it).
"""

from __future__ import annotations

PAGE_SIZE = 0x1000

# slot 0: RAM
RAM_SLOT = 0
RAM_BASE = 0x0000_0000
RAM_SIZE = 0x0020_0000
PML4_GPA = 0x0000_1000
PAGE_TABLES_END = 0x0000_8000  # paging structures live in [PML4_GPA, PAGE_TABLES_END)
GDT_GPA = 0x0000_9000
TSS_GPA = 0x0000_A000
IDT_GPA = 0x0000_D000  # after the TSS, whose 8 KiB I/O permission bitmap runs to 0xC068
CODE_GPA = 0x0001_0000
STACK_TOP = 0x0002_0000  # stack grows down from here (page 0x1F000 is the stack page)
MAILBOX_GPA = 0x0003_0000  # host<->guest parameters and results (see MAILBOX_* offsets)
DATA_GPA = 0x0004_0000  # ordinary RAM the "ram-write" baseline stores to

# slot 1: read-only memslot
RO_SLOT = 1
RO_BASE = 0x0020_0000
RO_SIZE = 0x0001_0000
RO_PATTERN = 0x5A  # every byte of the read-only slot starts as this value

# MMIO hole (no memslot)
MMIO_BASE = 0x0040_0000
MMIO_SIZE = 0x0001_0000
DOORBELL_GPA = MMIO_BASE  # the notify register, like pci-testdev's BAR
COALESCED_GPA = MMIO_BASE + 0x1000  # a separate page for the coalesced-MMIO zone

# slot 2 (routes with neighbour_ram only): RAM sharing the MMIO hole's 2 MiB region
NEIGHBOUR_RAM_SLOT = 2
NEIGHBOUR_RAM_GPA = MMIO_BASE + MMIO_SIZE
NEIGHBOUR_RAM_SIZE = PAGE_SIZE

# Port I/O
DOORBELL_PORT = 0xE000  # like pci-testdev's I/O BAR
COALESCED_PORT = 0xE010
# The in-kernel PIC's edge/level control register (ELCR) of the master 8259, on KVM_PIO_BUS
# once KVM_CREATE_IRQCHIP has made the irqchip (arch/x86/kvm/i8259.c, kvm_pic_init registers
# 0x4d0-0x4d1); kvm-unit-tests' inl_from_kernel / outl_to_kernel access it.
ELCR_PORT = 0x04D0
DONE_PORT = 0x00F4  # the guest's final OUT: "batch finished, results in the mailbox"

# Mailbox offsets (u64 each)
MAILBOX_ITERATIONS = 0x00  # host -> guest: N accesses for the next batch
MAILBOX_T0 = 0x08  # guest -> host: RDTSC before the batch
MAILBOX_T1 = 0x10  # guest -> host: RDTSC after the batch
MAILBOX_BATCHES = 0x18  # guest -> host: batches completed so far
MAILBOX_LAST_READ = 0x20  # guest -> host: the value the last read access returned

# Value an unhandled userspace MMIO/PIO read returns from fastmmio's device model.
DEVICE_READ_VALUE = 0x1122_3344_5566_7788
