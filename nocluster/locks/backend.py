"""The lock backend contract: the primitives :class:`~nocluster.locks.manager.LockManager` needs.

A backend sees full lock names (``"{app.name}:lock:{key}"``) and seconds; prefixes, input checks, errors and
auto-renewal live in the manager and the :class:`~nocluster.locks.lock.Lock` handle. Every acquisition gets a
fencing token from the backend: the next value of a sequence the manager names (one per app), so tokens
strictly increase per lock name, and across names too (ours, not python-redis-lock's: see Kleppmann, "How to do
distributed locking"), so storage can refuse a stale holder. One sequence per app, not one per name, so locking
ever new keys (cache keys, say) leaves no key behind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from nocluster.durations import MAX_SECONDS

# Longest ttl a lock may have, in seconds (~31 years): Redis refuses expiries near 2**63 ms, and a bound here
# keeps every backend alike.
MAX_TTL = MAX_SECONDS


@dataclass(frozen=True)
class Lease:
    """One acquisition, as the backend granted it.

    Attributes:
      name: the full lock name.
      token: the fencing token of this acquisition (strictly increasing per name, and per sequence).
      owner: opaque value the backend checks on release and extend (unique per acquisition).
    """

    name: str
    token: int
    owner: str


@dataclass(frozen=True)
class LockInfo:
    """A held lock, as inspection shows it.

    Attributes:
      key: the key given to ``acquire`` (without the ``"{app.name}:lock:"`` prefix).
      name: the full lock name in the backend.
      instance_id: the ``app.instance_id`` of the holder.
      token: the holder's fencing token (None if the record is not one of ours).
      time_left: seconds until the ttl releases the lock (None: it never expires).
      waiting: how many callers are blocked in ``acquire`` for it right now, on every node (on Redis: queued
        waiters whose record is alive; a waiter killed while it waits stops counting when its record expires,
        within :data:`~nocluster.locks.backends.redis.WAIT_CHUNK` + ``WAITER_GRACE`` seconds, 4 s by default).
        A waiter counts from its first failed attempt until it gets the lock or gives up.
    """

    key: str
    name: str
    instance_id: str
    token: int | None
    time_left: float | None
    waiting: int = 0


class LockBackend(ABC):
    """Primitives of a lock store. Durations are seconds (floats allowed)."""

    @abstractmethod
    def acquire(self, name: str, instance_id: str, ttl: float, timeout: float | None, sequence: str) -> Lease | None:
        """Take the lock ``name`` for ``ttl`` seconds, waiting up to ``timeout`` seconds (None: forever).

        The lease's token is the next value of the counter named ``sequence`` (it never goes back).

        An expired holder does not block: after its ttl the lock is free. Returns the lease, or None when the
        lock was still held by another when ``timeout`` passed (``timeout=0``: one attempt, no wait).
        """

    @abstractmethod
    def release(self, lease: Lease) -> bool:
        """Release the lock if ``lease`` still holds it; wake a waiter. False when it was lost (ttl, forced)."""

    @abstractmethod
    def extend(self, lease: Lease, ttl: float) -> bool:
        """Set the lock's time left to ``ttl`` seconds if ``lease`` still holds it; False when it was lost."""

    @abstractmethod
    def inspect(self, name: str) -> LockInfo | None:
        """The holder of ``name`` (``key`` equals ``name`` here; the manager fills it), or None when free."""

    @abstractmethod
    def scan(self, prefix: str, pattern: str = "*") -> list[LockInfo]:
        """Every held lock whose name is ``prefix`` (literal) followed by a match of glob ``pattern``."""

    @abstractmethod
    def force_release(self, name: str, token: int | None = None) -> bool:
        """Delete the lock whoever holds it (only if its token is ``token``, when given) and wake a waiter.

        True when a lock was released; False when it was free or held under another token.
        """

    def locked(self, name: str) -> bool:
        """True while someone holds ``name``."""
        return self.inspect(name) is not None

    def after_fork(self) -> None:
        """Called in a forked child: drop what must not be shared with the parent (default: nothing)."""
        return None

    def close(self) -> None:
        """Close connections (the backend may be used again afterwards; it reconnects). Default: nothing."""
        return None
