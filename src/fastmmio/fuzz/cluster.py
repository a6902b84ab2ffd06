"""Fuzzing campaigns spread over a Dask cluster (:mod:`fastmmio.fanout`): each worker runs
its own share of the cases against its own host's ``/dev/kvm``, and the campaign summary adds
the shares up.

``fuzz hostile``
    A share is a range of program indices of the stream ``--seed`` (``hostile.generate(seed,
    i)`` is the same program wherever it runs). Its task runs :func:`runner.campaign` over
    the range on the worker (hang guard armed; no leak checks: a worker's /proc/self also
    holds the worker's own connections and threads) and returns the share's
    :class:`runner.Summary` with the worker's host record. A worker that dies while running a
    share (a hang guard ending it, a host crash, a kill) makes the scheduler re-run the share
    on another worker; a share whose workers keep dying is split into single programs, re-run
    once each, and a program that still kills its worker is reported as a ``lost`` finding:
    only that case is lost.
``fuzz diff``
    A share is one hypothesis run of ``chunk`` examples under the share's own seed (derived
    from ``--seed`` and the share's number, :func:`share_seed`), run by
    :func:`differential.fuzz` on the worker against its host; the first case of each kind of
    disagreement comes back with the worker's host record and address. Shrinking runs on that
    same worker (its host is the one that disagreed). A share whose workers keep dying is
    reported lost with its seed (hypothesis generates a share's cases together, so a share is
    the unit that can be re-run).

The serial path (``--workers 0``, the default for both) is the campaign of
:mod:`fastmmio.fuzz.runner` / :mod:`fastmmio.fuzz.differential` in this process, with leak
checks.
"""

from __future__ import annotations

import collections
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastmmio import fanout

HOSTILE_SHARE = 25  # programs per task: a hostile run takes milliseconds, a task ~1 ms of Dask
DIFF_SHARE = 10  # cases per task: a case takes ~0.1-0.3 s (a simulation and a KVM run)

_HOSTS: dict[str, dict[str, Any]] = {}  # device -> this process's host record


def host_record(device: str = "/dev/kvm") -> dict[str, Any]:
    """This worker's host: its name, its Dask address (when in a worker) and
    :func:`fastmmio.real.host.detect_host`'s record (detected once per process)."""
    rec = _HOSTS.get(device)
    if rec is None:
        from fastmmio.real.host import detect_host

        rec = {"hostname": socket.gethostname(), **detect_host(device).to_json()}
        _HOSTS[device] = rec
    out = dict(rec)
    try:
        from distributed import get_worker

        out["worker"] = get_worker().address
    except (ImportError, ValueError):
        out["worker"] = ""
    return out


def _check_device(device: str) -> None:
    """HostError naming this worker's host when its KVM device is missing or unusable."""
    from fastmmio.errors import HostError
    from fastmmio.real.backend import RealBackend

    try:
        RealBackend(device=device).check()
    except HostError as exc:
        raise HostError(f"worker on {socket.gethostname()}: {exc}") from None


def _raise_host_errors(error: BaseException | None) -> None:
    """A worker's host or usage error ends the campaign with its one line (not a lost case)."""
    from fastmmio.errors import FastmmioError

    if isinstance(error, FastmmioError):
        raise error


def host_label(rec: dict[str, Any]) -> str:
    return f"{rec.get('hostname', '?')} ({rec.get('kvm_kind', '?')}, {rec.get('cpu_model', '?')})"


# ------------------------------------------------------------------------------------------
# hostile
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostileShare:
    seed: int
    start: int
    stop: int  # exclusive
    kinds: tuple[str, ...]
    cpls: tuple[int, ...]


def run_hostile_share(share: HostileShare, device: str, watchdog_s: float) -> tuple[Any, dict]:
    """The task: programs ``share.start .. share.stop - 1`` of ``share.seed`` on this
    worker's KVM; (summary, host record)."""
    from fastmmio.fuzz.hostile import generate
    from fastmmio.fuzz.runner import campaign
    _check_device(device)
    programs = (generate(share.seed, i, share.kinds, share.cpls) for i in range(share.start, share.stop))
    summary = campaign(programs, runs=share.stop - share.start, device=device,
                       watchdog_s=watchdog_s, leak_checks=False)
    return summary, host_record(device)


