"""LocalRateLimiter: rate limits kept in this process. Each process has its own: for tests, the embedded defaults
and one-process tools. In a cluster use :class:`~nocluster.queue.rates.backends.redis.RedisRateLimiter`."""

from __future__ import annotations

import threading
import time

from nocluster.queue.rates.backend import RateLimiter, Reservation
from nocluster.queue.rates.limit import RateLimit

# Above this many keys, a reservation forgets the keys whose slots are all in the past.
PRUNE_ABOVE = 1024


class LocalRateLimiter(RateLimiter):
    """GCRA on ``time.monotonic()`` under one lock; the threads of this process share it. No OPTIONS."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}  # key -> monotonic time its next slot starts (its TAT)

    @property
    def cluster_wide(self) -> bool:
        return False

    def reserve(self, key: str, limit: RateLimit, horizon: float) -> Reservation:
        with self._lock:
            now = time.monotonic()
            start = max(self._next.get(key, now), now)
            if start - now > horizon:
                return Reservation(False, start - now)
            self._next[key] = start + limit.interval
            if len(self._next) > PRUNE_ABOVE:
                self._next = {name: at for name, at in self._next.items() if at > now}
            return Reservation(True, start - now)

    def after_fork(self) -> None:
        # A lock held by a parent thread at fork time would never be released in the child.
        self._lock = threading.Lock()
