"""The simulations of ``compare`` and ``sweep`` on a Dask cluster (:mod:`fastmmio.fanout`).

A run plans its simulations first (route x machine setting); :func:`prefill` sends the ones
its :class:`~fastmmio.compare.core.Comparison` has not simulated yet to the cluster as tasks,
each a batch of simulations of the same route (one machine shape: a worker that keeps its
simulator session between simulations of one shape reuses it across the batch), gathers the
:class:`~fastmmio.compare.core.SimRun` of each, and records them in the comparison in the
plan's order. The run's own loop then finds every simulation done and prices, orders and
judges exactly as in a serial run: a simulation is deterministic (its events depend only on
the route and the machine setting), so the results are the serial run's, apart from the
timings.
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

TASKS_PER_WORKER = 16  # batches per worker: the last ones balance the load; a task costs ~ms


_local = threading.local()


def _engines() -> EnginePool:
    """This worker thread's engine pool, kept between tasks (a pool serves one thread)."""
    pool = getattr(_local, "engines", None)
    if pool is None:
        pool = _local.engines = EnginePool()
    return pool


def simulate_batch(batch: Sequence[tuple[str, SimOptions]], profile: Profile, iterations: int,
                   cpl: int) -> list[SimRun]:
    """The task: simulate each (route name, options) of ``batch`` in this process, in order,
    on this thread's unicorn engines (set up once per machine shape and reused, as a serial
    run reuses them)."""
    comparison = Comparison(profile, iterations=iterations, cpl=cpl, engines=_engines())
    return [comparison.simulate(get_route(name), opts) for name, opts in batch]


def batches(todo: Sequence[tuple[str, SimOptions]], n_tasks: int) -> list[list[tuple[str, SimOptions]]]:
    """``todo`` grouped by route (the machine shape; first appearance order), then cut into
    about ``n_tasks`` batches of consecutive simulations."""
    order: dict[str, list[tuple[str, SimOptions]]] = {}
    for item in todo:
        order.setdefault(item[0], []).append(item)
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
    todo: list[tuple[str, SimOptions]] = []
    seen: set[tuple] = set()
    for route, opts in plan:
        name = route.name if isinstance(route, Route) else route
        key = sim_key(name, opts)
        if key not in seen and not comparison.simulated(name, opts):
            seen.add(key)
            todo.append((name, opts))
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
                                 cpl=comparison.cpl)
    runs = {sim_key(r.route.name, r.options): r for batch in results for r in batch}
    for name, opts in todo:
        comparison.record(runs[sim_key(name, opts)])
    return len(todo)


__all__ = ["batches", "prefill", "simulate_batch"]
