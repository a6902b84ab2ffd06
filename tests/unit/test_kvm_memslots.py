"""Memslots (virt/kvm/kvm_main.c: __kvm_set_memory_region, kvm_set_memslot,
kvm_swap_active_memslots, search_memslots)."""

from collections import Counter

import pytest

from fastmmio.errors import FastmmioError
from fastmmio.sim.kvm.memslots import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KvmMemslots,
    MemslotChange,
    MemslotError,
)


def make(ev=None):
    return KvmMemslots(ev if ev is not None else Counter())


def test_generation_starts_at_address_space_id():
    """kvm_create_vm: the generation of address space i starts at i."""
    assert KvmMemslots(as_id=0).generation == 0
    assert KvmMemslots(as_id=1).generation == 1


def test_create_steps_generation_by_number_of_address_spaces():
    """kvm_swap_active_memslots: one swap for KVM_MR_CREATE, +2 with SMM's two address spaces."""
    m = make()
    assert m.set_user_memory_region(0, 0, 0, 0x10000, 0x100000) is MemslotChange.CREATE
    assert m.generation == 2
    m1 = KvmMemslots(nr_address_spaces=1)
    m1.set_user_memory_region(0, 0, 0, 0x1000)
    assert m1.generation == 1


def test_delete_and_move_swap_twice():
    """kvm_set_memslot: DELETE and MOVE first install an invalid slot (kvm_invalidate_memslot),
    then the result: two swaps, two generation steps."""
    m = make()
    m.set_user_memory_region(0, 0, 0, 0x1000)
    assert m.set_user_memory_region(0, 0, 0x10000, 0x1000) is MemslotChange.MOVE
    assert m.generation == 2 + 4
    assert m.set_user_memory_region(0, 0, 0x10000, 0) is MemslotChange.DELETE
    assert m.generation == 6 + 4
    assert len(m) == 0


def test_flags_only_one_swap_and_no_change_no_swap():
    """__kvm_set_memory_region: same base, size and flags returns 0 without a swap."""
    m = make()
    m.set_user_memory_region(3, 0, 0x2000, 0x1000)
    assert m.set_user_memory_region(3, 0, 0x2000, 0x1000) is None
    assert m.generation == 2
    assert m.set_user_memory_region(3, KVM_MEM_LOG_DIRTY_PAGES, 0x2000, 0x1000) is MemslotChange.FLAGS_ONLY
    assert m.generation == 4


def test_in_progress_bit_visible_to_hooks_only_during_swap():
    """kvm_swap_active_memslots sets KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS while swapping and calls
    kvm_arch_memslots_updated with the new generation before publishing it."""
    m = make()
    seen = []
    m.updated_hooks.append(lambda gen: seen.append((m.generation, gen)))
    m.set_user_memory_region(0, 0, 0, 0x1000)
    assert seen == [(KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS | 0, 2)]
    assert not m.update_in_progress


def test_flush_hook_sees_invalid_slot_for_delete():
    """kvm_invalidate_memslot: the old slot is invalid (invisible to look-ups) when
    kvm_arch_flush_shadow_memslot runs."""
    m = make()
    m.set_user_memory_region(0, 0, 0x4000, 0x1000)
    seen = []
    m.flush_hooks.append(lambda old: seen.append((old.id, m.gfn_to_memslot(4))))
    m.set_user_memory_region(0, 0, 0x4000, 0)
    assert seen == [(0, None)]


def test_lookup_binary_search_and_counting():
    """search_memslots: the slot containing the gfn, None in holes; one memslot_lookup each."""
    ev = Counter()
    m = make(ev)
    m.set_user_memory_region(0, 0, 0x0, 0x200000, 0x1000_0000)
    m.set_user_memory_region(1, KVM_MEM_READONLY, 0x200000, 0x10000, 0x2000_0000)
    m.set_user_memory_region(2, 0, 0x1000000, 0x1000, 0x3000_0000)
    assert m.gfn_to_memslot(0x1FF).id == 0
    s = m.gfn_to_memslot(0x205)
    assert s.id == 1 and s.readonly
    assert s.gfn_to_hpa(0x205) == 0x2000_5000
    assert m.gfn_to_memslot(0x210) is None  # just past slot 1
    assert m.gfn_to_memslot(0x400) is None  # MMIO hole
    assert m.gfn_to_memslot(0x1000).id == 2
    assert ev["kvm.mmu.memslot_lookup"] == 5


@pytest.mark.parametrize(
    "args, errno",
    [
        ((0, 1 << 5, 0, 0x1000), "EINVAL"),  # unknown flag
        ((0, 0, 0, 0x1800), "EINVAL"),  # size not page multiple
        ((0, 0, 0x800, 0x1000), "EINVAL"),  # gpa not aligned
        ((40000, 0, 0, 0x1000), "EINVAL"),  # slot id too large
        ((5, 0, 0, 0), "EINVAL"),  # delete a slot that does not exist
        ((1, 0, 0x1000, 0x1000), "EEXIST"),  # overlaps slot 0
    ],
)
def test_set_memory_region_rules(args, errno):
    """__kvm_set_memory_region / check_memory_region_flags errors."""
    m = make()
    m.set_user_memory_region(0, 0, 0, 0x2000)
    with pytest.raises(MemslotError) as e:
        m.set_user_memory_region(*args)
    assert e.value.errno_name == errno
    assert isinstance(e.value, FastmmioError)
    assert m.generation == 2


def test_readonly_flag_cannot_change():
    """__kvm_set_memory_region: toggling KVM_MEM_READONLY on a live slot is EINVAL."""
    m = make()
    m.set_user_memory_region(0, 0, 0, 0x1000)
    with pytest.raises(MemslotError) as e:
        m.set_user_memory_region(0, KVM_MEM_READONLY, 0, 0x1000)
    assert e.value.errno_name == "EINVAL"
