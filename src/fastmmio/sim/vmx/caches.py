"""Translation caches (storage, geometry, named configurations) and the walk data-cache model.

What may be cached, under which tags, and when it must go, is architectural (SDM 4.10 and
28.3, 2016 edition); *how much* is cached is not: "a processor may cache less than allowed"
(28.3.3.2: it "may invalidate any cached mappings at any time"). This module provides

* :class:`CacheSpec`: the geometry of one structure (entries, ways, replacement);
* :class:`Cache`: a tagged, optionally set-associative store ``(tag, key) -> entry``. Tags are
  tuples ``(vpid, pcid, ep4ta)`` for combined / linear mappings and ``ep4ta`` for
  guest-physical mappings (28.3.1, 28.3.2). Per-tag tables are cleared in place, never
  replaced, so a caller may hold the current tag's table for a fast look-up;
* :class:`TranslationCacheConfig` and :data:`CONFIGS`: named configurations (``sdm-max``,
  ``none``, ``skylake-sp``, ``golden-cove``), every size with its source;
* :class:`DataCacheModel`: which of L1/L2/LLC/memory served each paging-structure reference
  (LRU over 64-byte lines; it feeds ``walk.served.*``).

The rules themselves (creation, use, invalidation) live in :mod:`.walker` and :mod:`.processor`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator

from fastmmio.errors import did_you_mean
from fastmmio.sim.vmx.errors import CacheConfigError

POLICIES = ("lru", "fifo", "random")

# Page sizes as shifts; a multi-size structure keys each size with its own marker so that
# numbers of different sizes never collide.
SHIFT_4K, SHIFT_2M, SHIFT_1G = 12, 21, 30
PAGE_SHIFTS = (SHIFT_4K, SHIFT_2M, SHIFT_1G)
SIZE_MARKER = {SHIFT_4K: 0, SHIFT_2M: 1 << 60, SHIFT_1G: 2 << 60}


@dataclass(frozen=True)
class CacheSpec:
    """Geometry of one cache structure.

    ``entries=None`` means unbounded (the SDM maximum: everything the rules allow is kept);
    ``ways=None`` means fully associative. ``source`` says where the figure comes from.
    """

    entries: int | None
    ways: int | None = None
    policy: str = "lru"
    source: str = ""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise CacheConfigError(f"replacement policy must be one of {POLICIES}, "
                                   f"got {self.policy!r}")
        if self.entries is not None:
            if self.entries <= 0:
                raise CacheConfigError(f"cache entries must be positive, got {self.entries}")
            ways = self.ways or self.entries
            if ways <= 0 or self.entries % ways:
                raise CacheConfigError(
                    f"{self.entries} entries cannot be split into {ways}-way sets")


UNBOUNDED = CacheSpec(None, source="SDM maximum: everything the creation rules allow")


class Cache:
    """A tagged store of cached mappings with optional set-associative replacement.

    ``tables[tag]`` is a plain dict ``key -> entry`` (look-ups are a dict ``get``). When the
    spec is bounded, ``sets[key % nsets]`` keeps the replacement order of ``(tag, key)``
    (insertion-ordered dict: first = least recently used / first in).
    """

    __slots__ = ("name", "spec", "tables", "bounded", "ways", "nsets", "sets", "lru",
                 "_rng", "evictions", "epoch")

    def __init__(self, name: str, spec: CacheSpec, seed: int = 0):
        self.name = name
        # epoch[0] grows on every change of the contents (put, discard, drop, clear; not on
        # a look-up's LRU update). An owner may share one list among its caches
        # (:class:`~fastmmio.sim.vmx.walker.Walker` does, for its walk memo).
        self.epoch = [0]
        self.spec = spec
        self.tables: dict[Hashable, dict[int, Any]] = {}
        self.bounded = spec.entries is not None
        self.lru = self.bounded and spec.policy == "lru"
        if self.bounded:
            assert spec.entries is not None
            self.ways = spec.ways or spec.entries
            self.nsets = spec.entries // self.ways
            self.sets: list[dict[tuple, None]] = [{} for _ in range(self.nsets)]
        else:
            self.ways = 0
            self.nsets = 0
            self.sets = []
        self._rng = random.Random(seed)
        self.evictions = 0

    def __repr__(self) -> str:
        return f"Cache({self.name!r}, {len(self)} entries)"

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables.values())

    def table(self, tag: Hashable) -> dict[int, Any]:
        """The (live) table of ``tag``, created empty if needed."""
        t = self.tables.get(tag)
        if t is None:
            t = self.tables[tag] = {}
        return t

    def touch(self, tag: Hashable, key: int) -> None:
        """Record a use of ``(tag, key)`` for LRU replacement."""
        if self.lru:
            s = self.sets[key % self.nsets]
            k = (tag, key)
            if k in s:
                del s[k]
                s[k] = None

    def get(self, tag: Hashable, key: int) -> Any:
        t = self.tables.get(tag)
        if t is None:
            return None
        e = t.get(key)
        if e is not None and self.lru:
            s = self.sets[key % self.nsets]
            k = (tag, key)
            del s[k]
            s[k] = None
        return e

    def put(self, tag: Hashable, key: int, entry: Any) -> None:
        self.epoch[0] += 1
        t = self.table(tag)
        if self.bounded:
            s = self.sets[key % self.nsets]
            k = (tag, key)
            if k in s:
                del s[k]
            elif len(s) >= self.ways:
                if self.spec.policy == "random":
                    victim = self._rng.choice(list(s))
                else:  # lru and fifo both evict the first in order
                    victim = next(iter(s))
                del s[victim]
                del self.tables[victim[0]][victim[1]]
                self.evictions += 1
            s[k] = None
        t[key] = entry

    def discard(self, tag: Hashable, key: int) -> bool:
        t = self.tables.get(tag)
        if t is None or key not in t:
            return False
        self.epoch[0] += 1
        del t[key]
        if self.bounded:
            del self.sets[key % self.nsets][(tag, key)]
        return True

    def discard_key(self, key: int, tag_pred: Callable[[Hashable], bool]) -> int:
        """Remove ``key`` from every tag matching ``tag_pred``; returns how many went."""
        n = 0
        for tag in list(self.tables):
            if tag_pred(tag) and self.discard(tag, key):
                n += 1
        return n

    def drop_tags(self, tag_pred: Callable[[Hashable], bool]) -> int:
        """Remove every entry whose tag matches ``tag_pred`` (tables cleared in place)."""
        n = 0
        for tag, t in self.tables.items():
            if t and tag_pred(tag):
                self.epoch[0] += 1
                n += len(t)
                if self.bounded:
                    for key in t:
                        del self.sets[key % self.nsets][(tag, key)]
                t.clear()
        return n

    def clear(self) -> None:
        self.epoch[0] += 1
        for t in self.tables.values():
            t.clear()
        for s in self.sets:
            s.clear()

    def items(self) -> Iterator[tuple[Hashable, int, Any]]:
        for tag, t in self.tables.items():
            for key, e in t.items():
                yield tag, key, e


# --------------------------------------------------------------------------------------------
# Walk data-cache model
# --------------------------------------------------------------------------------------------

LINE_SHIFT = 6  # 64-byte cache lines on every Intel core modelled here


@dataclass(frozen=True)
class DataCacheLevel:
    name: str  # one of fastmmio.sim.events.SERVED_BY (l1, l2, llc)
    size: int  # bytes
    ways: int
    source: str = ""


class DataCacheModel:
    """Which level served each paging-structure reference: an inclusive hierarchy of
    set-associative LRU caches over 64-byte lines (a *simplification*: real L2/LLC are
    non-inclusive on Skylake-SP and use non-LRU replacement; only walk references are fed
    in, so guest data accesses do not compete for lines unless the caller feeds them with
    :meth:`access`)."""

    def __init__(self, levels: tuple[DataCacheLevel, ...]):
        self.levels = levels
        self._geo: list[tuple[str, int, int, list[dict[int, None]]]] = []
        for lv in levels:
            lines = lv.size >> LINE_SHIFT
            if lines <= 0 or lv.ways <= 0 or lines % lv.ways:
                raise CacheConfigError(f"data cache {lv.name}: {lv.size} bytes cannot be "
                                       f"split into {lv.ways}-way sets of 64-byte lines")
            nsets = lines // lv.ways
            self._geo.append((lv.name, nsets, lv.ways, [{} for _ in range(nsets)]))

    def access(self, addr: int) -> str:
        """Look up the line of ``addr``; fill it into every level that missed. Returns the
        name of the level that served it, or ``"mem"``."""
        line = addr >> LINE_SHIFT
        if self._geo:
            name, nsets, _, sets = self._geo[0]
            s = sets[line % nsets]
            if line in s:  # the common case: a first-level hit (only its recency changes)
                del s[line]
                s[line] = None
                return name
        served = "mem"
        missed = []
        for name, nsets, ways, sets in self._geo:
            s = sets[line % nsets]
            if line in s:
                del s[line]
                s[line] = None
                served = name
                break
            missed.append((ways, s))
        for ways, s in missed:
            if len(s) >= ways:
                del s[next(iter(s))]
            s[line] = None
        return served

    def flush(self) -> None:
        for _, _, _, sets in self._geo:
            for s in sets:
                s.clear()


# --------------------------------------------------------------------------------------------
# Named configurations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlbStructure:
    """One TLB structure holding translations of the given page sizes (shifts)."""

    page_shifts: tuple[int, ...]
    spec: CacheSpec


@dataclass(frozen=True)
class TranslationCacheConfig:
    """Which translation caches exist and how big they are.

    ``combined_tlb`` / ``guest_physical_tlb``: structures by page size (a size missing from
    every structure is never cached). ``combined_psc`` / ``guest_physical_psc``: one spec
    (or None = not implemented) per level ``pml4e``, ``pdpte``, ``pde``. ``data_cache``: the
    walk data-cache levels (None: every reference counts as served by ``mem``).
    """

    name: str
    description: str
    combined_tlb: tuple[TlbStructure, ...] = ()
    guest_physical_tlb: tuple[TlbStructure, ...] = ()
    combined_psc: dict[str, CacheSpec | None] = field(default_factory=dict)
    guest_physical_psc: dict[str, CacheSpec | None] = field(default_factory=dict)
    data_cache: tuple[DataCacheLevel, ...] | None = None

    def __post_init__(self) -> None:
        for label, structs in (("combined_tlb", self.combined_tlb),
                               ("guest_physical_tlb", self.guest_physical_tlb)):
            seen: set[int] = set()
            for st in structs:
                for s in st.page_shifts:
                    if s not in PAGE_SHIFTS or s in seen:
                        raise CacheConfigError(f"{self.name}: {label} page shift {s} unknown "
                                               "or held by two structures")
                    seen.add(s)
        for label, d in (("combined_psc", self.combined_psc),
                         ("guest_physical_psc", self.guest_physical_psc)):
            for k in d:
                if k not in ("pml4e", "pdpte", "pde"):
                    raise CacheConfigError(f"{self.name}: {label} level {k!r} unknown")


_ASSUMED_PSC = ("assumed: Intel documents no paging-structure-cache sizes for this core "
                "(the SDM names the caches, 4.10.3, but gives no geometry)")
_ASSUMED_GPA = ("assumed: Intel does not document whether guest-physical translations are "
                "kept in a structure of their own, nor its size")

_SKX_DCACHE = (
    DataCacheLevel("l1", 32 << 10, 8, "Skylake-SP L1D 32 KiB 8-way (Intel Optimization "
                   "Reference Manual, Skylake Server cache parameters)"),
    DataCacheLevel("l2", 1 << 20, 16, "Skylake-SP L2 1 MiB 16-way (same manual)"),
    DataCacheLevel("llc", 1408 << 10, 11, "Skylake-SP LLC 1.375 MiB per core, 11-way, "
                   "one core's slice (same manual)"),
)
_GLC_DCACHE = (
    DataCacheLevel("l1", 48 << 10, 12, "Golden Cove L1D 48 KiB 12-way (Intel Optimization "
                   "Reference Manual, Golden Cove cache parameters)"),
    DataCacheLevel("l2", 2 << 20, 16, "Sapphire Rapids L2 2 MiB 16-way (same manual)"),
    DataCacheLevel("llc", 1920 << 10, 15, "Sapphire Rapids LLC 1.875 MiB per core, 15-way, "
                   "one core's slice (same manual)"),
)

_ALL_LEVELS_UNBOUNDED = {"pml4e": UNBOUNDED, "pdpte": UNBOUNDED, "pde": UNBOUNDED}


def _psc_assumed() -> dict[str, CacheSpec | None]:
    return {
        "pde": CacheSpec(32, 4, source=_ASSUMED_PSC),
        "pdpte": CacheSpec(4, None, source=_ASSUMED_PSC),
        "pml4e": CacheSpec(2, None, source=_ASSUMED_PSC),
    }


CONFIGS: dict[str, TranslationCacheConfig] = {
    "sdm-max": TranslationCacheConfig(
        "sdm-max",
        "everything SDM 4.10 / 28.3 allow to be cached, unbounded (data cache: Skylake-SP)",
        combined_tlb=(TlbStructure(PAGE_SHIFTS, UNBOUNDED),),
        guest_physical_tlb=(TlbStructure(PAGE_SHIFTS, UNBOUNDED),),
        combined_psc=dict(_ALL_LEVELS_UNBOUNDED),
        guest_physical_psc=dict(_ALL_LEVELS_UNBOUNDED),
        data_cache=_SKX_DCACHE,
    ),
    "none": TranslationCacheConfig(
        "none",
        "no translation caching at all: every access walks (data cache: Skylake-SP)",
        data_cache=_SKX_DCACHE,
    ),
    "skylake-sp": TranslationCacheConfig(
        "skylake-sp",
        "Skylake-SP: the STLB as the combined TLB (the L1 DTLB is not modelled as a "
        "separate level); assumed paging-structure caches",
        combined_tlb=(
            TlbStructure((SHIFT_4K, SHIFT_2M), CacheSpec(
                1536, 12, source="STLB 1536 entries 12-way, 4 KiB and 2 MiB pages (Intel "
                "Optimization Reference Manual Table 2-15)")),
            TlbStructure((SHIFT_1G,), CacheSpec(
                4, 4, source="1 GiB: 4 entries 4-way (CPUID leaf 2 descriptor 63H as "
                "reported on a Skylake-SP; Intel community thread 1371605)")),
        ),
        guest_physical_tlb=(TlbStructure(PAGE_SHIFTS, CacheSpec(64, 4, source=_ASSUMED_GPA)),),
        combined_psc=_psc_assumed(),
        guest_physical_psc=_psc_assumed(),
        data_cache=_SKX_DCACHE,
    ),
    "golden-cove": TranslationCacheConfig(
        "golden-cove",
        "Golden Cove (Sapphire Rapids core): the STLB as the combined TLB; assumed "
        "paging-structure caches",
        combined_tlb=(
            TlbStructure((SHIFT_4K, SHIFT_2M), CacheSpec(
                2048, 16, source="STLB 2048 entries 16-way (Intel Optimization Reference Manual, Golden Cove)")),
            TlbStructure((SHIFT_1G,), CacheSpec(
                8, None, source="1 GiB: the DTLB's 8 entries (Intel Optimization Reference Manual, Golden Cove); the "
                "STLB's 1 GiB capacity is not in our sources")),
        ),
        guest_physical_tlb=(TlbStructure(PAGE_SHIFTS, CacheSpec(64, 4, source=_ASSUMED_GPA)),),
        combined_psc=_psc_assumed(),
        guest_physical_psc=_psc_assumed(),
        data_cache=_GLC_DCACHE,
    ),
}


def get_config(name: str | TranslationCacheConfig,
               configs: dict[str, TranslationCacheConfig] | None = None
               ) -> TranslationCacheConfig:
    """A named configuration of ``configs`` (default: these VMX ones), or pass one
    through."""
    if isinstance(name, TranslationCacheConfig):
        return name
    known = CONFIGS if configs is None else configs
    try:
        return known[name]
    except KeyError:
        raise CacheConfigError(
            f"unknown cache configuration {name!r}{did_you_mean(name, known)} "
            f"(known: {', '.join(known)})") from None


class MultiSizeTlb:
    """A TLB made of one or more :class:`Cache` structures, each holding some page sizes.

    ``by_shift[shift] = (cache, marker)``; the key of a page is ``(addr >> shift) | marker``.
    """

    def __init__(self, name: str, structures: tuple[TlbStructure, ...], seed: int = 0):
        self.name = name
        self.caches: list[Cache] = []
        self.by_shift: dict[int, tuple[Cache, int]] = {}
        for i, st in enumerate(structures):
            c = Cache(f"{name}[{i}]", st.spec, seed + i)
            self.caches.append(c)
            for s in st.page_shifts:
                self.by_shift[s] = (c, SIZE_MARKER[s])
        # Sizes present, in look-up order (smallest page first).
        self.shifts = tuple(s for s in PAGE_SHIFTS if s in self.by_shift)

    def __len__(self) -> int:
        return sum(len(c) for c in self.caches)

    def lookup(self, tag: Hashable, addr: int) -> Any:
        for s in self.shifts:
            c, m = self.by_shift[s]
            e = c.get(tag, (addr >> s) | m)
            if e is not None:
                return e
        return None

    def insert(self, tag: Hashable, addr: int, shift: int, entry: Any) -> bool:
        """Cache ``entry`` for the page of ``addr`` of size ``1 << shift``; returns False
        (nothing cached) if no structure holds that page size. (SDM 4.10.2.3 would also allow
        caching a large page as smaller-page entries; no configuration here does that.)"""
        hit = self.by_shift.get(shift)
        if hit is None:
            return False
        c, m = hit
        c.put(tag, (addr >> shift) | m, entry)
        return True

    def discard_addr(self, addr: int, tag_pred: Callable[[Hashable], bool]) -> int:
        n = 0
        for s in self.shifts:
            c, m = self.by_shift[s]
            n += c.discard_key((addr >> s) | m, tag_pred)
        return n

    def drop_tags(self, tag_pred: Callable[[Hashable], bool]) -> int:
        return sum(c.drop_tags(tag_pred) for c in self.caches)

    def clear(self) -> None:
        for c in self.caches:
            c.clear()
