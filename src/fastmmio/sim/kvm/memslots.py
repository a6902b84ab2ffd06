"""KVM memslots: guest-physical ranges backed by host memory, with a generation counter.

Models ``struct kvm_memory_slot`` and ``struct kvm_memslots`` (include/linux/kvm_host.h) and
the update path of ``KVM_SET_USER_MEMORY_REGION`` (virt/kvm/kvm_main.c):

* ``__kvm_set_memory_region`` / ``check_memory_region_flags``: the validation rules, with the
  kernel's errno (EINVAL, EEXIST) carried by :class:`MemslotError`.
* ``kvm_set_memslot``: a CREATE or FLAGS_ONLY change swaps the active memslots once; a
  DELETE or MOVE first installs an invalid copy of the old slot (``kvm_invalidate_memslot``,
  one swap), flushes the shadow MMU for it (``kvm_arch_flush_shadow_memslot``), then swaps
  again.
* ``kvm_swap_active_memslots``: every swap sets ``KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS`` (bit 63)
  while the swap is under way, then clears it and adds the number of address spaces (2 on x86
  with SMM, so the generation steps by 2) and calls ``kvm_arch_memslots_updated`` with the new
  generation. The generation of address space ``as_id`` starts at ``as_id``
  (``kvm_create_vm``).
* Look-up by gfn: a binary search over the slots sorted by base gfn, as
  ``search_memslots()`` did before the memslot rbtree (Linux <= 5.16); each look-up counts
  ``kvm.mmu.memslot_lookup``.

The backing of a slot is a contiguous run of host-physical pages (in the simulator's
:class:`~fastmmio.sim.vmx.memory.HostMemory`), standing in for the userspace address range a
real VMM passes as ``userspace_addr``.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, replace
from enum import Enum
from typing import Callable, Iterator

from fastmmio.errors import FastmmioError

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEMSLOT_VALID_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY  # x86, no guest_memfd
KVM_MEMSLOT_INVALID = 1 << 16  # kernel-internal flag of a slot being deleted or moved
KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS = 1 << 63
KVM_USER_MEM_SLOTS = 32764  # x86: KVM_MEM_SLOTS_NUM (32767) - KVM_INTERNAL_MEM_SLOTS (3)
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1


class MemslotError(FastmmioError):
    """KVM_SET_USER_MEMORY_REGION refused a change (or the model of it did).

    ``errno_name`` is the kernel's answer (EINVAL, EEXIST); ``rule`` says which check of
    ``__kvm_set_memory_region()`` failed.
    """

    def __init__(self, errno_name: str, rule: str):
        self.errno_name = errno_name
        self.rule = rule
        super().__init__(f"memslot change rejected ({errno_name}): {rule}")


class MemslotChange(str, Enum):
    """``enum kvm_mr_change``."""

    CREATE = "KVM_MR_CREATE"
    DELETE = "KVM_MR_DELETE"
    MOVE = "KVM_MR_MOVE"
    FLAGS_ONLY = "KVM_MR_FLAGS_ONLY"


@dataclass(frozen=True)
class KvmMemorySlot:
    """``struct kvm_memory_slot``: ``npages`` guest pages from ``base_gfn``, backed by host
    pages from ``backing_hpa`` (page-aligned, contiguous)."""

    id: int
    base_gfn: int
    npages: int
    flags: int
    backing_hpa: int

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def invalid(self) -> bool:
        return bool(self.flags & KVM_MEMSLOT_INVALID)

    @property
    def end_gfn(self) -> int:
        """First gfn after the slot."""
        return self.base_gfn + self.npages

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def gfn_to_hpa(self, gfn: int) -> int:
        """Host-physical address of the page backing ``gfn`` (``__gfn_to_hva_memslot``)."""
        if not self.contains(gfn):
            raise MemslotError("EFAULT", f"gfn {gfn:#x} is outside slot {self.id}")
        return self.backing_hpa + ((gfn - self.base_gfn) << PAGE_SHIFT)


# Hook signatures.
FlushHook = Callable[[KvmMemorySlot], None]  # kvm_arch_flush_shadow_memslot(old)
UpdatedHook = Callable[[int], None]  # kvm_arch_memslots_updated(new generation)
CommitHook = Callable[["MemslotChange", "KvmMemorySlot | None", "KvmMemorySlot | None"], None]


class KvmMemslots:
    """The memslots of one address space, with their generation.

    ``events`` is the shared counter (see :mod:`fastmmio.sim.events`). Hooks let the MMU react
    to changes exactly where KVM calls into the architecture code:

    * ``flush_hooks``: ``kvm_arch_flush_shadow_memslot(old)`` for DELETE and MOVE, called while
      the invalid copy is active (generation update in progress bit clear again, as in KVM,
      where the flush follows the first swap);
    * ``updated_hooks``: ``kvm_arch_memslots_updated(gen)`` on every swap, with the new
      generation (not yet visible in :attr:`generation`, as in KVM);
    * ``commit_hooks``: ``kvm_arch_commit_memory_region(old, new, change)`` at the end.
    """

    def __init__(self, events: Counter | None = None, as_id: int = 0, nr_address_spaces: int = 2):
        if nr_address_spaces not in (1, 2) or not 0 <= as_id < nr_address_spaces:
            raise MemslotError("EINVAL", f"address space {as_id} of {nr_address_spaces}")
        self.events: Counter = events if events is not None else Counter()
        self.as_id = as_id
        self.nr_address_spaces = nr_address_spaces
        self.generation = as_id
        self._slots: list[KvmMemorySlot] = []  # sorted by base_gfn
        self._bases: list[int] = []
        self.flush_hooks: list[FlushHook] = []
        self.updated_hooks: list[UpdatedHook] = []
        self.commit_hooks: list[CommitHook] = []

    # -- queries ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[KvmMemorySlot]:
        return iter(list(self._slots))

    def __len__(self) -> int:
        return len(self._slots)

    def by_id(self, slot_id: int) -> KvmMemorySlot | None:
        for s in self._slots:
            if s.id == slot_id:
                return s
        return None

    def gfn_to_memslot(self, gfn: int) -> KvmMemorySlot | None:
        """The slot containing ``gfn``, or None (``search_memslots``: binary search).

        Counts one ``kvm.mmu.memslot_lookup``. An invalid slot (being deleted or moved) is
        returned as None, as ``kvm_vcpu_gfn_to_memslot`` users treat it
        (``kvm_is_visible_memslot``).
        """
        self.events["kvm.mmu.memslot_lookup"] += 1
        i = bisect.bisect_right(self._bases, gfn) - 1
        if i < 0:
            return None
        s = self._slots[i]
        if gfn >= s.end_gfn or s.invalid:
            return None
        return s

    # -- updates ----------------------------------------------------------------------------

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int,
                               memory_size: int, backing_hpa: int = 0) -> MemslotChange | None:
        """Model of ``KVM_SET_USER_MEMORY_REGION`` (``__kvm_set_memory_region``).

        Returns the change made, or None when nothing changed (same base, size and flags:
        KVM returns 0 without touching the generation). Raises :class:`MemslotError`.
        """
        if flags & ~KVM_MEMSLOT_VALID_FLAGS:
            raise MemslotError("EINVAL", f"unknown memslot flags {flags & ~KVM_MEMSLOT_VALID_FLAGS:#x}"
                               " (check_memory_region_flags)")
        if memory_size < 0 or memory_size & (PAGE_SIZE - 1):
            raise MemslotError("EINVAL", f"memory_size {memory_size:#x} is not a multiple of the page size")
        if guest_phys_addr < 0 or guest_phys_addr & (PAGE_SIZE - 1):
            raise MemslotError("EINVAL", f"guest_phys_addr {guest_phys_addr:#x} is not page-aligned")
        if backing_hpa < 0 or backing_hpa & (PAGE_SIZE - 1):
            raise MemslotError("EINVAL", f"backing address {backing_hpa:#x} is not page-aligned")
        if not 0 <= slot < KVM_USER_MEM_SLOTS:
            raise MemslotError("EINVAL", f"slot id {slot} is not below {KVM_USER_MEM_SLOTS}")
        if guest_phys_addr + memory_size >= 1 << 64:
            raise MemslotError("EINVAL", "guest_phys_addr + memory_size wraps")
        npages = memory_size >> PAGE_SHIFT
        if npages > KVM_MEM_MAX_NR_PAGES:
            raise MemslotError("EINVAL", f"{npages} pages exceed KVM_MEM_MAX_NR_PAGES")

        old = self.by_id(slot)
        if npages == 0:
            if old is None:
                raise MemslotError("EINVAL", f"deleting slot {slot}, which does not exist")
            self._set_memslot(old, None, MemslotChange.DELETE)
            return MemslotChange.DELETE

        base_gfn = guest_phys_addr >> PAGE_SHIFT
        new = KvmMemorySlot(slot, base_gfn, npages, flags, backing_hpa)
        if old is None:
            change = MemslotChange.CREATE
        else:
            if (flags ^ old.flags) & KVM_MEM_READONLY:
                raise MemslotError("EINVAL", "KVM_MEM_READONLY cannot be changed on an existing slot")
            if backing_hpa != old.backing_hpa or npages != old.npages:
                raise MemslotError("EINVAL", "an existing slot's size or backing cannot change")
            if base_gfn != old.base_gfn:
                change = MemslotChange.MOVE
            elif flags != old.flags:
                change = MemslotChange.FLAGS_ONLY
            else:
                return None
        if change in (MemslotChange.CREATE, MemslotChange.MOVE):
            for s in self._slots:
                if s.id != slot and base_gfn < s.end_gfn and s.base_gfn < base_gfn + npages:
                    raise MemslotError(
                        "EEXIST", f"slot {slot} [{guest_phys_addr:#x}, +{memory_size:#x}) overlaps slot {s.id}")
        self._set_memslot(old, new, change)
        return change

    def _set_memslot(self, old: KvmMemorySlot | None, new: KvmMemorySlot | None,
                     change: MemslotChange) -> None:
        """``kvm_set_memslot``: invalidate first for DELETE/MOVE, then install the result."""
        if change in (MemslotChange.DELETE, MemslotChange.MOVE):
            assert old is not None
            invalid = replace(old, flags=old.flags | KVM_MEMSLOT_INVALID)
            self._replace(old, invalid)
            self._swap()
            for hook in self.flush_hooks:
                hook(old)
            self._replace(invalid, new)
        else:
            self._replace(old, new)
        self._swap()
        for hook in self.commit_hooks:
            hook(change, old, new)

    def _replace(self, old: KvmMemorySlot | None, new: KvmMemorySlot | None) -> None:
        if old is not None:
            i = self._slots.index(old)
            del self._slots[i]
            del self._bases[i]
        if new is not None:
            i = bisect.bisect_left(self._bases, new.base_gfn)
            self._slots.insert(i, new)
            self._bases.insert(i, new.base_gfn)

    def _swap(self) -> None:
        """``kvm_swap_active_memslots``: in-progress bit, then step by the address-space count."""
        gen = self.generation
        self.generation = gen | KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
        new_gen = (self.generation & ~KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS) + self.nr_address_spaces
        for hook in self.updated_hooks:
            hook(new_gen)
        self.generation = new_gen

    @property
    def update_in_progress(self) -> bool:
        return bool(self.generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS)
