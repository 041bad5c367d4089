"""Timers for message timeouts: one named thread per process and a heap of deadlines. Ours, and why:

``threading.Timer`` starts a thread per message, which costs more than a trivial message itself. Callbacks run
on the ``nocluster-queue-deadlines`` thread and must be quick (firing an abort signal is). The thread is a daemon
because losing it loses nothing (it only fires signals of work that dies with the process); it is restarted
in a forked child on first use.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("nocluster.queue")


class Deadline:
    """A scheduled callback; :meth:`cancel` it when the work ends first."""

    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], object]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Deadlines:
    """Run callbacks after a delay (seconds) on one shared thread."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def after(self, delay: float, callback: Callable[[], object]) -> Deadline:
        """Call ``callback()`` in ``delay`` seconds unless the returned :class:`Deadline` is cancelled first."""
        deadline = Deadline(callback)
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), deadline))
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="nocluster-queue-deadlines", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is deadline:
                self._cond.notify()
        return deadline

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (pending callbacks are dropped)."""
        with self._cond:
            self._stopping = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                due = self._next_due()
                if due is None:
                    return
            if not due.cancelled:
                try:
                    due.callback()
                except Exception:
                    logger.exception("queue deadline callback %r raised", due.callback)

    def _next_due(self) -> Deadline | None:
        while not self._stopping:
            while self._heap and self._heap[0][2].cancelled:
                heapq.heappop(self._heap)
            if not self._heap:
                # Nothing pending: end the thread (after() starts a new one), so a stopped node leaves none.
                if not self._cond.wait(1.0) and not self._heap:
                    self._thread = None
                    return None
                continue
            wait = self._heap[0][0] - time.monotonic()
            if wait <= 0:
                return heapq.heappop(self._heap)[2]
            self._cond.wait(wait)
        return None


deadlines = Deadlines()
os.register_at_fork(after_in_child=deadlines._reset)
