"""Run-loop overhead: host time per userspace exit spent outside KVM_RUN.

For each userspace-exit route (PIO OUT and MMIO write with no ioeventfd), one batch of N
accesses returns to userspace N times. RunLoop measures the time inside the KVM_RUN ioctl and
the whole batch; the rest is Python: exit dispatch, the device model, recording. Printed per
exit: the whole round trip, the part outside KVM_RUN and its fraction (goal: <= 10 %).

Baseline, measured in the same run on the same machine: a bare loop that only calls KVM_RUN
through the same ctypes function and checks the exit reason and port (no dispatch, no
recording): the least any Python run loop can spend outside the ioctl.

Also printed: guest TSC ticks per access (what the guest sees for one exit round trip), and
the in-kernel ioeventfd route for comparison.

    .venv/bin/python benchmarks/bench_runloop.py [N] [REPEATS]
"""

from __future__ import annotations

import statistics
import struct
import sys
import time

from fastmmio import layout
from fastmmio.errors import HostError
from fastmmio.real import binding as B
from fastmmio.real.backend import RealBackend
from fastmmio.real.host import detect_host
from fastmmio.routes import build_machine, get_route


def bare_loop(session, n: int) -> tuple[int, int]:
    """(total ns, ns inside KVM_RUN) for one batch driven by a minimal loop."""
    vcpu = session.vcpu
    session.write_guest(layout.MAILBOX_GPA + layout.MAILBOX_ITERATIONS, struct.pack("<Q", n))
    run_ioctl, fd, KVM_RUN = B.run_ioctl, vcpu.fd, B.KVM_RUN
    reason = B.u32.from_address(B.ctypes.addressof(vcpu.run_map) + B.kvm_run.exit_reason.offset)
    io = vcpu.run.io
    clock = time.perf_counter_ns
    inside = 0
    start = clock()
    while True:
        t0 = clock()
        r = run_ioctl(fd, KVM_RUN, 0)
        inside += clock() - t0
        if r < 0:
            raise OSError(B.get_errno(), "KVM_RUN")
        if reason.value == B.KVM_EXIT_IO and io.port == layout.DONE_PORT:
            break
    total = clock() - start
    vcpu.pending_completion = True
    return total, inside


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    backend = RealBackend()
    try:
        backend.check()
    except HostError as exc:
        print(f"bench_runloop: skipped: {exc}")
        return 0
    host = detect_host()
    cpl = host.guest_cpl
    khz = host.tsc_khz or 0
    print(f"host: {host.kvm_kind} nested={host.nested} CPL{cpl} TSC {khz / 1e6:.2f} GHz; "
          f"N={n} exits per batch, median of {repeats}")
    print(f"{'route':18} {'loop':8} {'ns/exit':>9} {'outside':>9} {'fraction':>9} {'ticks/access':>13}")
    worst = 0.0
    for name in ("pio-user", "mmio-user", "pio-eventfd-len1"):
        route = get_route(name)
        with backend.open(build_machine(route, cpl)) as s:
            s.run_batch(16)  # warm-up: first faults, first exits
            rows = {"runloop": [], "bare": []}
            ticks = []
            for _ in range(repeats):
                res = s.run_batch(n)
                if route.expect.user_exits:
                    assert res.user_exits == n, res.user_exits
                rows["runloop"].append((res.host_ns, res.host_ns - res.host_ns_outside_run))
                ticks.append(res.ticks / n)
                rows["bare"].append(bare_loop(s, n))
            for label, samples in rows.items():
                total = statistics.median(t for t, _ in samples) / n
                outside = statistics.median(t - i for t, i in samples) / n
                frac = outside / total
                if label == "runloop" and route.expect.user_exits:
                    worst = max(worst, frac)
                print(f"{name:18} {label:8} {total:9.0f} {outside:9.0f} {frac:9.1%} "
                      f"{statistics.median(ticks):13.0f}")
    print(f"worst run-loop fraction outside KVM_RUN on a userspace-exit route: {worst:.1%} "
          f"(goal <= 10%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
