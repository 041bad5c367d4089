"""The handle of a held lock: a context manager with ``release()``, ``extend()``, ``token`` and ``lost``."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from types import TracebackType

from nocluster.durations import seconds
from nocluster.errors import LockNotOwned
from nocluster.locks.backend import MAX_TTL, Lease, LockBackend
from nocluster.locks.renewal import LockRenewer
from nocluster.metrics.recorders import LockMetrics

logger = logging.getLogger("nocluster.locks")


class Lock:
    """A lock this process holds (returned by ``acquire`` / ``try_acquire``).

    Attributes:
      key: the key given to ``acquire``; ``name`` is the full name ``"{app.name}:lock:{key}"``.
      token: the fencing token, strictly increasing per key across the cluster: pass it to storage that must
        refuse a stale holder (one whose ttl ran out while it paused).
      ttl: seconds the lock stays held without a release or renewal.
      lost: True once the holder found out it lost the lock (renewal failed, or release found it taken).

    Losing the lock is an error, not a warning: ``release()`` raises :class:`~nocluster.errors.LockNotOwned`
    when the ttl passed (or the lock was force-released) and someone else may hold it now; that late release
    never touches the new holder's lock. Leaving a ``with`` block does the same, unless the block raised: then
    the block's exception propagates and the loss is logged as a warning.
    """

    def __init__(
        self, backend: LockBackend, key: str, lease: Lease, ttl: float, auto_renew: bool = False,
        metrics: LockMetrics | None = None,
    ) -> None:  # fmt: skip
        self.backend = backend
        self._metrics = metrics if metrics is not None else LockMetrics()
        self._held_since = time.monotonic()
        self.key = key
        self.name = lease.name
        self.token = lease.token
        self.ttl = ttl
        self._lease = lease
        self._released = False
        self._lost_reason: str | None = None
        self._state = threading.Lock()
        self._renewer: LockRenewer | None = None
        if auto_renew:
            # A weak reference: a handle dropped while held stops its renewal, and the ttl then frees the lock.
            self._renewer = LockRenewer(backend, key, lease, ttl, weakref.WeakMethod(self._mark_lost))
            self._renewer.start()

    @property
    def lost(self) -> bool:
        return self._lost_reason is not None

    @property
    def released(self) -> bool:
        return self._released

    def _mark_lost(self, reason: str) -> None:
        with self._state:
            if self._lost_reason is None:
                self._lost_reason = reason
        logger.error("lock %r (token %s) lost: %s", self.key, self.token, reason, extra={"lock_key": self.key})

    def _not_owned(self) -> LockNotOwned:
        reason = self._lost_reason or f"its ttl of {self.ttl} s passed or it was force-released"
        return LockNotOwned(f"lock {self.key!r} (token {self.token}) is no longer held by this holder: {reason}")

    def raise_if_lost(self) -> None:
        """Raise :class:`~nocluster.errors.LockNotOwned` if the renewal found the lock lost (for long work)."""
        if self.lost:
            raise self._not_owned()

    def extend(self, ttl: float | None = None) -> None:
        """Give the lock ``ttl`` more seconds from now (default: its ttl).

        Raises:
          LockNotOwned: the lock was lost or released.
        """
        ttl = self.ttl if ttl is None else seconds(ttl, f"lock {self.key!r}: ttl", most=MAX_TTL)
        if self._released or not self.backend.extend(self._lease, ttl):
            self._lost_reason = self._lost_reason or "extend found it taken or released"
            raise self._not_owned()

    def release(self) -> None:
        """Release the lock and wake a waiter. Releasing a released handle again does nothing.

        Raises:
          LockNotOwned: the lock was lost before this release (its ttl passed or it was force-released);
            the current holder's lock, if any, is left alone.
          BackendUnavailable: the lock server could not be reached; the handle stays held, so the release can
            be tried again (else the ttl frees the lock).
        """
        if self._renewer is not None:
            self._renewer.stop()
        with self._state:
            if self._released:
                return
            owned = self.backend.release(self._lease)
            self._released = True
        self._metrics.held(time.monotonic() - self._held_since)
        if not owned:
            self._lost_reason = self._lost_reason or f"its ttl of {self.ttl} s passed or it was force-released"
            raise self._not_owned()
        logger.debug("lock %r (token %s) released", self.key, self.token, extra={"lock_key": self.key})

    def __enter__(self) -> Lock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._released:
            return
        try:
            self.release()
        except LockNotOwned as lost:
            if exc is None:
                raise
            logger.warning("%s (while the block raised %s)", lost, type(exc).__name__, extra={"lock_key": self.key})

    def __repr__(self) -> str:
        state = "lost" if self.lost else "released" if self._released else "held"
        return f"<Lock {self.key!r} token={self.token} {state}>"
