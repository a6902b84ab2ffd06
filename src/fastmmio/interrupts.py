"""Ctrl-C (SIGINT) and SIGTERM for the command line: stop within a second, anywhere.

Python runs a signal handler in the main thread at the next bytecode, wherever that is. When
it is inside a unicorn hook (a ctypes callback) an exception raised there cannot cross back
through the C engine: ctypes prints "Exception ignored on calling ctypes callback function"
and unicorn goes on as if nothing had happened. So the handler installed by :func:`install`
never raises while an engine is running (:func:`engine` marks that stretch): it records the
signal and stops the engine (``uc_emu_stop``, which unicorn allows from a hook); the code that
started the engine calls :func:`check` once ``emu_start`` has returned, outside any callback,
and that raises :class:`Interrupted`. Anywhere else the handler raises at once.

The output transaction of :mod:`fastmmio.outputs` publishes its files inside :func:`critical`:
a signal that arrives there is recorded, the publication is undone, and :class:`Interrupted`
is raised afterwards, so an interrupted run never leaves part of its output behind. Once a
command has published its results, :func:`finished` makes later signals no-ops: the run is
complete and about to exit.

Python runs its handler only when the main thread executes bytecode, and a guest that loops
inside unicorn without an exit never returns to Python. So :func:`install` also points
Python's wakeup file descriptor (``signal.set_wakeup_fd``: the C-level handler writes the
signal number there at once) at a pipe read by a small thread, which stops the running engines
until the main thread has taken the signal. (Engines are closed only after they have left the
list under a lock that thread also holds, so it never stops a freed engine.)

Without :func:`install` (the library used from Python, the tests) nothing here changes
Python's own behaviour: :func:`check` only raises for a signal this handler recorded.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT or SIGTERM (a KeyboardInterrupt, so code that cleans up
    on Ctrl-C does so for both)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class _State:
    def __init__(self) -> None:
        self.installed = False
        self.wakeup: tuple[int, int] | None = None  # the pipe (read, write)
        self.lock = threading.Lock()  # the engines list against the wakeup thread
        self.pending: int | None = None  # the first signal received
        self.engines: list[Any] = []  # unicorn engines running in the main thread
        self.critical = 0  # depth of critical sections
        self.done = False
        self.raised = False  # Interrupted is raised once; a later signal is only recorded
        self.main_ident = threading.main_thread().ident


_state = _State()


def _handler(signum: int, _frame: Any) -> None:
    s = _state
    if s.pending is None:
        s.pending = signum
    if s.done:
        return
    if s.engines:
        for uc in s.engines:
            uc.emu_stop()
        return
    if s.critical or s.raised:
        return
    s.raised = True
    raise Interrupted(signum)


def install() -> None:
    """Install the handler for SIGINT and SIGTERM (main thread only; elsewhere a no-op) and
    forget any earlier state."""
    global _state
    _close_wakeup(_state)
    _state = _State()
    if threading.current_thread() is not threading.main_thread():
        return
    for s in SIGNALS:
        signal.signal(s, _handler)
    _state.installed = True
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:  # pragma: no cover - not the main interpreter
        os.close(r)
        os.close(w)
        return
    _state.wakeup = (r, w)
    threading.Thread(target=_watch, args=(_state, r), daemon=True,
                     name="fastmmio-interrupts").start()


def _watch(state: _State, fd: int) -> None:
    """The wakeup thread: on SIGINT or SIGTERM, stop the engines that run (repeatedly: a stop
    that lands between two ``emu_start`` calls is lost) until the main thread has taken the
    signal or some two seconds have passed.

    The kernel gives a process-directed signal to any thread that does not block it; when
    that is not the main thread while the main thread waits in C (KVM_RUN inside the compiled
    run loop of fastmmio.real, which goes back to Python only at the batch's end), nothing
    would make it return. So when the main thread has not taken the signal after a moment,
    it is sent again to the main thread itself (``pthread_kill``): KVM_RUN then returns
    EINTR and the run loop goes back to Python, where the handler raises."""
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            data = b""
        if not data:  # the write end was closed: uninstalled
            os.close(fd)
            return
        signums = [b for b in data if b in SIGNALS]
        if not signums:
            continue
        for i in range(200):
            with state.lock:
                engines = list(state.engines)
                for uc in engines:
                    uc.emu_stop()
            if state.pending is not None and (not engines or state.done):
                break
            if state.pending is None and i % 5 == 2 and state.main_ident is not None:
                try:
                    signal.pthread_kill(state.main_ident, signums[0])
                except (OSError, ProcessLookupError):
                    pass
            time.sleep(0.01)


def uninstall() -> None:
    """Restore Python's defaults (SIGINT raises KeyboardInterrupt, SIGTERM terminates)."""
    global _state
    if _state.installed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _close_wakeup(_state)
    _state = _State()


def _close_wakeup(state: _State) -> None:
    if state.wakeup is not None and threading.current_thread() is threading.main_thread():
        signal.set_wakeup_fd(-1)
        os.close(state.wakeup[1])  # the thread sees EOF, closes the read end and ends
        state.wakeup = None


def pending() -> int | None:
    """The signal received and not yet acted on, or None."""
    return _state.pending


def check() -> None:
    """Raise :class:`Interrupted` if a signal was recorded (call it outside engine hooks)."""
    s = _state
    if s.pending is not None and not s.done and not s.engines and not s.critical:
        s.raised = True
        raise Interrupted(s.pending)


def push_engine(uc: Any) -> bool:
    """Mark ``uc`` as running (see :func:`engine`); returns whether it was marked (only in the
    main thread with the handler installed). A cheap pair for hot paths; pair with
    :func:`pop_engine`."""
    s = _state
    if not s.installed or threading.current_thread() is not threading.main_thread():
        return False
    s.engines.append(uc)
    return True


def pop_engine() -> None:
    s = _state
    with s.lock:
        s.engines.pop()


@contextmanager
def engine(uc: Any) -> Iterator[None]:
    """While inside, a signal stops ``uc`` instead of raising; :func:`check` on leaving."""
    marked = push_engine(uc)
    try:
        yield
    finally:
        if marked:
            pop_engine()
    check()


@contextmanager
def critical() -> Iterator[None]:
    """A stretch a signal must not cut in two: the signal is recorded and :func:`pending`
    tells the code inside; :func:`check` on leaving raises it."""
    _state.critical += 1
    try:
        yield
    finally:
        _state.critical -= 1
    check()


def finished() -> None:
    """The command has published its results (or ended otherwise): later signals are
    ignored, it is exiting. With the handler installed, SIGINT and SIGTERM are then set to
    SIG_IGN, which the interpreter's shutdown keeps (it restores the default disposition
    only over a Python-level handler, and a signal in that last stretch would otherwise kill
    a finished run)."""
    _state.done = True
    if _state.installed and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
