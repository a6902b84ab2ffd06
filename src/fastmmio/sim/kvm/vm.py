"""One simulated KVM VM (``struct kvm``): memslots, I/O buses, ioeventfds, the coalesced ring,
the TDP MMU, and the variant; built from a :class:`~fastmmio.machine.MachineSpec`.

The VM-level ioctls map onto methods: ``KVM_SET_USER_MEMORY_REGION`` ->
:meth:`KvmVm.set_user_memory_region`, ``KVM_IOEVENTFD`` -> :attr:`KvmVm.ioeventfds`
(:meth:`~fastmmio.sim.kvm.eventfd.IoEventFds.kvm_ioeventfd`),
``KVM_REGISTER_COALESCED_MMIO`` -> :meth:`KvmVm.register_coalesced`. One vCPU
(:meth:`KvmVm.create_vcpu`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from fastmmio.errors import FastmmioError
from fastmmio.image import GuestImage
from fastmmio.machine import IoEventFdSpec, MachineSpec, MemSlot
from fastmmio.sim.kvm.coalesced import CoalescedMmioDev, CoalescedRing, register_coalesced_zone
from fastmmio.sim.kvm.emulator import VcpuMmioInfo
from fastmmio.sim.kvm.eventfd import EventFd, IoEventFds
from fastmmio.sim.kvm.guestmem import MemslotGuestMemory
from fastmmio.sim.kvm.iobus import KvmIoBuses
from fastmmio.sim.kvm.memslots import KVM_MEM_READONLY, PAGE_SIZE, KvmMemslots, MemslotError
from fastmmio.sim.kvm.mmu import TdpMmu
from fastmmio.sim.kvm.spte import ept_format, npt_format
from fastmmio.sim.kvm.variants import Variant, get_variant
from fastmmio.sim.vmx.memory import HostMemory, PageAllocator


class KvmVm:
    """The KVM model of one VM.

    ``variant``: a name from :data:`fastmmio.sim.kvm.variants.VARIANTS`. MMU options:
    ``mmio_caching`` (``kvm.mmio_caching``), ``ad_enabled`` (``kvm_intel.eptad``),
    ``slot_zap_all`` (``KVM_X86_QUIRK_SLOT_ZAP_ALL``). ``events`` is the counter shared with
    the processor model (pass ``processor.events`` to get one counter for the machine).
    The variant's ``arch`` decides the SPTE format (EPT for ``vmx``; NPT for ``svm``, with
    the MMIO mask of the host's MAXPHYADDR and ``sme_c_bit``) and the vCPU's exit handlers.
    """

    def __init__(self, memory: HostMemory | None = None, alloc: PageAllocator | None = None,
                 events: Counter | None = None, *, variant: "str | Variant" = "upstream",
                 mmio_caching: bool = True, ad_enabled: bool = True, slot_zap_all: bool = True,
                 sme_c_bit: int | None = None):
        self.events: Counter = events if events is not None else Counter()
        self.memory = memory if memory is not None else HostMemory()
        self.alloc = alloc if alloc is not None else PageAllocator(self.memory)
        self.variant = get_variant(variant)
        self.memslots = KvmMemslots(self.events)
        self.guest_memory = MemslotGuestMemory(self.memslots, self.memory)
        self.buses = KvmIoBuses(self.events)
        self.ioeventfds = IoEventFds(self.buses, no_length=self.variant.ioeventfd_no_length,
                                     pio_no_length=self.variant.ioeventfd_pio_no_length)
        self.eventfds: dict[str, EventFd] = {}
        self.coalesced_ring = CoalescedRing()
        self.coalesced_zones: list[CoalescedMmioDev] = []
        self.mmio_info = VcpuMmioInfo(lambda: self.memslots.generation)
        self.arch = self.variant.arch
        fmt = (npt_format(self.memory.maxphyaddr, sme_c_bit) if self.arch == "svm"
               else ept_format(ad_enabled))
        self.mmu = TdpMmu(self.memory, self.alloc, self.memslots, self.events,
                          mmio_caching=mmio_caching, ad_enabled=ad_enabled,
                          slot_zap_all=slot_zap_all, maxphyaddr=self.memory.maxphyaddr,
                          mmio_info=self.mmio_info, spte_format=fmt)
        self.pic: Any = None  # the in-kernel PIC after create_irqchip()
        self.vcpu: Any = None
        self.running_vcpu: Any = None  # the vCPU whose exit is being handled (for MMU hooks)
        self.variant.configure(self)

    # -- ioctls -----------------------------------------------------------------------------

    def set_user_memory_region(self, slot: int, gpa: int, size: int, *, readonly: bool = False,
                               fill: int = 0, backing_hpa: int | None = None) -> int:
        """``KVM_SET_USER_MEMORY_REGION``; backing pages are allocated (and filled with
        ``fill``) unless given. Returns the backing address."""
        if size and backing_hpa is None:
            if size % PAGE_SIZE:
                raise MemslotError("EINVAL", f"memory_size {size:#x} is not a multiple of the page size")
            backing_hpa = self.alloc.alloc_pages(size // PAGE_SIZE)
            if fill:
                self.memory.fill(backing_hpa, size, fill)
        self.memslots.set_user_memory_region(slot, KVM_MEM_READONLY if readonly else 0, gpa, size,
                                             backing_hpa or 0)
        return backing_hpa or 0

    def add_memslot(self, spec: MemSlot) -> int:
        return self.set_user_memory_region(spec.slot, spec.gpa, spec.size, readonly=spec.readonly,
                                           fill=spec.fill)

    def assign_ioeventfd(self, spec: IoEventFdSpec) -> EventFd:
        """``KVM_IOEVENTFD`` for a spec, with a new eventfd kept under the spec's name."""
        fd = self.ioeventfds.assign_spec(spec)
        self.eventfds[spec.name] = fd
        return fd

    def register_coalesced(self, addr: int, size: int, pio: bool = False) -> CoalescedMmioDev:
        """``KVM_REGISTER_COALESCED_MMIO``."""
        dev = register_coalesced_zone(self.buses, self.coalesced_ring, addr, size, pio)
        self.coalesced_zones.append(dev)
        return dev

    def create_irqchip(self):
        """``KVM_CREATE_IRQCHIP``: the in-kernel PIC on ``KVM_PIO_BUS``
        (:mod:`fastmmio.sim.kvm.irqchip`)."""
        from fastmmio.sim.kvm.irqchip import KvmPic

        if self.pic is not None:
            raise FastmmioError("KVM_CREATE_IRQCHIP: EEXIST (the VM already has an in-kernel "
                                "irqchip)")
        self.pic = KvmPic(self.buses)
        return self.pic

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: MachineSpec, image: GuestImage | None = None, **kw: Any) -> "KvmVm":
        """A VM with the spec's memslots, ioeventfds and coalesced zones, and the image's
        regions copied into guest memory (as a VMM writes them through its mappings)."""
        vm = cls(**kw)
        if spec.irqchip:
            vm.create_irqchip()
        for s in spec.memslots:
            vm.add_memslot(s)
        for ev in spec.ioeventfds:
            vm.assign_ioeventfd(ev)
        for z in spec.coalesced:
            vm.register_coalesced(z.addr, z.size, z.pio)
        if image is not None:
            vm.load_image(image)
        return vm

    def load_image(self, image: GuestImage) -> None:
        """Copy every region into the memslot backing it (read-only slots included: the VMM
        writes through its own mapping)."""
        for region in image.regions:
            self.write_backing(region.gpa, region.data)

    def write_backing(self, gpa: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            g = gpa + pos
            slot = self.memslots.gfn_to_memslot(g >> 12)
            if slot is None:
                raise MemslotError("EFAULT", f"guest-physical {g:#x} has no memslot to load into")
            chunk = min(len(data) - pos, PAGE_SIZE - (g & (PAGE_SIZE - 1)))
            self.memory.write_bytes(slot.gfn_to_hpa(g >> 12) | (g & (PAGE_SIZE - 1)), data[pos:pos + chunk])
            pos += chunk

    def backing_ranges(self) -> list[tuple[int, int]]:
        """(host-physical address, size) of every memslot's backing (for mapping it into the
        CPU emulator)."""
        return [(s.backing_hpa, s.npages * PAGE_SIZE) for s in self.memslots]

    def create_vcpu(self, processor: Any, **kw: Any):
        """The vCPU (``KVM_CREATE_VCPU``); see :class:`fastmmio.sim.kvm.handlers.KvmVcpu`
        (VMX) and :class:`fastmmio.sim.kvm.svm.SvmVcpu` (SVM)."""
        if self.arch == "svm":
            from fastmmio.sim.kvm.svm import SvmVcpu as vcpu_class
        else:
            from fastmmio.sim.kvm.handlers import KvmVcpu as vcpu_class

        self.vcpu = vcpu_class(self, processor, **kw)
        return self.vcpu

    def eventfd_counts(self) -> dict[str, int]:
        return {name: fd.count for name, fd in self.eventfds.items()}

