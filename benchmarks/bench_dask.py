"""Serial vs Dask: a sweep of at least 200 simulations, run serially in this process and on a
LocalCluster of ``--workers`` worker processes (default 2: this machine's cores), rounds
alternating so that a change of the machine's load hits both sides alike.

Per round and side: the wall time of :func:`fastmmio.compare.sweep.run_sweep` (simulation,
pricing, ratios; no files), and for the cluster its start-up (LocalCluster and Client up,
every worker having imported the simulator: what ``--workers N`` costs before the first
simulation) and its shut-down. Printed: each round with the load average, the medians, the
speed-up without and with the start-up, and whether the cluster's points equal the serial
ones (cycles and ratios, which they must).

CPU time is measured too: the serial sweep's (this process), and during the cluster's sweep
each worker process's and this process's (the client and the local scheduler). On a machine
shared with other users' jobs the wall-time speed-up says little: Linux's autogroup scheduling
(``/proc/sys/kernel/sched_autogroup_enabled``) shares the CPUs between sessions, and the
workers belong to this session, so while other sessions keep both cores busy the cluster gets
about the CPU share one process would. The CPU split shows what the cluster would do on free
cores: the projected speed-up is the serial CPU time over the busiest worker's.

A small run (``--small`` simulations, default 8) is measured the same way, with the cluster's
start-up counted: it decides whether ``--workers`` should default to a cluster.

    .venv/bin/python benchmarks/bench_dask.py [--rounds 3] [--workers 2] [--values 50] [--small 8]

The machine may be shared: the load average is printed with every round; run it under
``nice`` only as a whole (both sides then run under it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from fastmmio import fanout
from fastmmio.compare.sweep import Base, run_sweep

ROUTES = ("pio-eventfd-len1", "mmio-eventfd-len0")
VARIANTS = ("upstream", "rfc-2015")


def warm() -> None:
    """Import what a simulation needs (run on each worker as part of the start-up)."""
    import fastmmio.compare.parallel  # noqa: F401
    import fastmmio.sim.backend  # noqa: F401


def sweep(values: int, client) -> tuple[float, float, list]:
    """(wall seconds, this process's CPU seconds, points)."""
    t0, c0 = time.perf_counter(), time.process_time()
    res = run_sweep([("ioeventfds", list(range(values)))], routes=ROUTES, variants=VARIANTS,
                    base=Base(), iterations=16, client=client)
    return (time.perf_counter() - t0, time.process_time() - c0,
            [(p.values, p.variant, p.route, p.cell.cycles, p.ratio) for p in res.points])


def on_cluster(workers: int, values: int) -> dict:
    """start-up, sweep, shut-down seconds; the client's and each worker's CPU seconds during
    the sweep; the points."""
    t0 = time.perf_counter()
    ctx = fanout.open_client(workers)
    client = ctx.__enter__()
    try:
        client.run(warm)
        cpu0 = client.run(time.process_time)
        t1 = time.perf_counter()
        wall, client_cpu, points = sweep(values, client)
        cpu1 = client.run(time.process_time)
    finally:
        t2 = time.perf_counter()
        ctx.__exit__(None, None, None)
    return {"start": t1 - t0, "wall": wall, "stop": time.perf_counter() - t2, "points": points,
            "client_cpu": client_cpu, "worker_cpu": sorted(cpu1[w] - cpu0[w] for w in cpu1)}


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--values", type=int, default=50, help="ioeventfds values: simulations = 4 x this")
    ap.add_argument("--small", type=int, default=8, help="simulations of the small run (multiple of 4)")
    args = ap.parse_args()
    n = 4 * args.values
    print(f"bench_dask: sweep of {n} simulations ({len(ROUTES)} routes x {len(VARIANTS)} variants x "
          f"{args.values} ioeventfd counts, N=16), serial vs LocalCluster({args.workers}); "
          f"{os.cpu_count()} CPUs; nice {os.nice(0)}", flush=True)
    sweep(1, None)  # warm this process's imports as the workers' start-up warms theirs
    serial, par, start, stop, projected = [], [], [], [], []
    same = True
    for i in range(args.rounds):
        l0 = load()
        s, s_cpu, ref = sweep(args.values, None)
        l1 = load()
        c = on_cluster(args.workers, args.values)
        same &= c["points"] == ref
        p, st = c["wall"], c["start"]
        serial.append(s), par.append(p), start.append(st), stop.append(c["stop"])
        projected.append(s_cpu / max(c["worker_cpu"]))
        print(f"round {i + 1}: serial {s:6.1f} s wall, {s_cpu:5.1f} s CPU ({l0}) | cluster "
              f"start-up {st:4.1f} s, sweep {p:6.1f} s wall, shut-down {c['stop']:4.1f} s; CPU: "
              f"workers {', '.join(f'{x:.1f}' for x in c['worker_cpu'])} s, client "
              f"{c['client_cpu']:.1f} s ({l1}); wall speed-up {s / p:.2f}x "
              f"({s / (st + p):.2f}x with start-up), projected on free cores "
              f"{projected[-1]:.2f}x", flush=True)
    ms, mp, mst = statistics.median(serial), statistics.median(par), statistics.median(start)
    print(f"medians: serial {ms:.1f} s, cluster {mp:.1f} s + start-up {mst:.1f} s "
          f"(shut-down {statistics.median(stop):.1f} s)")
    print(f"points identical to the serial run: {'yes' if same else 'NO'}")
    if args.small:
        v = max(1, args.small // 4)
        s_small = [sweep(v, None)[0] for _ in range(args.rounds)]
        c_small = []
        for _ in range(args.rounds):
            c = on_cluster(args.workers, v)
            c_small.append(c["start"] + c["wall"] + c["stop"])
        print(f"small run ({4 * v} simulations): serial {statistics.median(s_small):.2f} s, "
              f"cluster incl. start-up and shut-down {statistics.median(c_small):.2f} s")
    print(f"speed-up {ms / mp:.2f}x wall (goal >= 1.7x), {ms / (mp + mst):.2f}x counting the "
          f"start-up; projected on free cores (serial CPU / busiest worker's CPU) "
          f"{statistics.median(projected):.2f}x; cluster start-up overhead {mst:.1f} s ({load()})")


if __name__ == "__main__":
    main()
