"""Named translation-cache configurations and the named assumptions of the SVM model.

What may be cached and when it must go is architectural; how much is cached is not. The
APM says less than the SDM about the structures behind the TLB, so every choice the model
makes where the APM is silent is an :class:`Assumption` with the APM's words beside it,
selectable by name (``SvmProcessor(..., assumptions={...})``), never a silent choice.

Structures reuse :mod:`fastmmio.sim.vmx.caches` (a :class:`TranslationCacheConfig`):
``combined_tlb`` holds guest-linear -> system-physical translations (APM 15.25.1: "The
most-recently used translations from guest linear to system physical address are cached in
the TLB"), ``combined_psc`` the guest-level page-walk cache, ``guest_physical_tlb`` the
nested (guest-physical -> system-physical) translations and ``guest_physical_psc`` the
nested page-walk cache; their events are named ``tlb.nested.*`` / ``psc.nested.*``.
Every structure is tagged by ASID (15.16, 15.25.1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fastmmio.sim.svm.errors import SvmError
from fastmmio.sim.vmx.caches import (
    SHIFT_1G,
    SHIFT_2M,
    SHIFT_4K,
    UNBOUNDED,
    CacheSpec,
    DataCacheLevel,
    TlbStructure,
    TranslationCacheConfig,
)
from fastmmio.sim.vmx.caches import PAGE_SHIFTS as _ALL_SHIFTS
from fastmmio.sim.vmx.caches import get_config as _get_config

# --------------------------------------------------------------------------------------------
# Assumptions where the APM is silent
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assumption:
    """One named choice the APM does not settle: its values, the default, and the APM's
    words that bear on it."""

    name: str
    values: tuple[str, ...]
    default: str
    apm: str
    reading: str


ASSUMPTIONS: dict[str, Assumption] = {a.name: a for a in (
    Assumption(
        "nested_fault_caching", ("none", "faulting"), "none",
        apm="15.16.1: \"If a hypervisor modifies a nested page table by decreasing "
            "permission levels, clearing present bits, or changing address translations "
            "and intends to return to the same ASID, it should use either TLB command 011b "
            "or 001b.\" Nothing is said about entries that are not present or set reserved "
            "bits.",
        reading="none: nothing is cached from a nested walk that faulted (not present, "
                "reserved bits, too few rights), so setting a present bit or raising "
                "permissions needs no flush -- the only reading under which the APM's list "
                "of flush-requiring changes is complete. faulting: the processor keeps the "
                "faulting result for the guest-physical page until a TLB_CONTROL flush of the "
                "ASID, as a pessimistic bound for hypervisors that skip the flush."),
    Assumption(
        "nested_walk_cache", ("yes", "no"), "yes",
        apm="15.25.1 names only the TLB (guest linear -> system physical). 15.16: TLB "
            "entries are tagged with ASIDs that distinguish \"different guest physical "
            "address spaces when nested page tables are used\"; the flush rule of 15.16.1 "
            "covers every change to a nested table.",
        reading="yes: nested translations and nested page-walk-cache entries may be kept, "
                "tagged by ASID, and go with the same TLB_CONTROL flushes as the TLB (the "
                "configuration decides how many); no: only guest-linear -> system-physical "
                "translations and the guest-level walk cache are kept."),
)}


def resolve_assumptions(given: dict[str, str] | None) -> dict[str, str]:
    """Every assumption's value: the defaults, overridden by ``given``."""
    out = {name: a.default for name, a in ASSUMPTIONS.items()}
    for name, value in (given or {}).items():
        a = ASSUMPTIONS.get(name)
        if a is None:
            raise SvmError(f"unknown SVM assumption {name!r} (known: {', '.join(ASSUMPTIONS)})")
        if value not in a.values:
            raise SvmError(f"assumption {name} must be one of {', '.join(a.values)}, "
                           f"got {value!r}")
        out[name] = value
    return out


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------