def hostile_campaign(client: Any, seed: int, start: int, kinds: tuple[str, ...], cpls: tuple[int, ...],
                     runs: int | None, seconds: float | None, device: str, watchdog_s: float,
                     share: int = HOSTILE_SHARE,
                     on_share: Callable[[int, Any, dict], None] | None = None) -> tuple[Any, list[dict]]:
    """Programs ``start`` .. of ``seed`` in shares across the cluster until ``runs`` programs
    or ``seconds`` (whichever first); the summed summary and the host record of every worker
    that reported. ``on_share(programs done, share summary, host)`` for progress."""
    from fastmmio.fuzz.hostile import generate
    from fastmmio.fuzz.runner import Finding, Summary

    total = Summary()
    hosts: dict[str, dict] = {}
    retry: collections.deque[HostileShare] = collections.deque()
    t0 = time.perf_counter()
    deadline = time.monotonic() + seconds if seconds is not None else None
    end = start + runs if runs is not None else None

    class Shares:
        """The next share: a split one waiting for its re-run first, then the stream's next
        range (an iterator that may yield again after a StopIteration, when a share fails)."""

        def __init__(self) -> None:
            self.next_index = start

        def __iter__(self) -> "Shares":
            return self

        def __next__(self) -> HostileShare:
            if retry:
                return retry.popleft()
            i = self.next_index
            if end is not None and i >= end:
                raise StopIteration
            self.next_index = i + share if end is None else min(end, i + share)
            return HostileShare(seed, i, self.next_index, kinds, cpls)

    done = 0
    for d in fanout.stream(client, run_hostile_share, Shares(), deadline=deadline,
                           device=device, watchdog_s=watchdog_s):
        sh: HostileShare = d.item
        _raise_host_errors(d.error)
        if d.error is not None:
            if sh.stop - sh.start > 1:  # split: find the one program that kills its worker
                retry.extend(HostileShare(sh.seed, i, i + 1, sh.kinds, sh.cpls)
                             for i in range(sh.start, sh.stop))
                continue
            program = generate(sh.seed, sh.start, sh.kinds, sh.cpls)
            total.runs += 1
            total.outcomes["lost"] += 1
            total.findings.append(Finding("lost", program.describe(),
                                          f"its worker died: {type(d.error).__name__}: {d.error}"))
            done += 1
            if on_share is not None:
                on_share(done, None, {})
            continue
        summary, host = d.result
        hosts.setdefault(host.get("worker") or host["hostname"], host)
        total.add(summary, host=host["hostname"])
        done += summary.runs
        if on_share is not None:
            on_share(done, summary, host)
    total.seconds = time.perf_counter() - t0
    return total, list(hosts.values())


# ------------------------------------------------------------------------------------------
# differential
# ------------------------------------------------------------------------------------------


def share_seed(seed: int, k: int) -> int:
    """The hypothesis seed of share ``k`` of a campaign seeded ``seed`` (the same everywhere:
    reproduce a share with ``fuzz diff --seed SHARE_SEED --examples N``)."""
    return (seed * 1_000_003 + k) & 0xFFFF_FFFF


@dataclass(frozen=True)
class DiffShare:
    k: int
    seed: int  # share_seed(campaign seed, k)
    examples: int


@dataclass
class DiffShareResult:
    share: DiffShare
    summary: Any  # differential.Summary
    host: dict


def run_diff_share(share: DiffShare, device: str, mmio_caching: str, max_ops: int,
                   seconds: float) -> DiffShareResult:
    """The task: ``share.examples`` generated programs under ``share.seed`` on this worker's
    KVM and simulator."""
    from fastmmio.fuzz.differential import DiffRunner, _hypothesis_home, fuzz

    _check_device(device)
    _hypothesis_home()
    runner = DiffRunner(device, mmio_caching=mmio_caching)
    summary = fuzz(runner, share.examples, seconds, share.seed, max_ops)
    return DiffShareResult(share, summary, host_record(device))


