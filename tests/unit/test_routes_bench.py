"""fastmmio.bench against a scripted backend: calibration as kvm-unit-tests x86/vmexit.c does
it (doubling from 64 until a batch reaches the goal), medians, and the correctness checks
built from each route's expectations (any deviation must fail the route)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import pytest

from fastmmio import layout
from fastmmio.bench import (
    START_ITERATIONS,
    BenchOptions,
    bench_routes,
    measure_route,
)
from fastmmio.errors import GuestError, UsageError
from fastmmio.report.bench import bench_table, json_records, kut_lines
from fastmmio.result import BatchResult, ExitRecord, HostInfo
from fastmmio.routes import EVENTFD_NAME, Route, get_route


@dataclass
class Faults:
    """Ways the scripted KVM can misbehave."""

    eventfd_delta: int = 0
    exit_delta: int = 0
    exit_data: int | None = None
    ro_write: bool = False
    read_value: int | None = None
    skip_counter: bool = False
    guest_error_at: int | None = None  # batch number that raises GuestError


@dataclass
class ScriptedSession:
    """A perfect KVM for the route (each access does exactly what the route expects), with a
    linear cost model ``ticks = overhead + cost * N`` and injectable faults."""

    route: Route
    cost: float
    overhead: int
    faults: Faults
    ticks: bool = True
    mem: dict[int, bytes] = field(default_factory=dict)
    batches: int = 0
    sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mem[layout.RO_BASE] = bytes([layout.RO_PATTERN]) * layout.RO_SIZE
        self._mailbox = bytearray(0x40)

    def run_batch(self, n: int) -> BatchResult:
        self.batches += 1
        self.sizes.append(n)
        f, e = self.faults, self.route.expect
        if f.guest_error_at == self.batches:
            raise GuestError("guest shut down (KVM_EXIT_SHUTDOWN) at RIP 0x10029")
        if not f.skip_counter:
            struct.pack_into("<Q", self._mailbox, layout.MAILBOX_BATCHES, self.batches)
        if e.read_value is not None:
            value = e.read_value if f.read_value is None else f.read_value
            struct.pack_into("<Q", self._mailbox, layout.MAILBOX_LAST_READ, value)
        if f.ro_write:
            ro = bytearray(self.mem[layout.RO_BASE])
            ro[3] = 0
            self.mem[layout.RO_BASE] = bytes(ro)
        user = e.user_exits * n + f.exit_delta
        coalesced = 0
        if e.coalesced:
            user, coalesced = n // 100, n - n // 100
        exits = []
        if e.exit is not None:
            data = e.exit.data if f.exit_data is None else f.exit_data
            exits = [ExitRecord(e.exit.kind, e.exit.addr, e.exit.size, e.exit.is_write, data)] * min(user, 64)
        signals = {EVENTFD_NAME: e.eventfd * n + f.eventfd_delta} if self.route.ioeventfd else {}
        return BatchResult(
            iterations=n,
            ticks=int(self.overhead + self.cost * n) if self.ticks else None,
            user_exits=user,
            eventfd_signals=signals,
            exits=exits,
            coalesced_entries=coalesced,
            kvm_stats={"exits": n},
        )

    def read_guest(self, gpa: int, size: int) -> bytes:
        if layout.MAILBOX_GPA <= gpa < layout.MAILBOX_GPA + 0x40:
            off = gpa - layout.MAILBOX_GPA
            return bytes(self._mailbox[off : off + size])
        if gpa == layout.RO_BASE:
            return self.mem[layout.RO_BASE][:size]
        raise AssertionError(f"unexpected read at {gpa:#x}")

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class ScriptedBackend:
    cost: float = 1000.0
    overhead: int = 0
    faults: Faults = field(default_factory=Faults)
    ticks: bool = True
    name: str = "scripted"
    sessions: list[ScriptedSession] = field(default_factory=list)
    _route: str = ""  # the route whose expectations the scripted KVM fulfils

    def open(self, machine):
        s = ScriptedSession(get_route(self._route), self.cost, self.overhead, self.faults, self.ticks)
        self.sessions.append(s)
        return s


def run(route_name: str, backend: ScriptedBackend | None = None, **opts):
    backend = backend or ScriptedBackend()
    backend._route = route_name
    return measure_route(backend, get_route(route_name), 3, BenchOptions(**opts)), backend


@pytest.mark.parametrize("cost,target", [(1000.0, 1 << 20), (65000.0, 1 << 28), (1.0, 1 << 22), (3.0, 5000)])
def test_calibration_reaches_the_goal_like_vmexit_c(cost, target):
    """x86/vmexit.c: iterations double from 64 until a batch takes at least the goal; the
    result is the first power-of-two multiple of 64 that reaches it."""
    result, backend = run("mmio-eventfd-len0", ScriptedBackend(cost=cost), target_ticks=target, runs=3)
    expected = START_ITERATIONS
    while expected * cost < target:
        expected *= 2
    assert result.iterations == expected
    sizes = backend.sessions[0].sizes
    assert sizes[0] == START_ITERATIONS
    assert sizes[-3:] == [expected] * 3  # the runs
    calib = result.extra["calibration"]
    assert [c[0] for c in calib] == sizes[:-3]
    assert all(c[1] < target for c in calib[:-1]) and calib[-1][1] >= target
    assert all(b == 2 * a or b > 2 * a for a, b in zip(sizes, sizes[1:len(calib)]))
    assert result.cycles == pytest.approx(cost)


def test_fixed_iterations_warm_up_then_runs():
    result, backend = run("pio-user", iterations=200, runs=4)
    assert backend.sessions[0].sizes == [64, 200, 200, 200, 200]
    assert result.iterations == 200 and result.extra["target_ticks"] is None
    assert result.correct, result.checks


def test_median_and_spread_over_runs():
    class Noisy(ScriptedBackend):
        def open(self, machine):
            s = super().open(machine)
            seq = iter([0, 900, 100, 500, 300])  # warm-up, then four runs

            orig = s.run_batch

            def run_batch(n):
                b = orig(n)
                b.ticks += next(seq) * n
                return b

            s.run_batch = run_batch
            return s

    result, _ = run("cpuid", Noisy(cost=1000.0), iterations=10, runs=4)
    assert result.extra["runs_cycles"] == [1900.0, 1100.0, 1500.0, 1300.0]
    assert result.cycles == 1400.0
    assert result.cycles_spread == (1100.0, 1900.0)


@pytest.mark.parametrize("name", ["pio-user", "mmio-eventfd-len0", "ro-write", "ro-read",
                                  "mmio-read-user", "coalesced-mmio", "mmio-datamatch-miss", "empty"])
def test_a_correct_kvm_passes(name):
    result, _ = run(name, iterations=100, runs=2)
    assert result.correct, result.checks
    assert not any(c.startswith("FAIL") for c in result.checks)
    assert result.checks  # something was checked


@pytest.mark.parametrize(
    "name,faults,what",
    [
        ("mmio-eventfd-len0", Faults(eventfd_delta=-1), "eventfd signals"),
        ("pio-datamatch", Faults(eventfd_delta=1), "eventfd signals"),
        ("pio-eventfd-len1", Faults(exit_delta=1), "user exits"),
        ("mmio-user", Faults(exit_delta=-1), "user exits"),
        ("mmio-user", Faults(exit_data=7), "exit records"),
        ("ro-write", Faults(ro_write=True), "read-only memslot unchanged"),
        ("ro-read", Faults(read_value=0), "read value"),
        ("mmio-read-user", Faults(read_value=0x88), "read value"),
        ("empty", Faults(skip_counter=True), "guest batch counter"),
    ],
)
def test_every_deviation_fails_the_route(name, faults, what):
    result, _ = run(name, ScriptedBackend(faults=faults), iterations=100, runs=1)
    assert not result.correct
    fails = [c for c in result.checks if c.startswith("FAIL")]
    assert fails and what in fails[0], result.checks


def test_unexpected_exit_on_an_eventfd_route_fails():
    class Leaky(ScriptedBackend):
        def open(self, machine):
            s = super().open(machine)
            orig = s.run_batch

            def run_batch(n):
                b = orig(n)
                b.exits.append(ExitRecord("mmio", layout.DOORBELL_GPA, 1, True, 0))
                return b

            s.run_batch = run_batch
            return s

    result, _ = run("mmio-eventfd-len1", Leaky(), iterations=10, runs=1)
    assert not result.correct
    assert any("unexpected mmio exit" in c for c in result.checks)


def test_price_for_backends_without_ticks():
    backend = ScriptedBackend(ticks=False)
    with pytest.raises(UsageError):
        run("cpuid", backend, iterations=10, runs=1)
    backend = ScriptedBackend(ticks=False)
    backend._route = "cpuid"
    r = measure_route(backend, get_route("cpuid"), 3, BenchOptions(iterations=10, runs=1),
                      price=lambda b: 1234.0 * b.iterations)
    assert r.cycles == 1234.0


def test_bench_routes_records_a_guest_error_and_continues():
    class OneBad(ScriptedBackend):
        def open(self, machine):
            self._route = "pio-user" if "out" in machine.image.program else "cpuid"
            self.faults = Faults(guest_error_at=2) if self._route == "pio-user" else Faults()
            return super().open(machine)

    backend = OneBad()
    results = bench_routes(backend, [get_route("pio-user"), get_route("cpuid")], 3,
                           BenchOptions(iterations=10, runs=1))
    bad, good = results
    assert not bad.correct and math.isnan(bad.cycles) and "GuestError" in bad.checks[0]
    assert good.correct
    host = HostInfo("cpu", 2300000, "6.x", "pvm", True, 3, "PVM")
    records = json_records(results, host)
    text = json.dumps(records, allow_nan=False)  # NaN became null
    assert json.loads(text)[0]["host"]["kvm_kind"] == "pvm"
    assert json.loads(text)[1]["cycles"] is None
    assert kut_lines(results) == [f"cpuid {int(good.cycles)}"]
    bench_table(results, host)  # renders with a failed row


@pytest.mark.parametrize("kwargs", [dict(iterations=0), dict(runs=0), dict(target_ticks=0)])
def test_bad_options(kwargs):
    with pytest.raises(UsageError):
        BenchOptions(**kwargs)
