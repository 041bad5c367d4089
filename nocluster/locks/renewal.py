"""Auto-renewal of a held lock: one named thread per renewed lock, stopped and joined on release.

Ours, instead of python-redis-lock's ``auto_renewal`` thread, which dies silently when the lock is lost: this
one marks the lock lost and logs an error naming the key, so the holder finds out (``lock.lost``).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable

from nocluster.locks.backend import Lease, LockBackend

logger = logging.getLogger("nocluster.locks")
_renewers: weakref.WeakSet[LockRenewer] = weakref.WeakSet()


def stop_renewers(backend: LockBackend | None = None) -> None:
    """Stop the renewal threads of ``backend``'s locks (every one of this process when None): a stopping node."""
    for renewer in list(_renewers):
        if backend is None or renewer.backend is backend:
            renewer.stop()


class LockRenewer(threading.Thread):
    """Extends ``lease`` to ``ttl`` seconds every ``ttl / 3`` seconds until :meth:`stop`.

    A failed extend (the lock was taken: its ttl passed or it was force-released) calls ``on_lost`` and ends
    the thread. Any error of the backend is retried until the lease's ttl would have run out, then counts as
    lost: the thread never dies without telling the holder. ``on_lost`` is a weak reference to the holder's
    callback: once the holder is gone, renewing stops and the ttl frees the lock.
    Daemon: if the process exits, nothing is lost but the lock, which then expires by its ttl.
    """

    def __init__(
        self,
        backend: LockBackend,
        key: str,
        lease: Lease,
        ttl: float,
        on_lost: weakref.WeakMethod[Callable[[str], None]],
    ) -> None:
        super().__init__(name=f"lock-renewal:{key}", daemon=True)
        self.backend = backend
        self.key = key
        self.lease = lease
        self.ttl = ttl
        self.on_lost = on_lost
        self._stopping = threading.Event()
        _renewers.add(self)

    def _lost(self, reason: str) -> None:
        callback = self.on_lost()
        if callback is not None:
            callback(reason)

    def run(self) -> None:
        interval = self.ttl / 3
        valid_until = time.monotonic() + self.ttl
        while not self._stopping.wait(interval):
            if self.on_lost() is None:
                return  # the holder's handle was garbage-collected: let the ttl free the lock
            try:
                extended = self.backend.extend(self.lease, self.ttl)
            except Exception as exc:
                if time.monotonic() < valid_until:
                    logger.warning("lock %r: renewal failed, retrying: %s", self.key, exc, extra={"lock_key": self.key})
                    continue
                self._lost(f"renewal failed until its ttl ran out: {exc}")
                return
            if not extended:
                self._lost("renewal found it taken (its ttl passed or it was force-released)")
                return
            valid_until = time.monotonic() + self.ttl

    def stop(self, timeout: float = 10.0) -> None:
        """Stop renewing and join; log if the thread does not exit within ``timeout`` seconds."""
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
            if self.is_alive():
                logger.error(
                    "lock %r: renewal thread %s did not exit within %s s",
                    self.key,
                    self.name,
                    timeout,
                    extra={"lock_key": self.key},
                )
