"""Guest memory as KVM itself reaches it: through memslots, and through a software page walk.

When KVM's emulator fetches an instruction or reads an operand it does not use the processor:
it walks the guest's page tables in software (arch/x86/kvm/mmu/paging_tmpl.h,
``FNAME(walk_addr_generic)`` behind ``kvm_mmu_gva_to_gpa_*``) and copies bytes through the
memslots (virt/kvm/kvm_main.c ``kvm_vcpu_read_guest`` / ``kvm_vcpu_write_guest``). Neither
touches the processor's TLBs or paging-structure caches.

* :class:`MemslotGuestMemory`: ``kvm_vcpu_read_guest`` / ``kvm_vcpu_write_guest`` page by page;
  a gfn without a (valid) memslot fails (-EFAULT), a write to a ``KVM_MEM_READONLY`` slot
  fails (``__gfn_to_hva_many`` returns ``KVM_HVA_ERR_RO_BAD``).
* :class:`GuestPageWalker`: 4-level IA-32e walk (SDM Vol. 3A 4.5, access rights 4.6, #PF
  error code 4.7): present, reserved bits (via :func:`fastmmio.x86.paging.guest_reserved_mask`),
  U/S against CPL, R/W with CR0.WP, XD with EFER.NXE, SMEP and SMAP; sets accessed flags on
  every level and the dirty flag on the leaf of a write, as
  ``FNAME(update_accessed_dirty_bits)``. Counts ``kvm.emulate.walk`` per walk and
  ``kvm.emulate.walk.ref`` per guest entry read.

The vCPU state the walker needs is read from a register mapping (see
:class:`fastmmio.sim.kvm.emulator.RegisterFile`): ``cr0``, ``cr3``, ``cr4``, ``efer``,
``cpl``, ``rflags``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Protocol

from fastmmio.errors import GuestError
from fastmmio.sim.kvm.memslots import PAGE_SHIFT, PAGE_SIZE, KvmMemslots
from fastmmio.x86.paging import guest_reserved_mask
from fastmmio.sim.vmx.memory import HostMemory

# Page-fault error code bits (SDM 4.7, KVM's PFERR_*).
PFERR_PRESENT_MASK = 1 << 0
PFERR_WRITE_MASK = 1 << 1
PFERR_USER_MASK = 1 << 2
PFERR_RSVD_MASK = 1 << 3
PFERR_FETCH_MASK = 1 << 4

CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
EFER_NXE = 1 << 11
EFER_LMA = 1 << 10
RFLAGS_AC = 1 << 18

_P, _RW, _US, _A, _D, _PS = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7
_XD = 1 << 63
_ADDR = 0x000F_FFFF_FFFF_F000

ACCESS_READ = "read"
ACCESS_WRITE = "write"
ACCESS_FETCH = "fetch"


class GuestMemory(Protocol):
    """What the emulator reads and writes guest-physical memory with."""

    def read_guest(self, gpa: int, n: int) -> bytes | None: ...

    def write_guest(self, gpa: int, data: bytes) -> bool: ...


class MemslotGuestMemory:
    """``kvm_vcpu_read_guest`` / ``kvm_vcpu_write_guest`` over memslots backed by host memory."""

    def __init__(self, memslots: KvmMemslots, memory: HostMemory):
        self.memslots = memslots
        self.memory = memory

    def _pages(self, gpa: int, n: int):
        while n > 0:
            off = gpa & (PAGE_SIZE - 1)
            chunk = min(n, PAGE_SIZE - off)
            yield gpa, chunk
            gpa += chunk
            n -= chunk

    def read_guest(self, gpa: int, n: int) -> bytes | None:
        """The bytes, or None when a page has no usable memslot (-EFAULT)."""
        out = bytearray()
        for g, chunk in self._pages(gpa, n):
            slot = self.memslots.gfn_to_memslot(g >> PAGE_SHIFT)
            if slot is None:
                return None
            out += self.memory.read_bytes(slot.gfn_to_hpa(g >> PAGE_SHIFT) | (g & (PAGE_SIZE - 1)), chunk)
        return bytes(out)

    def write_guest(self, gpa: int, data: bytes) -> bool:
        """False when a page has no memslot or a read-only one (nothing is written then).

        The pages are checked before anything is written, so a failing write has no effect
        (KVM could write a first page and fail on the second; fastmmio's guests never do)."""
        targets = []
        for g, chunk in self._pages(gpa, len(data)):
            slot = self.memslots.gfn_to_memslot(g >> PAGE_SHIFT)
            if slot is None or slot.readonly:
                return False
            targets.append((slot.gfn_to_hpa(g >> PAGE_SHIFT) | (g & (PAGE_SIZE - 1)), chunk))
        pos = 0
        for hpa, chunk in targets:
            self.memory.write_bytes(hpa, data[pos:pos + chunk])
            pos += chunk
        return True


@dataclass(frozen=True)
class GuestPageFault:
    """A #PF the walk would raise: ``address`` (CR2) and the error code (SDM 4.7)."""

    address: int
    error_code: int


class GuestPageWalker:
    """KVM's software walk of the guest's 4-level page tables (``paging64_gva_to_gpa``)."""

    def __init__(self, regs: Mapping[str, int], mem: GuestMemory, events: Counter | None = None,
                 maxphyaddr: int = 46):
        self.regs = regs
        self.mem = mem
        self.events: Counter = events if events is not None else Counter()
        self.maxphyaddr = maxphyaddr

    def __call__(self, gla: int, access: str) -> int | GuestPageFault:
        return self.gva_to_gpa(gla, access)

    def gva_to_gpa(self, gla: int, access: str) -> int | GuestPageFault:
        """The guest-physical address of ``gla`` for ``access`` ("read", "write", "fetch"),
        or the #PF the access would take."""
        regs = self.regs
        cr0, cr4, efer = regs.get("cr0", 0), regs.get("cr4", 0), regs.get("efer", 0)
        if not cr0 & CR0_PG:
            return gla & 0xFFFF_FFFF_FFFF_FFFF
        if not (cr4 & CR4_PAE and efer & EFER_LMA) or cr4 & CR4_LA57:
            raise GuestError("KVM's software page walk is modelled for 4-level IA-32e paging only "
                             f"(CR4={cr4:#x}, EFER={efer:#x})")
        self.events["kvm.emulate.walk"] += 1
        cpl = regs.get("cpl", 0)
        user = cpl == 3
        write = access == ACCESS_WRITE
        fetch = access == ACCESS_FETCH
        nxe = bool(efer & EFER_NXE)
        table = regs.get("cr3", 0) & _ADDR
        entries: list[tuple[int, int]] = []
        us_all = rw_all = True
        xd_any = False
        ps_leaf = False
        level = 4
        while True:
            ea = table + ((gla >> (12 + 9 * (level - 1))) & 511) * 8
            raw = self.mem.read_guest(ea, 8)
            self.events["kvm.emulate.walk.ref"] += 1
            if raw is None:
                # a paging structure outside every memslot: KVM gives up the walk with a #PF
                return self._fault(gla, 0, write, user, fetch and (nxe or bool(cr4 & CR4_SMEP)))
            e = int.from_bytes(raw, "little")
            if not e & _P:
                return self._fault(gla, 0, write, user, fetch and (nxe or bool(cr4 & CR4_SMEP)))
            ps = bool(e & _PS) and level in (2, 3)
            if e & guest_reserved_mask(level, ps, self.maxphyaddr, nxe):
                return self._fault(gla, PFERR_PRESENT_MASK | PFERR_RSVD_MASK, write, user,
                                   fetch and (nxe or bool(cr4 & CR4_SMEP)))
            entries.append((ea, e))
            us_all &= bool(e & _US)
            rw_all &= bool(e & _RW)
            xd_any |= bool(e & _XD)
            if level == 1 or ps:
                ps_leaf = ps
                break
            table = e & _ADDR
            level -= 1
        # access rights (SDM 4.6)
        denied = False
        if user:
            denied = not us_all or (write and not rw_all)
        else:
            if write and not rw_all and cr0 & CR0_WP:
                denied = True
            if us_all and fetch and cr4 & CR4_SMEP:
                denied = True
            if us_all and not fetch and cr4 & CR4_SMAP and not regs.get("rflags", 0) & RFLAGS_AC:
                denied = True
        if fetch and nxe and xd_any:
            denied = True
        if denied:
            return self._fault(gla, PFERR_PRESENT_MASK, write, user,
                               fetch and (nxe or bool(cr4 & CR4_SMEP)))
        # accessed / dirty (FNAME(update_accessed_dirty_bits))
        for i, (ea, e) in enumerate(entries):
            new = e | _A
            if i == len(entries) - 1 and write:
                new |= _D
            if new != e:
                self.mem.write_guest(ea, new.to_bytes(8, "little"))
        leaf = entries[-1][1]
        shift = 12 + 9 * (level - 1)
        if ps_leaf:
            base = leaf & _ADDR & ~((1 << shift) - 1)
        else:
            base = leaf & _ADDR
        return base | (gla & ((1 << shift) - 1))

    @staticmethod
    def _fault(gla: int, bits: int, write: bool, user: bool, fetch_bit: bool) -> GuestPageFault:
        ec = bits
        if write:
            ec |= PFERR_WRITE_MASK
        if user:
            ec |= PFERR_USER_MASK
        if fetch_bit:
            ec |= PFERR_FETCH_MASK
        return GuestPageFault(gla, ec)
