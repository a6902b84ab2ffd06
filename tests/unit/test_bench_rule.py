"""The measuring rule of fastmmio.bench (StopRule): when a route's runs are enough, on
synthetic sequences (stable, an outlier, drifting, bimodal, bounded by runs and by time); the
interleaving of routes across runs; pinning the vCPU thread (--cpu); and the report's flag (a
noisy route gets no ratio to PIO)."""

from __future__ import annotations

import io
import math
import os
import statistics

import pytest
from rich.console import Console

from fastmmio.bench import BenchOptions, StopRule, bench_routes, measure_route, median_interval
from fastmmio.cli import main
from fastmmio.errors import UsageError
from fastmmio.result import HostInfo, RunResult
from fastmmio.routes import get_route
from test_routes_bench import ScriptedBackend, ScriptedSession

WARMUP = 64  # the warm-up batch of a fixed N (bench.WARMUP_ITERATIONS); the runs use N = 100
N = 100


def settle(rule: StopRule, seq: list[float]):
    """Feed ``seq`` run by run to the rule: (runs used, why it stopped, its spread)."""
    for n in range(1, len(seq) + 1):
        why = rule.stop(seq[:n])
        if why is not None:
            return n, why, rule.assess(seq[:n])
    raise AssertionError("the rule never stopped")


def test_a_stable_sequence_stops_at_min_runs():
    seq = [1000, 1008, 995, 1003, 999] + [1000] * 50
    n, why, s = settle(StopRule(), seq)
    assert (n, why) == (5, "stable") and s.stable
    assert s.median == 1000 and s.ci_rel <= 0.05 and s.runs == 5


def test_one_preempted_run_is_outvoted_by_more_runs():
    """At 5 runs the median's interval is min-max and holds the outlier; a few more runs
    exclude it, and the median is the undisturbed one."""
    seq = [1000, 1010, 2500, 990, 1005, 1000, 995, 1008, 1002, 997, 1001, 1003] + [1000] * 20
    n, why, s = settle(StopRule(), seq)
    assert why == "stable" and 5 < n <= 10
    assert s.max == 2500 and s.ci_high < 1100 and abs(s.median - 1000) < 10


def test_a_drifting_sequence_is_noisy_at_the_run_bound():
    seq = [1000 * 1.03 ** i for i in range(40)]
    n, why, s = settle(StopRule(max_runs=30), seq)
    assert (n, why) == (30, "max runs") and not s.stable
    assert "confidence interval" in s.reason


def test_a_median_still_moving_is_not_stable():
    """Interval within the tolerance, but the running median moved 3.8% over the last 3 runs
    (more than half the 5% tolerance)."""
    s = StopRule().assess([100, 100, 104, 104, 104])
    assert s.ci_rel <= 0.05 and s.median_moved > 0.025
    assert not s.stable and "still moved" in s.reason


def test_a_bimodal_sequence_never_settles():
    seq = [1000, 2000] * 30
    n, why, s = settle(StopRule(max_runs=40), seq)
    assert (n, why) == (40, "max runs") and not s.stable
    assert s.ci_low == 1000 and s.ci_high == 2000


def test_a_minority_mode_does_not_move_the_median():
    """One run in five at twice the cost (a neighbour's time slice): the median's interval
    leaves the minority out once there are enough runs."""
    seq = ([1000, 1002, 998, 1001, 2000] * 10)
    n, why, s = settle(StopRule(), seq)
    assert why == "stable" and n <= 15 and s.median < 1010


def test_run_bound_and_too_few_runs():
    n, why, s = settle(StopRule(max_runs=7), [1000, 2000] * 10)
    assert (n, why, s.stable) == (7, "max runs", False)
    one = StopRule(max_runs=1).assess([1000])
    assert not one.stable and "1 run" in one.reason  # one run shows no spread
    n, why, s = settle(StopRule(max_runs=3), [1000] * 5)
    assert (n, why, s.stable) == (3, "stable", True)  # --runs 3: three runs are the minimum


def test_median_interval_is_the_sign_test_interval():
    """Order statistics [x(k), x(n+1-k)], 2 P(Binomial(n, 1/2) <= k-1) <= 5% (Conover 3.2)."""
    assert median_interval(range(1, 6)) == (1, 5, 1 - 2 / 32)  # n=5: min-max, 93.75%
    lo, hi, cov = median_interval(range(1, 11))
    assert (lo, hi) == (2, 9) and cov == pytest.approx(1 - 2 * 11 / 1024)
    lo, hi, cov = median_interval(range(1, 31))
    assert (lo, hi) == (10, 21) and cov >= 0.95


def test_bad_rules_are_usage_errors():
    for kw in (dict(tolerance=0), dict(tolerance=1.5), dict(max_runs=0), dict(max_seconds=0)):
        with pytest.raises(UsageError):
            StopRule(**kw)


# --------------------------------------------------------------------------------------------
# bench_routes: interleaving and the bounds, on a scripted KVM
# --------------------------------------------------------------------------------------------


