"""The simulations of ``compare`` and ``sweep`` on a Dask cluster (:mod:`fastmmio.fanout`).

A run plans its simulations first (route x machine setting); :func:`prefill` sends the ones
its :class:`~fastmmio.compare.core.Comparison` has not simulated yet to the cluster as tasks,
each a batch of simulations of the same route (one machine shape: a worker that keeps its
simulator session between simulations of one shape reuses it across the batch), gathers the
:class:`~fastmmio.compare.core.SimRun` of each, and records them in the comparison in the
plan's order. The run's own loop then finds every simulation done and prices, orders and
judges exactly as in a serial run: a simulation is deterministic (its events depend only on
the route and the machine setting), so the results are the serial run's, apart from the
timings. A task carries its routes whole and the text of any ``--variant-file`` its
variants come from, so a worker on another host simulates them as this process would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from fastmmio import fanout
from fastmmio.compare.core import Comparison, SimRun, sim_key
from fastmmio.costs import Profile
from fastmmio.routes import Route, get_route
from fastmmio.sim.backend import EnginePool, SimOptions
from fastmmio.sim.kvm.plugins import (
    VariantSource,
    load_installed_variants,
    load_variant_source,
    variant_sources,
)
from fastmmio.sim.kvm.variants import restore_variants, snapshot_variants

TASKS_PER_WORKER = 16  # batches per worker: the last ones balance the load; a task costs ~ms


_local = threading.local()


def _engines() -> EnginePool:
    """This worker thread's engine pool, kept between tasks (a pool serves one thread)."""
    pool = getattr(_local, "engines", None)
    if pool is None:
        pool = _local.engines = EnginePool()
    return pool


def simulate_batch(batch: Sequence[tuple[Route, SimOptions]], profile: Profile, iterations: int,
                   cpl: int, variant_sources: Sequence[VariantSource] = ()) -> list[SimRun]:
    """The task: simulate each (route, options) of ``batch`` in this process, in order, on
    this thread's unicorn engines (set up once per machine shape and reused, as a serial run
    reuses them). The routes travel whole (a ``--routes-file`` route is not in a worker's
    catalogue); the variants are this worker's bundled and installed ones plus those of
    ``variant_sources`` (``--variant-file`` texts), registered for the task only."""
    saved = snapshot_variants()
    try:
        load_installed_variants()
        for vs in variant_sources:
            load_variant_source(vs)
        comparison = Comparison(profile, iterations=iterations, cpl=cpl, engines=_engines())
        return [comparison.simulate(route, opts) for route, opts in batch]
    finally:
        restore_variants(saved)


def batches(todo: Sequence[tuple[Route, SimOptions]], n_tasks: int) -> list[list[tuple[Route, SimOptions]]]:
    """``todo`` grouped by route (the machine shape; first appearance order), then cut into
    about ``n_tasks`` batches of consecutive simulations."""
    order: dict[str, list[tuple[Route, SimOptions]]] = {}
    for item in todo:
        order.setdefault(item[0].name, []).append(item)
    grouped = [item for group in order.values() for item in group]
    size = max(1, -(-len(grouped) // max(1, n_tasks)))
    return fanout.chunks(grouped, size)


def cluster_threads(client: Any) -> int:
    return max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info().get("workers", {}).values()))


def prefill(comparison: Comparison, plan: Sequence[tuple[Route | str, SimOptions]], client: Any,
            on_done: Callable[[int, int], None] | None = None) -> int:
    """Simulate on the cluster every (route, options) of ``plan`` that ``comparison`` has not
    simulated yet, and record the runs in the plan's order; the number simulated.
    ``on_done(simulations done, of total)`` as batches finish. Nothing to do without a
    client (the serial run simulates as it goes)."""
    if client is None:
        return 0
    todo: list[tuple[Route, SimOptions]] = []
    seen: set[tuple] = set()
    for route, opts in plan:
        route = route if isinstance(route, Route) else get_route(route)
        key = sim_key(route.name, opts)
        if key not in seen and not comparison.simulated(route.name, opts):
            seen.add(key)
            todo.append((route, opts))
    if not todo:
        return 0
    work = batches(todo, TASKS_PER_WORKER * cluster_threads(client))
    done = [0]

    def finished(_i: int, runs: list[SimRun]) -> None:
        done[0] += len(runs)
        if on_done is not None:
            on_done(done[0], len(todo))

    results = fanout.map_ordered(client, simulate_batch, work, on_done=finished,
                                 profile=comparison.profile, iterations=comparison.iterations,
                                 cpl=comparison.cpl,
                                 variant_sources=variant_sources(o.variant for _, o in todo))
    runs = {sim_key(r.route.name, r.options): r for batch in results for r in batch}
    for route, opts in todo:
        comparison.record(runs[sim_key(route.name, opts)])
    return len(todo)


__all__ = ["batches", "prefill", "simulate_batch"]