_ZEN4_CPUID = ("CPUID as reported on an AMD EPYC family 19h (Zen 4) host: ")
_ZEN4_DCACHE = (
    DataCacheLevel("l1", 32 << 10, 8, _ZEN4_CPUID + "Fn8000_0005 ECX = 0x20080140, L1D "
                   "32 KiB 8-way, 64-byte lines"),
    DataCacheLevel("l2", 1 << 20, 8, _ZEN4_CPUID + "Fn8000_0006 ECX = 0x04006140, L2 "
                   "1 MiB, associativity code 6 = 8-way"),
    DataCacheLevel("llc", 4 << 20, 16, "Zen 4 L3: 32 MiB 16-way per 8-core CCX, one core's "
                   "4 MiB share (AMD Zen 4 product documentation; the host's virtualized "
                   "Fn8000_0006 EDX does not give the full L3)"),
)
_ASSUMED_WALK_CACHE = ("assumed: AMD gives no size for a page-walk cache; the family 17h "
                       "(Zen 2) optimization guide says the L2 DTLB also holds "
                       "page-directory entries 'to speed up DTLB and ITLB table walks'")
_ASSUMED_NESTED = ("assumed: AMD documents no separate structure for nested (guest-physical "
                   "-> system-physical) translations nor its size")

_ALL_LEVELS_UNBOUNDED = {"pml4e": UNBOUNDED, "pdpte": UNBOUNDED, "pde": UNBOUNDED}

CONFIGS: dict[str, TranslationCacheConfig] = {
    "apm-max": TranslationCacheConfig(
        "apm-max",
        "everything APM 15.16 / 15.25 allow to be cached, unbounded, ASID-tagged (data "
        "cache: Zen 4)",
        combined_tlb=(TlbStructure(_ALL_SHIFTS, UNBOUNDED),),
        guest_physical_tlb=(TlbStructure(_ALL_SHIFTS, UNBOUNDED),),
        combined_psc=dict(_ALL_LEVELS_UNBOUNDED),
        guest_physical_psc=dict(_ALL_LEVELS_UNBOUNDED),
        data_cache=_ZEN4_DCACHE,
    ),
    "none": TranslationCacheConfig(
        "none", "no translation caching at all: every access walks (data cache: Zen 4)",
        data_cache=_ZEN4_DCACHE,
    ),
    "zen4": TranslationCacheConfig(
        "zen4",
        "Zen 4 (EPYC 9004): the L2 DTLB (3072) as the TLB for 4 KiB and 2 MiB pages, the "
        "L1 DTLB's 72 entries for 1 GiB pages; assumed walk caches",
        combined_tlb=(
            TlbStructure((SHIFT_4K, SHIFT_2M), CacheSpec(
                3072, 8, source=_ZEN4_CPUID + "Fn8000_0006 EBX = 0x6C004200 and EAX = "
                "0x5C002200: L2 DTLB 3072 entries for 4 KiB and for 2 MiB pages, "
                "associativity code 6 (8-way; the CPUID encoding has no value for the "
                "skewed organisation of Zen's L2 TLB, so the ways are a stand-in)")),
            TlbStructure((SHIFT_1G,), CacheSpec(
                72, None, source=_ZEN4_CPUID + "Fn8000_0005 EBX = 0xFF48FF40: L1 DTLB 72 "
                "entries, fully associative (4 KiB; EAX the same for 2 MiB); that 1 GiB "
                "pages live only there is assumed (Fn8000_0019 reads 0 under the host's "
                "hypervisor)")),
        ),
        guest_physical_tlb=(TlbStructure(_ALL_SHIFTS, CacheSpec(64, 4, source=_ASSUMED_NESTED)),),
        combined_psc={"pde": CacheSpec(64, 4, source=_ASSUMED_WALK_CACHE),
                      "pdpte": CacheSpec(8, None, source=_ASSUMED_WALK_CACHE),
                      "pml4e": CacheSpec(4, None, source=_ASSUMED_WALK_CACHE)},
        guest_physical_psc={"pde": CacheSpec(32, 4, source=_ASSUMED_NESTED),
                            "pdpte": CacheSpec(4, None, source=_ASSUMED_NESTED),
                            "pml4e": CacheSpec(2, None, source=_ASSUMED_NESTED)},
        data_cache=_ZEN4_DCACHE,
    ),
}


def get_config(name: str | TranslationCacheConfig) -> TranslationCacheConfig:
    """A named SVM configuration (or pass one through)."""
    return _get_config(name, CONFIGS)


def without_nested_structures(cfg: TranslationCacheConfig) -> TranslationCacheConfig:
    """``cfg`` with no nested translations and no nested walk cache (assumption
    ``nested_walk_cache=no``)."""
    return replace(cfg, guest_physical_tlb=(), guest_physical_psc={})
