"""Trailing-edge debounce, keyed by (channel, callback, canonical JSON of the message).

Ours (kombu has no such thing); it follows NocoBase's pub/sub ``debounce`` option. Messages with equal content
arriving within ``delay`` seconds of each other become one call, made ``delay`` seconds after the last of them
(trailing edge). A steady stream of equal messages is still delivered at least every ``MAX_WAIT_FACTOR * delay``
seconds, so a subscriber cannot starve. Different contents have different keys and are never coalesced.

All calls run on one named thread per debouncer, in deadline order; :meth:`Debouncer.cancel_all` drops what
is pending (on stop, as NocoBase's ``cancelPendingDebounce``).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable

logger = logging.getLogger("nocluster.pubsub.debounce")

MAX_WAIT_FACTOR = 4.0


class Debouncer:
    """Runs ``fn`` for each key once its burst is over.

    Parameters:
      name: the thread name, or a function returning it (read when the thread starts: a forked child names its
        thread after its own instance id).
    """

    def __init__(self, name: str | Callable[[], str]) -> None:
        self._name = name
        self._cond = threading.Condition()
        # key -> (deadline, latest deadline allowed, fn); the heap holds (deadline, tiebreak, key) entries,
        # stale ones are skipped when popped.
        self._pending: dict[Hashable, tuple[float, float, Callable[[], None]]] = {}
        self._heap: list[tuple[float, int, Hashable]] = []
        self._order = itertools.count()
        self._running = False
        self._stopping = False
        self._closed = False  # set by stop(): pushes are dropped until open()
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self._name() if callable(self._name) else self._name

    def open(self) -> None:
        """Accept pushes again after :meth:`stop` (the node started again)."""
        with self._cond:
            self._closed = False

    def push(self, key: Hashable, delay: float, fn: Callable[[], None]) -> None:
        """Call ``fn`` ``delay`` seconds after the last push of ``key`` (the last ``fn`` pushed wins)."""
        now = time.monotonic()
        with self._cond:
            if self._closed:
                logger.debug("debouncer %s is stopped: call %r dropped", self.name, key)
                return
            self._ensure_thread()
            previous = self._pending.get(key)
            limit = previous[1] if previous else now + delay * MAX_WAIT_FACTOR
            deadline = min(now + delay, limit)
            self._pending[key] = (deadline, limit, fn)
            heapq.heappush(self._heap, (deadline, next(self._order), key))
            self._cond.notify()

    def idle(self) -> bool:
        """True when nothing is pending and no call is running."""
        with self._cond:
            return not self._pending and not self._running

    def cancel_all(self) -> None:
        """Drop every pending call."""
        with self._cond:
            self._pending.clear()
            self._heap.clear()

    def stop(self, timeout: float = 10.0) -> None:
        """Drop pending calls, stop the thread and join it (``timeout`` seconds)."""
        with self._cond:
            self._pending.clear()
            self._heap.clear()
            self._stopping = True
            self._closed = True
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.error("debounce thread %s did not stop within %s s", thread.name, timeout)

    def after_fork(self) -> None:
        """In a forked child: the parent's thread is gone; start afresh."""
        self._cond = threading.Condition()
        self._pending.clear()
        self._heap.clear()
        self._running = False
        self._stopping = False
        self._closed = False
        self._thread = None

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def _next_due(self) -> Callable[[], None] | None:
        """Under the condition: wait for the earliest due call and take it (None when stopping)."""
        while not self._stopping:
            while self._heap:
                deadline, _, key = self._heap[0]
                entry = self._pending.get(key)
                if entry is None or entry[0] != deadline:
                    heapq.heappop(self._heap)  # superseded by a later push, or cancelled
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    heapq.heappop(self._heap)
                    del self._pending[key]
                    return entry[2]
                break
            self._cond.wait(None if not self._heap else max(0.0, self._heap[0][0] - time.monotonic()))
        return None

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._running = False
                fn = self._next_due()
                if fn is None:
                    return
                self._running = True
            try:
                fn()
            except Exception:
                logger.exception("debounced call failed")
