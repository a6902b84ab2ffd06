"""One deadline thread: a condition-variable timer that runs a callback once a bound passes.

Used by the real run loop's watchdog (:class:`fastmmio.real.runloop.Watchdog`, which interrupts
KVM_RUN) and by the fuzz runner's hang guard (:class:`fastmmio.fuzz.runner.HangGuard`, which
ends a stuck process). The thread starts on the first :meth:`DeadlineTimer.arm` and sleeps on
the condition between armings.

Bounded waits: ``threading.Condition.wait`` turns its timeout into a platform ``time_t``, so a
huge bound (``1e12`` seconds, ``inf``) raises ``OverflowError`` inside the timer thread and
kills it silently. The thread therefore waits in steps of at most :data:`MAX_WAIT_S` and
re-reads the deadline after each.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

MAX_WAIT_S = 3600.0


class DeadlineTimer:
    """``arm(seconds, on_fire)``: call ``on_fire()`` from the timer thread (holding the timer's
    lock) once ``seconds`` have passed, unless :meth:`disarm` comes first. :meth:`disarm`
    returns whether it fired; after it returns, ``on_fire`` is not called for that arming."""

    def __init__(self, name: str = "fastmmio-deadline"):
        self.name = name
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._on_fire: Callable[[], None] | None = None
        self._fired = False
        self._stop = False
        self._thread: threading.Thread | None = None

    @property
    def fired(self) -> bool:
        """Whether the current (or last) arming fired."""
        return self._fired

    def arm(self, seconds: float, on_fire: Callable[[], None]) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
                self._thread.start()
            self._deadline = time.monotonic() + seconds
            self._on_fire = on_fire
            self._fired = False
            self._cond.notify()

    def disarm(self) -> bool:
        with self._cond:
            self._deadline = None
            self._on_fire = None
            return self._fired

    def _main(self) -> None:
        with self._cond:
            while not self._stop:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(min(remaining, MAX_WAIT_S))
                    continue
                self._fired = True
                self._deadline = None
                on_fire, self._on_fire = self._on_fire, None
                if on_fire is not None:
                    on_fire()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._deadline = None
            self._on_fire = None
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