class SeqBackend(ScriptedBackend):
    """Sessions open in the order of ``order``; run batches (N) of a route cost the next value
    of its sequence per notification; every batch advances a fake clock by ``step`` s."""

    def __init__(self, order, seqs, step=1.0, **kw):
        super().__init__(**kw)
        self.order, self.seqs, self.step, self.now = list(order), seqs, step, 0.0
        self.log: list[tuple[str, int]] = []
        self.affinity: list[set[int]] = []

    def clock(self) -> float:
        return self.now

    def open(self, machine):
        name = self.order.pop(0)
        self._route = name
        s = super().open(machine)
        values = iter(self.seqs[name])
        orig = s.run_batch

        def run_batch(n):
            self.now += self.step
            self.affinity.append(os.sched_getaffinity(0))  # the thread that "runs KVM_RUN"
            self.log.append((name, n))
            b = orig(n)
            if n == N:
                b.ticks = int(next(values) * n)
            return b

        s.run_batch = run_batch
        return s


def _bench(names, seqs, **opts):
    backend = SeqBackend(names, seqs, step=opts.pop("step", 1.0))
    seen = []
    results = bench_routes(backend, [get_route(n) for n in names], 3,
                           BenchOptions(iterations=N, **opts), on_result=seen.append,
                           clock=backend.clock)
    return results, backend, seen


ROUTES = ("pio-eventfd-len1", "mmio-eventfd-len0", "cpuid")


def test_routes_are_interleaved_run_by_run():
    seqs = {"pio-eventfd-len1": [8000] * 50, "mmio-eventfd-len0": [7000, 14000] * 25,
            "cpuid": [9000] * 50}
    results, backend, seen = _bench(ROUTES, seqs, runs=8)
    runs = [name for name, n in backend.log if n == N]
    warm = [name for name, n in backend.log if n == WARMUP]
    assert warm == list(ROUTES)  # every route is set up first
    assert backend.log[:3] == [(r, WARMUP) for r in ROUTES]
    # rounds 1-5: every route; then only the one that is not stable, up to 8 runs
    assert runs == list(ROUTES) * 5 + ["mmio-eventfd-len0"] * 3
    assert [r.route for r in results] == list(ROUTES)  # results in the routes' order
    assert [r.route for r in seen] == ["pio-eventfd-len1", "cpuid", "mmio-eventfd-len0"]
    stable = {r.route: r.spread.stable for r in results}
    assert stable == {"pio-eventfd-len1": True, "mmio-eventfd-len0": False, "cpuid": True}
    noisy = results[1]
    assert noisy.noisy and noisy.spread.stopped_by == "max runs" and noisy.spread.runs == 8
    assert noisy.extra["runs_cycles"] == [7000.0, 14000.0] * 4
    assert results[0].spread.stopped_by == "stable" and results[0].cycles == 8000
    assert "95% confidence interval" in results[0].spread.rule


def test_the_time_bound_stops_every_route():
    seqs = {n: [1000, 2000] * 100 for n in ROUTES}
    results, backend, _ = _bench(ROUTES, seqs, runs=100, max_seconds=20.0)
    # 3 warm-ups, then rounds of 3 batches (1 s each) while less than 20 s have passed
    for r in results:
        assert r.spread.stopped_by == "time bound" and not r.spread.stable
        assert r.spread.runs == 6  # the round starting at 3+5*3 = 18 s runs, the next does not
    assert backend.now == pytest.approx(3 + 6 * 3)


def test_every_route_gets_one_run_even_past_the_time_bound():
    seqs = {n: [1000] * 10 for n in ROUTES}
    results, _, _ = _bench(ROUTES, seqs, runs=10, max_seconds=1.0)
    assert [r.spread.runs for r in results] == [1, 1, 1]
    assert all(r.noisy and "the rule needs 5" in r.spread.reason for r in results)
    assert all(not math.isnan(r.cycles) for r in results)


def test_priced_runs_get_no_spread():
    """The simulator's priced runs are deterministic: no spread, never noisy."""
    backend = ScriptedBackend(ticks=False)
    backend._route = "cpuid"
    r = measure_route(backend, get_route("cpuid"), 3, BenchOptions(iterations=10, runs=1),
                      price=lambda b: 1234.0 * b.iterations)
    assert r.spread is None and not r.noisy


# --------------------------------------------------------------------------------------------
# --cpu: validation and pinning
# --------------------------------------------------------------------------------------------


def test_pinning_is_applied_in_the_thread_that_runs_the_batches_and_undone():
    before = os.sched_getaffinity(0)
    cpu = max(before)
    seqs = {n: [1000] * 10 for n in ROUTES}
    results, backend, _ = _bench(ROUTES, seqs, runs=5, cpu=cpu)
    assert backend.affinity and all(a == {cpu} for a in backend.affinity)
    assert os.sched_getaffinity(0) == before
    assert results[0].extra["cpu"] == cpu
    backend = SeqBackend(["cpuid"], {"cpuid": [1000] * 10})
    measure_route(backend, get_route("cpuid"), 3, BenchOptions(iterations=N, runs=5, cpu=cpu),
                  clock=backend.clock)
    assert all(a == {cpu} for a in backend.affinity) and os.sched_getaffinity(0) == before