def shrink_on_worker(program: Any, signature: tuple[str, ...], device: str, mmio_caching: str) -> Any:
    """The task: shrink ``program`` while it keeps disagreeing with ``signature`` on this
    worker's host; the shrunk :class:`~fastmmio.fuzz.differential.CaseResult`."""
    from fastmmio.fuzz.differential import DiffRunner, shrink

    runner = DiffRunner(device, mmio_caching=mmio_caching)
    small = shrink(program, lambda p: runner.run(p).signature == signature, excluded=runner.excluded)
    return runner.run(small)


@dataclass
class DiffCampaign:
    summary: Any  # differential.Summary, summed
    hosts: list[dict] = field(default_factory=list)
    found_on: dict[tuple[str, ...], dict] = field(default_factory=dict)  # signature -> host record
    lost: list[DiffShare] = field(default_factory=list)


def diff_campaign(client: Any, seed: int, examples: int, seconds: float, device: str,
                  mmio_caching: str, max_ops: int, share: int = DIFF_SHARE,
                  on_share: Callable[[int, DiffShareResult | None], None] | None = None) -> DiffCampaign:
    """``examples`` programs in shares of ``share`` across the cluster, for at most
    ``seconds``; the summed :class:`~fastmmio.fuzz.differential.Summary` (each kind of
    disagreement keeps its first case by share number) and where each was found."""
    from fastmmio.fuzz.differential import Summary

    total = Summary()
    out = DiffCampaign(total)
    t0 = time.perf_counter()
    deadline = time.monotonic() + seconds
    n = -(-examples // share)
    plan = [DiffShare(k, share_seed(seed, k), min(share, examples - k * share)) for k in range(n)]
    firsts: dict[tuple[str, ...], tuple[int, Any, dict]] = {}
    hosts: dict[str, dict] = {}
    done = 0
    for d in fanout.stream(client, run_diff_share, plan, deadline=deadline, device=device,
                           mmio_caching=mmio_caching, max_ops=max_ops,
                           seconds=max(1.0, deadline - time.monotonic())):
        _raise_host_errors(d.error)
        if d.error is not None:
            out.lost.append(d.item)
            if on_share is not None:
                on_share(done, None)
            continue
        r: DiffShareResult = d.result
        s = r.summary
        hosts.setdefault(r.host.get("worker") or r.host["hostname"], r.host)
        total.cases += s.cases
        total.excluded += s.excluded
        total.disagreements += s.disagreements
        total.by_signature.update(s.by_signature)
        for sig, case in s.first.items():
            if sig not in firsts or r.share.k < firsts[sig][0]:
                firsts[sig] = (r.share.k, case, r.host)
        done += s.cases + s.excluded
        if on_share is not None:
            on_share(done, r)
    for sig in sorted(firsts, key=lambda g: firsts[g][0]):
        _, case, host = firsts[sig]
        total.first[sig] = case
        out.found_on[sig] = host
    out.hosts = list(hosts.values())
    total.seconds = time.perf_counter() - t0
    return out


def shrink_where_found(client: Any, campaign: DiffCampaign, sig: tuple[str, ...], device: str,
                       mmio_caching: str) -> Any:
    """Shrink the first case of ``sig`` on the worker that found it (any worker if it is
    gone); in this process without a client."""
    case = campaign.summary.first[sig]
    if client is None:
        return shrink_on_worker(case.program, sig, device, mmio_caching)
    worker = campaign.found_on.get(sig, {}).get("worker")
    fut = client.submit(shrink_on_worker, case.program, sig, device, mmio_caching, pure=False,
                        workers=[worker] if worker else None, allow_other_workers=True)
    try:
        return fut.result()
    except BaseException:
        fut.cancel()
        raise


__all__ = ["DIFF_SHARE", "HOSTILE_SHARE", "DiffCampaign", "DiffShare", "HostileShare",
           "diff_campaign", "host_record", "hostile_campaign", "run_diff_share",
           "run_hostile_share", "share_seed", "shrink_where_found"]
