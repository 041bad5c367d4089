"""LockManager (``app.lock_manager``): acquire, try_acquire, run_exclusive and inspection, in seconds.

Keys are namespaced ``"{app.name}:lock:{key}"``. The backend is chosen in ``NOCLUSTER["LOCKS"]``:
``nocluster.locks.backends.local.LocalLockBackend`` (threads of one process; the default) or
``nocluster.locks.backends.redis.RedisLockBackend`` (python-redis-lock, shared by every node).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from nocluster.durations import optional_seconds, seconds
from nocluster.envelope import ensure_key
from nocluster.errors import LockAcquireError
from nocluster.identity import NodeIdentity
from nocluster.lifecycle import Component
from nocluster.locks.backend import MAX_TTL, LockBackend, LockInfo
from nocluster.locks.lock import Lock
from nocluster.locks.renewal import stop_renewers
from nocluster.metrics.recorders import LockMetrics

logger = logging.getLogger("nocluster.locks")
T = TypeVar("T")


def _check_key(key: object) -> str:
    return ensure_key(key, "lock key")


class LockManager(Component):
    """Locks across the cluster (or across threads, on the local backend).

    Parameters:
      identity: the node (its ``name`` prefixes keys, its ``instance_id`` is recorded as the holder).
      backend: a :class:`~nocluster.locks.backend.LockBackend`.
      metrics: records acquisitions, wait and hold times, force releases (default: nothing recorded).
    """

    def __init__(self, identity: NodeIdentity, backend: LockBackend, metrics: LockMetrics | None = None) -> None:
        self.identity = identity
        self.backend = backend
        self.metrics = metrics if metrics is not None else LockMetrics()

    @property
    def prefix(self) -> str:
        """``"{app.name}:lock:"``, the start of every lock name of this app."""
        return f"{self.identity.name}:lock:"

    @property
    def sequence(self) -> str:
        """``"{app.name}:lock-tokens"``: the counter every fencing token of this app comes from."""
        return f"{self.identity.name}:lock-tokens"

    def full_key(self, key: str) -> str:
        """The backend name of ``key``: ``"{app.name}:lock:{key}"``."""
        return self.prefix + _check_key(key)

    # --- holding ------------------------------------------------------------------------------------------
    def acquire(self, key: str, ttl: float = 0.5, timeout: float | None = None, *, auto_renew: bool = False) -> Lock:
        """Block until ``key`` is held, and return the :class:`~nocluster.locks.lock.Lock` (a context manager).

        Parameters:
          key: what to lock (non-empty str).
          ttl: seconds after which the lock frees itself if not released (safety release; > 0, at most 1e9).
            With ``auto_renew`` it is renewed every ``ttl / 3`` seconds while held.
          timeout: seconds to wait at most (None: forever; 0: one attempt).
          auto_renew: keep the lock while the work lasts longer than ``ttl`` (a named renewal thread; if
            renewal finds the lock lost, ``lock.lost`` turns True and the loss is logged as an error).

        Raises:
          LockAcquireError: not acquired within ``timeout``; names the key and the current holder.
          ValueError, TypeError: bad key, ttl or timeout; names the key.
          BackendUnavailable: the lock server cannot be reached; names the key.
        """
        key = _check_key(key)
        ttl = seconds(ttl, f"lock {key!r}: ttl", most=MAX_TTL)
        timeout = optional_seconds(timeout, f"lock {key!r}: timeout", allow_zero=True)
        name = self.prefix + key
        started = time.monotonic()
        lease = self.backend.acquire(name, self.identity.instance_id, ttl, timeout, self.sequence)
        waited = time.monotonic() - started
        if lease is None:
            self.metrics.timed_out(waited)
            raise LockAcquireError(f"lock {key!r} not acquired within {timeout} s: {self._holder(name)}")
        logger.debug(
            "lock %r acquired by %s (token %s, ttl %s s)",
            key,
            self.identity.instance_id,
            lease.token,
            ttl,
            extra={"lock_key": key},
        )
        self.metrics.acquired(waited)
        return Lock(self.backend, key, lease, ttl, auto_renew, metrics=self.metrics)

    def try_acquire(self, key: str, ttl: float = 0.5, timeout: float = 0, *, auto_renew: bool = False) -> Lock:
        """As :meth:`acquire`, but give up at once (or after ``timeout`` seconds) when another holder has it.

        Two callers racing: exactly one wins; the other gets :class:`~nocluster.errors.LockAcquireError`.
        """
        return self.acquire(key, ttl, timeout, auto_renew=auto_renew)

    def run_exclusive(
        self, key: str, fn: Callable[[], T], ttl: float = 0.5, timeout: float | None = None, *, auto_renew: bool = False
    ) -> T:
        """Hold ``key``, call ``fn()``, release, and return its value; released when ``fn`` raises too.

        Raises:
          LockAcquireError: not acquired within ``timeout`` seconds.
          LockNotOwned: ``fn`` returned after the lock was lost (its ttl passed without renewal), so it did not
            run exclusively to the end. If ``fn`` raised, its exception propagates instead.
          TypeError: ``fn`` is not callable.
        """
        if not callable(fn):
            raise TypeError(f"lock {key!r}: fn must be callable, got {fn!r}")
        with self.acquire(key, ttl, timeout, auto_renew=auto_renew):
            return fn()

    # --- inspection (management command, admin) ---------------------------------------------------------
    def _public(self, info: LockInfo) -> LockInfo:
        return replace(info, key=info.name[len(self.prefix) :])

    def _holder(self, name: str) -> str:
        info = self.backend.inspect(name)
        if info is None:
            return "it was freed just now"
        left = "no expiry" if info.time_left is None else f"{info.time_left:.3f} s left"
        return f"held by instance {info.instance_id} (token {info.token}, {left})"

    def list_locks(self, pattern: str = "*") -> list[LockInfo]:
        """Held locks of this app whose key matches glob ``pattern`` (``*``, ``?``, ``[...]``), sorted by key.

        On Redis this SCANs the keyspace (O(keys in the database)); for operators, not for hot paths.
        """
        return [self._public(info) for info in self.backend.scan(self.prefix, pattern or "*")]

    def get_lock(self, key: str) -> LockInfo | None:
        """The holder of ``key`` (instance id, token, seconds left), or None when it is free."""
        info = self.backend.inspect(self.full_key(key))
        return None if info is None else self._public(info)

    def force_release(self, key: str, token: int | None = None) -> bool:
        """Free ``key`` and wake a waiter; the old holder's release then raises LockNotOwned.

        Parameters:
          token: release only the holder with this fencing token (what the operator saw), never one that took
            the lock since; None releases whoever holds it.

        Returns True when a lock was released. For operators: the holder may still be running its work.
        """
        released = self.backend.force_release(self.full_key(key), token)
        if released:
            self.metrics.force_released()
        logger.warning(
            "lock %r force-released by %s (token %s): %s",
            key,
            self.identity.instance_id,
            "any" if token is None else token,
            "released" if released else "nothing released",
            extra={"lock_key": key},
        )
        return released

    def close(self) -> None:
        """Stop the auto-renewal threads of this manager's locks and close the backend's connections."""
        stop_renewers(self.backend)
        self.backend.close()

    # --- lifecycle ------------------------------------------------------------------------------------------
    def after_fork(self) -> None:
        """In a forked child: drop the backend's connections or process-local state."""
        self.backend.after_fork()