def test_pinning_is_undone_after_an_error():
    before = os.sched_getaffinity(0)

    class Broken(ScriptedBackend):
        def open(self, machine):
            raise UsageError("boom")

    with pytest.raises(UsageError):
        bench_routes(Broken(), [get_route("cpuid")], 3,
                     BenchOptions(iterations=10, cpu=min(before)))
    assert os.sched_getaffinity(0) == before


def _bad_cpu() -> int:
    return max(os.sched_getaffinity(0)) + 1


def test_a_cpu_outside_the_affinity_mask_is_refused():
    with pytest.raises(UsageError, match="not a CPU this process may run on"):
        BenchOptions(cpu=_bad_cpu())


@pytest.mark.parametrize("command", [
    ["bench", "--device", "/nonexistent/kvm", "cpuid"],
    ["compare", "--no-kvm", "cpuid", "--variants", "upstream"],
])
def test_bad_cpu_on_the_command_line_is_one_line_and_exit_2(command, tmp_path, capsys):
    code = main([*command, "--cpu", str(_bad_cpu()), *(["--out", str(tmp_path)]
                                                       if command[0] == "compare" else [])])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "not a CPU this process may run on" in err
    assert "--cpu" in err
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


def test_negative_or_non_numeric_cpu_is_an_argument_error(capsys):
    for bad in ("-1", "one"):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "--cpu", bad, "cpuid"])
        assert exc.value.code == 2
        assert "argument --cpu" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# the report: spread shown, a noisy route gets no ratio
# --------------------------------------------------------------------------------------------


def _kvm_result(route: str, runs: list[float]) -> RunResult:
    s = StopRule().assess(runs)
    return RunResult(route=route, backend="kvm", cycles=statistics.median(runs),
                     cycles_spread=(min(runs), max(runs)), iterations=100, eventfd_signals=0,
                     user_exits=0, correct=True, spread=s, extra={"runs_cycles": runs})


def _text(renderable) -> str:
    out = Console(file=io.StringIO(), width=300, record=True)
    out.print(renderable)
    return out.export_text()


def test_a_noisy_route_gets_no_ratio_in_compare(tmp_path):
    from fastmmio.compare.run import CompareOptions, KvmSide, run_compare
    from fastmmio.report.compare import _csv_rows, detail_tables, kvm_line, results_json

    routes = ("pio-eventfd-len1", "mmio-eventfd-len0", "cpuid")
    run = run_compare(CompareOptions(routes=routes, variants=("upstream",), kvm=False,
                                     verdict=False))
    host = HostInfo("cpu", 2_600_000, "6.x", "pvm", True, 3, "PVM")
    run.kvm = KvmSide("measured", host=host, results=[
        _kvm_result("pio-eventfd-len1", [8000, 8010, 7990, 8005, 7995]),
        _kvm_result("mmio-eventfd-len0", [7000, 14000] * 5),  # noisy
        _kvm_result("cpuid", [9000, 9010, 8990, 9005, 8995]),
    ])
    assert run.kvm.ratio_to_pio("cpuid") == pytest.approx(9000 / 8000)
    assert run.kvm.ratio_to_pio("mmio-eventfd-len0") is None
    (table,) = detail_tables(run, 300)
    text = _text(table)
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert "noisy" in rows["mmio-eventfd-len0"]
    assert "1.12" not in rows["mmio-eventfd-len0"] and "1.12" in rows["cpuid"]
    assert "+-" in rows["cpuid"] and "noisy" not in rows["cpuid"]
    assert "confidence interval" in text  # the rule is stated under the table
    assert "noisy (no ratio to PIO): mmio-eventfd-len0" in kvm_line(run)
    csv = {r["route"]: r for r in _csv_rows(run, []) if r["backend"] == "kvm"}
    assert csv["mmio-eventfd-len0"]["kvm_stable"] == 0 and csv["cpuid"]["kvm_stable"] == 1
    assert csv["mmio-eventfd-len0"]["ratio_to_pio"] is None
    doc = results_json(run, [])
    rec = {r["route"]: r for r in doc["kvm"]}
    assert rec["mmio-eventfd-len0"]["spread"]["stable"] is False
    assert rec["cpuid"]["spread"]["runs"] == 5 and rec["cpuid"]["spread"]["rule"]


def test_a_noisy_pio_reference_leaves_every_kvm_ratio_out():
    from fastmmio.compare.run import KvmSide

    side = KvmSide("measured", results=[_kvm_result("pio-eventfd-len1", [8000, 16000] * 5),
                                        _kvm_result("cpuid", [9000] * 5)])
    assert side.ratio_to_pio("cpuid") is None


def test_bench_table_shows_the_spread_and_flags_noise():
    from fastmmio.report.bench import bench_table

    text = _text(bench_table([_kvm_result("cpuid", [9000, 9010, 8990, 9005, 8995]),
                              _kvm_result("pio-user", [70000, 140000] * 5)]))
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert "noisy" in rows["pio-user"] and "noisy" not in rows["cpuid"]
    assert "+-0.1%" in rows["cpuid"]
