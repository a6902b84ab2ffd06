"""Fan-out on Dask (``dask.distributed``): one Client context, ordered gathering, streaming
campaigns, one task per worker host, cancellation on interrupt.

Everything in fastmmio that fans out (the simulations of ``compare`` and ``sweep``, the cases
of ``fuzz diff`` and ``fuzz hostile``, the fleet ``bench``) goes through here:

* :func:`open_client` gives a :class:`distributed.Client` on an existing scheduler
  (``--scheduler tcp://HOST:PORT`` or ``DASK_SCHEDULER_ADDRESS``), on a ``LocalCluster`` of
  ``workers`` single-threaded worker processes bound to 127.0.0.1 (no set-up; the worker
  processes need their own interpreter since the simulator and the KVM run loop hold the
  GIL), or ``None`` for the serial path (``workers == 0``), which runs the same functions in
  this process.
* :func:`map_ordered` submits one task per item and returns the results in the items' order,
  whatever order they finished in: the caller's serial loop then sees exactly the results a
  serial run would have produced.
* :func:`stream` keeps a bounded window of tasks in flight while a generator of items and a
  deadline allow (a fuzzing campaign), and hands back each item's result or the exception
  that ended it (``KilledWorker`` when the task's worker died more often than the scheduler's
  ``allowed-failures``; a single death reschedules the task on another worker and loses
  nothing).
* :func:`on_each_host` runs one task on one worker of each host (the fleet view).

On ``KeyboardInterrupt`` (or any exception) the tasks still pending on the cluster are
cancelled before the exception propagates, and the ``LocalCluster`` is shut down by the
context manager: nothing keeps running after the command has exited.

Tasks must be functions importable by name on the workers (module-level functions of
fastmmio) and their arguments and results must pickle.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fastmmio.errors import HostError, UsageError

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
CONNECT_TIMEOUT_S = 10.0
_TRACKER_FILTER = "ignore:resource_tracker:UserWarning"  # see _quiet_resource_tracker
_ADDRESS = re.compile(r"^(tcp|tls)://(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


def scheduler_address(text: str) -> str:
    """argparse ``type=`` for ``--scheduler``: ``tcp://HOST:PORT`` (or ``tls://``)."""
    m = _ADDRESS.match(text.strip())
    if not m or not 0 < int(m.group(3)) < 65536:
        raise argparse.ArgumentTypeError(f"expected tcp://HOST:PORT, got {text!r}")
    return text.strip()


def worker_count(text: str) -> int:
    """argparse ``type=`` for ``--workers``: 0 (serial) up to 1024."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"must be between 0 (serial) and 1024: {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser, default_workers: int | None, what: str) -> None:
    """``--workers N`` and ``--scheduler ADDR`` on a command that fans out ``what``.
    ``default_workers`` None: all cores of this machine."""
    default = "all cores of this machine" if default_workers is None else str(default_workers)
    parser.add_argument(
        "--workers", "-j", type=worker_count, default=default_workers, metavar="N",
        help=f"run {what} on a local Dask cluster of N worker processes (0: serially in this "
        f"process; default: {default})")
    parser.add_argument(
        "--scheduler", type=scheduler_address, default=None, metavar="tcp://HOST:PORT",
        help=f"run {what} on an existing Dask cluster (default: ${SCHEDULER_ENV} if set); "
        "overrides --workers")


def resolve(workers: int | None, scheduler: str | None) -> tuple[int, str | None]:
    """(local worker count, scheduler address) from the options and the environment: an
    explicit address, else ``$DASK_SCHEDULER_ADDRESS``, else a local cluster of ``workers``
    (None: ``os.cpu_count()``)."""
    if scheduler is None:
        env = os.environ.get(SCHEDULER_ENV, "").strip()
        if env:
            try:
                scheduler = scheduler_address(env)
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"{SCHEDULER_ENV}: {exc}") from None
    if workers is None:
        workers = os.cpu_count() or 1
    return workers, scheduler


def _quiet_logs() -> None:
    for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker",
                 "distributed.core", "distributed.comm", "distributed.batched", "bokeh", "tornado"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _quiet_resource_tracker() -> None:
    """multiprocessing's resource tracker (a process of its own, started for the cluster's
    worker processes) says on stderr at its exit that semaphores of workers stopped by a
    Ctrl-C "appear to be leaked", and then removes them: a second line after the command's
    one-line message, about nothing left behind. The tracker and the workers get this
    process's warning options on their command line, so the filter goes there."""
    if _TRACKER_FILTER not in sys.warnoptions:
        sys.warnoptions.append(_TRACKER_FILTER)


@contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """SIGINT ignored while the LocalCluster starts its worker processes: they inherit the
    ignored signal (it survives exec, and Python then installs no KeyboardInterrupt handler),
    so a Ctrl-C at the terminal, sent to the whole process group, reaches this process alone,
    which cancels the tasks and shuts the cluster down instead of the workers dying under it
    with tracebacks. The price: a Ctrl-C during the cluster's start-up (a few seconds) is
    ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@contextmanager
def open_client(workers: int | None = 0, scheduler: str | None = None) -> Iterator[Any]:
    """A Dask Client for the run, or None for the serial path (see the module docstring).
    Everything it starts it stops on the way out, on success, error or interrupt."""
    workers, scheduler = resolve(workers, scheduler)
    if scheduler is None and workers == 0:
        yield None
        return
    from distributed import Client, LocalCluster

    _quiet_logs()
    cluster = None
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise HostError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
    else:
        import dask

        # Dask's statistical profiler samples each worker's stacks every 10 ms: CPU the
        # simulations need (the workers are ours alone; nobody reads the profile).
        _quiet_resource_tracker()
        with _workers_ignore_sigint(), dask.config.set({"distributed.worker.profile.enabled": False}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                   worker_dashboard_address="127.0.0.1:0",
                                   silence_logs=logging.CRITICAL)
        try:
            client = Client(cluster, set_as_default=False)
        except BaseException:
            cluster.close()
            raise
    try:
        yield client
    finally:
        try:
            client.close()
        finally:
            if cluster is not None:
                cluster.close()


def _cancel(client: Any, futures: Iterable[Any]) -> None:
    pending = [f for f in futures if not f.done()]
    if pending:
        try:
            client.cancel(pending, force=True)
        except Exception:  # the cluster is going away anyway
            pass


def map_ordered(client: Any, fn: Callable[..., Any], items: Sequence[Any], *,
                on_done: Callable[[int, Any], None] | None = None, **kwargs: Any) -> list[Any]:
    """``[fn(item, **kwargs) for item in items]``, as one Dask task per item when ``client``
    is given (in this process otherwise), in the order of ``items``. ``on_done(index,
    result)`` is called as each finishes (progress). The first exception a task raises is
    raised here once the other tasks are cancelled."""
    if client is None:
        out = []
        for i, item in enumerate(items):
            out.append(fn(item, **kwargs))
            if on_done is not None:
                on_done(i, out[-1])
        return out
    from distributed import as_completed

    futures = client.map(fn, list(items), pure=False, **kwargs)
    index = {f.key: i for i, f in enumerate(futures)}
    try:
        for fut in as_completed(futures, loop=client.loop):
            result = fut.result()  # raises the task's exception
            if on_done is not None:
                on_done(index[fut.key], result)
        return client.gather(futures)
    except BaseException:
        _cancel(client, futures)
        raise


@dataclass
class Done:
    """One item of :func:`stream`: its index, the item, and its result or the exception that
    ended its task (``error``; ``result`` is None then)."""

    index: int
    item: Any
    result: Any = None
    error: BaseException | None = None


def stream(client: Any, fn: Callable[..., Any], items: Iterable[Any], *, window: int | None = None,
           deadline: float | None = None, **kwargs: Any) -> Iterator[Done]:
    """Run ``fn(item, **kwargs)`` for items drawn from ``items`` while the ``deadline``
    (``time.monotonic()``) has not passed, at most ``window`` tasks in flight (default: twice
    the cluster's threads), yielding a :class:`Done` per item in completion order. A task
    that raises (or whose workers all died) is yielded with its ``error``; the stream goes on.
    Serial when ``client`` is None (``error`` then holds a :class:`Exception` the function
    raised; ``KeyboardInterrupt`` propagates)."""
    it = iter(items)
    if client is None:
        for i, item in enumerate(it):
            if deadline is not None and time.monotonic() >= deadline:
                return
            try:
                yield Done(i, item, fn(item, **kwargs))
            except Exception as exc:
                yield Done(i, item, error=exc)
        return
    from distributed import as_completed

    if window is None:
        window = max(2, 2 * sum(w.get("nthreads", 1) for w in
                                client.scheduler_info().get("workers", {}).values()))
    live: dict[str, tuple[int, Any]] = {}
    counter = 0
    ac = as_completed(loop=client.loop)

    def submit_more() -> None:
        nonlocal counter
        while len(live) < window:
            if deadline is not None and time.monotonic() >= deadline:
                return
            try:
                item = next(it)
            except StopIteration:
                return
            fut = client.submit(fn, item, pure=False, **kwargs)
            live[fut.key] = (counter, item)
            counter += 1
            ac.add(fut)

    try:
        submit_more()
        for fut in ac:
            i, item = live.pop(fut.key)
            try:
                done = Done(i, item, fut.result())
            except Exception as exc:  # the task's exception, KilledWorker, CancelledError
                done = Done(i, item, error=exc)
            fut.release()
            yield done
            submit_more()
    except BaseException:
        _cancel(client, list(ac.futures))
        raise


def worker_hosts(client: Any) -> dict[str, list[tuple[str, str]]]:
    """Host -> [(worker address, host name)] for every worker of the cluster, by the address
    the worker listens on (its host part) and the name ``socket.gethostname()`` gives there."""
    names = client.run(socket.gethostname)
    hosts: dict[str, list[tuple[str, str]]] = {}
    for addr, info in sorted(client.scheduler_info().get("workers", {}).items()):
        host = info.get("host") or addr.rsplit(":", 1)[0].split("://")[-1]
        hosts.setdefault(host, []).append((addr, names.get(addr, host)))
    return hosts


def on_each_host(client: Any, fn: Callable[..., Any], *, hosts: Sequence[str] = (),
                 on_done: Callable[[str, Any], None] | None = None,
                 **kwargs: Any) -> dict[str, Any]:
    """``fn(**kwargs)`` once on one worker of each host of the cluster (all hosts, or those
    named in ``hosts`` by address or host name), in parallel; host -> result (or the
    exception its task raised), in host order. UsageError for a name no worker has."""
    found = worker_hosts(client)
    if not found:
        raise HostError("the Dask cluster has no workers")
    chosen: dict[str, str] = {}
    for want in hosts:
        match = [h for h, ws in found.items() if want == h or any(want == name for _, name in ws)]
        if not match:
            known = ", ".join(f"{h} ({ws[0][1]})" for h, ws in found.items())
            raise UsageError(f"no worker on host {want!r}; the cluster's hosts: {known}")
        chosen[match[0]] = found[match[0]][0][0]
    if not hosts:
        chosen = {h: ws[0][0] for h, ws in found.items()}
    futures = {client.submit(fn, pure=False, workers=[addr], allow_other_workers=False,
                             **kwargs): h for h, addr in chosen.items()}
    from distributed import as_completed

    out: dict[str, Any] = {}
    try:
        for fut in as_completed(list(futures), loop=client.loop):
            try:
                out[futures[fut]] = fut.result()
            except Exception as exc:
                out[futures[fut]] = exc
            if on_done is not None:
                on_done(futures[fut], out[futures[fut]])
    except BaseException:
        _cancel(client, list(futures))
        raise
    return {h: out[h] for h in sorted(out)}


def progress_bar(label: str, total: int | None):
    """A rich progress bar on stderr (off when stderr is not a terminal): tasks done across
    the cluster."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=err,
                        transient=True, disable=not err.is_terminal)
    return progress, progress.add_task(label, total=total, detail="")


def chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    """``items`` cut into consecutive lists of at most ``size`` (order kept)."""
    return [list(items[i:i + size]) for i in range(0, len(items), max(1, size))]


__all__ = ["SCHEDULER_ENV", "Done", "add_arguments", "chunks", "map_ordered", "on_each_host",
           "open_client", "progress_bar", "resolve", "scheduler_address", "stream", "worker_count",
           "worker_hosts"]
