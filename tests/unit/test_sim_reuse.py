"""A session whose CPU engine comes from an :class:`~fastmmio.sim.backend.EnginePool` (used by
other guests before) counts exactly what a session with a new engine counts: the same events,
batch results, exit records, statistics, final registers and guest memory, for any route,
KVM variant and machine setting (translation caches, VPID, nested, MMIO caching).

A reused engine is equivalent to a new one only if everything unicorn keeps across guests is
reset: CPU state, translated code (the next guest's code sits at the same addresses), its TLB,
the previous guest's hooks, and the memory behind the mappings. The engine is dirtied first
by a different route under different settings, so any of those left behind shows up here.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmmio import layout
from fastmmio.errors import FastmmioError
from fastmmio.routes import build_machine, get_route, load_catalogue
from fastmmio.sim.backend import EnginePool, SimBackend, SimOptions
from fastmmio.sim.kvm.variants import VARIANTS

ROUTES = [r.name for r in load_catalogue()]
CACHES = ("sdm-max", "none", "skylake-sp")

options = st.builds(SimOptions, variant=st.sampled_from(list(VARIANTS)),
                    caches=st.sampled_from(CACHES), vpid=st.booleans(), nested=st.booleans(),
                    mmio_caching=st.booleans(), extra_ioeventfds=st.sampled_from((0, 3)))


# RDTSC reads the host's TSC in unicorn: the registers and mailbox fields it reaches (the
# guest's T0 in R14, T1 in RAX, EDX's high half) differ from run to run.
_TSC_REGS = ("rax", "rdx", "r14")
_MAILBOX_TSC = slice(layout.MAILBOX_T0, layout.MAILBOX_T1 + 8)


def _observe(backend: SimBackend, route: str, cpl: int) -> dict:
    """Everything a simulation returns or leaves behind, host time and TSC values excepted."""
    try:
        s = backend.open(build_machine(get_route(route), cpl))
    except FastmmioError as exc:  # e.g. the variant refuses the route's ioeventfd
        return {"open": f"{type(exc).__name__}: {exc}"}
    out: dict = {}
    with s:
        try:
            for n in (5, 7):
                b = s.run_batch(n)
                out[n] = (b.events, b.user_exits, b.eventfd_signals, b.exits,
                          b.coalesced_entries, b.kvm_stats, dict(s.exit_histogram))
            out["regs"] = {k: v for k, v in s.regs().items() if k not in _TSC_REGS}
        except FastmmioError as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        out["machine_events"] = dict(s.events)
        mailbox = bytearray(s.read_guest(layout.MAILBOX_GPA, 0x40))
        mailbox[_MAILBOX_TSC] = bytes(16)
        out["mailbox"] = bytes(mailbox)
        out["ro"] = s.read_guest(layout.RO_BASE, layout.RO_SIZE)
    return out


def test_pool_serves_a_second_session_from_the_first_ones_engine():
    with EnginePool() as pool:
        backend = SimBackend(SimOptions(), engines=pool)
        for name in ("pio-eventfd-len1", "mmio-eventfd-len0", "pio-eventfd-len1"):
            _observe(backend, name, 3)
        assert (pool.created, pool.reused) == (1, 2)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route=st.sampled_from(ROUTES), opts=options, cpl=st.sampled_from((0, 3)),
       dirty_route=st.sampled_from(ROUTES), dirty_opts=options)
def test_reused_engine_gives_bit_identical_results(route, opts, cpl, dirty_route, dirty_opts):
    fresh = _observe(SimBackend(opts), route, cpl)
    with EnginePool() as pool:
        # two guests before: the drawn one, and the same route at the other CPL under the
        # same variant, which leaves an engine of the route's machine shape in the pool
        # (unless the variant refuses the route, and then it refuses it below as well); a
        # CPL0-only route (MOV CR8) cannot be built at CPL3, so it warms up at CPL0 too
        other = cpl if get_route(route).cpl0_only else 3 - cpl
        _observe(SimBackend(dirty_opts, engines=pool), dirty_route, 3 - cpl)
        _observe(SimBackend(SimOptions(variant=opts.variant), engines=pool), route, other)
        before = pool.reused
        reused = _observe(SimBackend(opts, engines=pool), route, cpl)
        assert pool.reused == before + 1 or "open" in reused
    assert reused == fresh
