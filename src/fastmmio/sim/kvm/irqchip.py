"""The in-kernel irqchip's port-I/O side: the 8259 PIC pair on ``KVM_PIO_BUS``.

``KVM_CREATE_IRQCHIP`` makes the in-kernel PIC, IOAPIC and local APICs. Its PIC
(arch/x86/kvm/i8259.c, ``kvm_pic_init``) registers three devices on ``KVM_PIO_BUS``: the
master's command/data ports (0x20, length 2), the slave's (0xa0, length 2) and the two
edge/level control registers (ELCR, 0x4d0, length 2). ``picdev_write``/``picdev_read``
accept byte accesses only (a wider access is taken and ignored, a wider read returns 0);
an ELCR write keeps only the bits of ``elcr_mask`` (0xf8 for the master, 0xde for the slave:
IRQs 0-2 and 8, 13 are always edge-triggered), a read returns the register.

What is modelled: the three bus registrations (so a bus look-up probes as many ranges as in
KVM) and the ELCRs, which kvm-unit-tests' ``inl_from_kernel`` / ``outl_to_kernel`` use. The
8259 command/data registers (ICW/OCW state machine, IMR, IRR, ISR) are not modelled: no route
touches them; an access to them is taken, and a read returns 0. The IOAPIC (an MMIO device at
0xfec00000) is not registered: no route's MMIO look-up reaches that address.
"""

from __future__ import annotations

from fastmmio.sim.kvm.iobus import KvmBus, KvmIoBuses, KvmIoDevice

PIC_MASTER_PORT = 0x20
PIC_SLAVE_PORT = 0xA0
ELCR_PORT = 0x4D0
ELCR_MASK = (0xF8, 0xDE)  # kvm_pic_init: pics[0].elcr_mask, pics[1].elcr_mask


class KvmPic:
    """``struct kvm_pic``: the pair's ELCRs, and its three devices on the PIO bus."""

    def __init__(self, buses: KvmIoBuses):
        self.elcr = [0, 0]
        self.devices = {
            "master": _PicDev(self, PIC_MASTER_PORT),
            "slave": _PicDev(self, PIC_SLAVE_PORT),
            "elcr": _PicDev(self, ELCR_PORT),
        }
        for dev in self.devices.values():
            buses[KvmBus.KVM_PIO_BUS].register_dev(dev.base, 2, dev)

    def write(self, port: int, value: int) -> None:
        if port in (ELCR_PORT, ELCR_PORT + 1):
            i = port & 1
            self.elcr[i] = value & ELCR_MASK[i]

    def read(self, port: int) -> int:
        if port in (ELCR_PORT, ELCR_PORT + 1):
            return self.elcr[port & 1]
        return 0


class _PicDev(KvmIoDevice):
    """``dev_master`` / ``dev_slave`` / ``dev_elcr``: ``picdev_write`` / ``picdev_read``."""

    def __init__(self, pic: KvmPic, base: int):
        self.pic = pic
        self.base = base

    def _in_range(self, addr: int) -> bool:
        return self.base <= addr < self.base + 2

    def write(self, addr: int, length: int, value: int | None) -> bool:
        if not self._in_range(addr):
            return False
        if length == 1 and value is not None:
            self.pic.write(addr, value & 0xFF)
        return True  # a non-byte write is taken and ignored (picdev_write returns 0)

    def read(self, addr: int, length: int) -> int | None:
        if not self._in_range(addr):
            return None
        return self.pic.read(addr) if length == 1 else 0
