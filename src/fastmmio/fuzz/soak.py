"""Soak: a great many notifications through each ioeventfd route, none lost, none to userspace.

For every route of the catalogue whose doorbell is meant to end in the kernel (an ioeventfd,
one signal and no userspace exit per notification, upstream KVM, supported by this host's
capabilities), run the route's doorbell loop for ``notifications`` accesses in batches on
real KVM and check, batch by batch, with the same checks as ``fastmmio bench``
(:func:`fastmmio.bench.check_batch`): the eventfd counter went up by exactly the number of
notifications (``ioeventfd_write()`` signals once per matching write, virt/kvm/eventfd.c),
no KVM_RUN returned to userspace except the done OUT, and the guest's batch counter agrees.
The vCPU's binary stats give the number of exits KVM handled in the kernel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastmmio.bench import Checker, check_batch
from fastmmio.errors import FastmmioError, HostError, UsageError
from fastmmio.routes import EVENTFD_NAME, Route, build_machine, get_route, load_catalogue

DEFAULT_NOTIFICATIONS = 1_000_000
DEFAULT_BATCH = 50_000
# Watchdog bound per batch: a notification in the kernel costs ~28 us on the slowest host seen
# (PVM, nested); 200 us each leaves room for a loaded machine.
WORST_SECONDS_PER_NOTIFICATION = 200e-6


def is_soak_route(route: Route) -> bool:
    """An ioeventfd route that must stay in the kernel: one eventfd signal and no userspace
    exit per notification, on upstream KVM."""
    e = route.expect
    return (
        route.upstream
        and route.ioeventfd is not None
        and e.eventfd == 1
        and e.user_exits == 0
        and not e.coalesced
    )


def soak_routes(device: str = "/dev/kvm") -> tuple[list[Route], list[tuple[Route, str]]]:
    """The soak routes this host can run, and those it cannot with the reason."""
    from fastmmio.real.host import unsupported_reason
    from fastmmio.real.objects import Kvm

    chosen, skipped = [], []
    with Kvm(device) as kvm:
        for route in load_catalogue():
            if not is_soak_route(route):
                continue
            reason = unsupported_reason(kvm, route)
            (skipped.append((route, reason)) if reason else chosen.append(route))
    return chosen, skipped


def named_soak_routes(names: list[str]) -> list[Route]:
    """The routes called ``names``; UsageError for an unknown name or a route that is not an
    in-kernel ioeventfd route (listing those that are)."""
    routes = [get_route(n) for n in names]
    for r in routes:
        if not is_soak_route(r):
            raise UsageError(f"route {r.name} is not an in-kernel ioeventfd route; soak routes: "
                             + ", ".join(x.name for x in load_catalogue() if is_soak_route(x)))
    return routes


@dataclass
class SoakResult:
    route: str
    notifications: int
    signals: int = 0
    user_exits: int = 0
    kernel_exits: int = 0  # the vCPU's "exits" stat over the batches (0 if stats are missing)
    batches: int = 0
    seconds: float = 0.0
    checks: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def lost(self) -> int:
        return self.notifications - self.signals

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.signals == self.notifications
            and self.user_exits == 0
            and not any(c.startswith("FAIL") for c in self.checks)
        )

    def line(self) -> str:
        us = self.seconds / self.notifications * 1e6 if self.notifications else 0.0
        status = "ok" if self.ok else "FAIL"
        text = (
            f"{self.route:20} {self.notifications:>9} notifications  {self.signals:>9} signals  "
            f"lost {self.lost:>3}  user exits {self.user_exits:>3}  kernel exits {self.kernel_exits:>9}  "
            f"{self.seconds:7.1f} s  {us:6.1f} us/notification  {status}"
        )
        return text + (f"  ({self.error})" if self.error else "")


def soak_route(
    route: Route,
    notifications: int = DEFAULT_NOTIFICATIONS,
    batch: int = DEFAULT_BATCH,
    device: str = "/dev/kvm",
    cpl: int | None = None,
    on_batch: Callable[[SoakResult], None] | None = None,
) -> SoakResult:
    """Run ``notifications`` accesses of ``route`` in batches of at most ``batch``; a
    GuestError or an ioeventfd refusal is recorded in the result, not raised."""
    from fastmmio.real.backend import RealBackend
    from fastmmio.real.host import detect_host

    if notifications < 1 or batch < 1:
        raise UsageError("notifications and batch must be at least 1")
    if not is_soak_route(route):
        raise UsageError(f"route {route.name} is not an in-kernel ioeventfd route")
    if cpl is None:
        cpl = detect_host(device).guest_cpl
    result = SoakResult(route.name, notifications)
    watchdog_s = max(10.0, 2 * min(batch, notifications) * WORST_SECONDS_PER_NOTIFICATION + 5)
    checker = Checker()
    t0 = time.perf_counter()
    try:
        with RealBackend(device, watchdog_s=watchdog_s).open(build_machine(route, cpl)) as session:
            remaining = notifications
            while remaining:
                n = min(batch, remaining)
                res = session.run_batch(n)
                result.batches += 1
                check_batch(route, res, session, result.batches, checker)
                result.signals += res.eventfd_signals.get(EVENTFD_NAME, 0)
                result.user_exits += res.user_exits
                result.kernel_exits += res.kvm_stats.get("exits", 0)
                remaining -= n
                result.seconds = time.perf_counter() - t0
                if on_batch is not None:
                    on_batch(result)
    except HostError:
        raise
    except FastmmioError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - t0
    result.checks = checker.lines()
    return result


def soak(
    names: list[str] | None = None,
    notifications: int = DEFAULT_NOTIFICATIONS,
    batch: int = DEFAULT_BATCH,
    device: str = "/dev/kvm",
    cpl: int | None = None,
    on_result: Callable[[SoakResult], None] | None = None,
    on_skip: Callable[[Route, str], None] | None = None,
) -> list[SoakResult]:
    """:func:`soak_route` over the named routes (default: every soak route this host runs)."""
    if names:
        routes = named_soak_routes(names)
    else:
        routes, skipped = soak_routes(device)
        for r, why in skipped:
            if on_skip is not None:
                on_skip(r, why)
        if not routes:
            raise HostError("no ioeventfd route of the catalogue can run on this host")
    results = []
    for r in routes:
        res = soak_route(r, notifications, batch, device, cpl)
        results.append(res)
        if on_result is not None:
            on_result(res)
    return results
