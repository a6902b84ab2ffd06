"""Cache storage, geometry, named configurations and the walk data-cache model
(fastmmio.sim.vmx.caches)."""

from __future__ import annotations

import pytest

from fastmmio.sim.vmx.caches import (
    CONFIGS,
    Cache,
    CacheSpec,
    DataCacheLevel,
    DataCacheModel,
    get_config,
)
from fastmmio.sim.vmx.errors import CacheConfigError
from fastmmio.sim.vmx.processor import READ
from fastmmio.sim.vmx.testbed import Testbed


def test_lru_set_associative_eviction():
    c = Cache("t", CacheSpec(4, 2))  # 2 sets of 2 ways
    for k in (0, 2, 4):  # all in set 0
        c.put("a", k, k)
    assert c.get("a", 0) is None and c.get("a", 2) == 2 and c.get("a", 4) == 4
    c.get("a", 2)  # 2 most recent -> 4 is the LRU
    c.put("a", 6, 6)
    assert c.get("a", 4) is None and c.get("a", 2) == 2
    assert c.evictions == 2 and len(c) == 2


def test_fifo_ignores_use():
    c = Cache("t", CacheSpec(2, 2, "fifo"))
    c.put("a", 1, 1)
    c.put("a", 2, 2)
    c.get("a", 1)
    c.put("a", 3, 3)
    assert c.get("a", 1) is None and c.get("a", 2) == 2


def test_random_replacement_is_bounded_and_deterministic():
    def run():
        c = Cache("t", CacheSpec(8, 4, "random"), seed=3)
        for k in range(100):
            c.put(k % 3, k, k)
        return sorted((t, k) for t, k, _ in c.items())
    assert run() == run() and len(run()) == 8


def test_tags_share_capacity_and_drop_in_place():
    """Hardware structures are shared by all tags (VPIDs, PCIDs, EP4TAs)."""
    c = Cache("t", CacheSpec(2, None))
    t1 = c.table("x")
    c.put("x", 1, 1)
    c.put("y", 2, 2)
    c.put("y", 3, 3)
    assert len(c) == 2 and 1 not in t1
    c.put("x", 4, 4)
    assert c.drop_tags(lambda t: t == "x") == 1
    assert t1 is c.table("x") and not t1


@pytest.mark.parametrize("bad", [dict(entries=0), dict(entries=6, ways=4),
                                 dict(entries=4, policy="plru")])
def test_bad_specs_rejected(bad):
    with pytest.raises(CacheConfigError):
        CacheSpec(**bad)


def test_unknown_config_is_a_clear_error():
    with pytest.raises(CacheConfigError, match="sdm-max"):
        get_config("pentium")


def test_every_bounded_size_has_a_source():
    """Every figure in a realistic configuration names its source or says it is assumed."""
    for cfg in CONFIGS.values():
        specs = [s.spec for s in cfg.combined_tlb + cfg.guest_physical_tlb]
        specs += [s for s in cfg.combined_psc.values() if s]
        specs += [s for s in cfg.guest_physical_psc.values() if s]
        for s in specs:
            assert s.source, cfg.name
        for lv in cfg.data_cache or ():
            assert lv.source, cfg.name


def test_config_none_caches_nothing():
    """A processor need not cache anything (SDM 4.10.2.2, 4.10.3.1)."""
    tb = Testbed("none")
    tb.spread_walk(0x7F00_0000_0000, 1 << 12, 1 << 12)
    tb.proc.translate(0x7F00_0000_0000, READ)
    assert all(v == 0 for v in tb.proc.cached_counts().values())


def test_bounded_tlb_evicts_under_pressure():
    """skylake-sp holds 1536 4 KiB translations; touching 2000 pages evicts some."""
    tb = Testbed("skylake-sp")
    tb.map_all_ept()
    for i in range(2000):
        tb.map_guest(0x4000_0000 + i * 0x1000, 0x100000 + i * 0x1000)
    for i in range(2000):
        assert isinstance(tb.proc.translate(0x4000_0000 + i * 0x1000, READ), int)
    assert tb.proc.cached_counts()["tlb.combined"] == 1536
    assert tb.proc.tlb.caches[0].evictions == 2000 - 1536


def test_data_cache_model_levels_and_lru():
    dc = DataCacheModel((DataCacheLevel("l1", 128, 2), DataCacheLevel("l2", 512, 8)))
    assert dc.access(0x1000) == "mem"
    assert dc.access(0x1008) == "l1"  # same 64-byte line
    assert dc.access(0x1040) == "mem"
    assert dc.access(0x1080) == "mem"  # l1 has 1 set of 2 lines: 0x1000 evicted from l1
    assert dc.access(0x1000) == "l2"
    dc.flush()
    assert dc.access(0x1000) == "mem"
    with pytest.raises(CacheConfigError):
        DataCacheModel((DataCacheLevel("l1", 100, 3),))


def test_fast_path_keeps_exact_lru_order():
    """The TLB-hit fast path skips the recency update only when the page is already the most
    recently used: a 2-entry fully associative LRU TLB touched A, A, B, A then C evicts B."""
    from dataclasses import replace

    from fastmmio.sim.vmx.caches import TlbStructure

    cfg = replace(CONFIGS["sdm-max"], name="two",
                  combined_tlb=(TlbStructure((12, 21, 30), CacheSpec(2)),))
    tb = Testbed(cfg)
    tb.map_all_ept()
    a, b, c = 0x7F00_0000_0000, 0x7F00_0000_1000, 0x7F00_0000_2000
    for i, la in enumerate((a, b, c)):
        tb.map_guest(la, 0x100000 + i * 0x1000)
    for la in (a, a, b, a, c):
        assert isinstance(tb.proc.translate(la, READ), int)
    assert tb.proc.has_translation(a) and tb.proc.has_translation(c)
    assert not tb.proc.has_translation(b)
