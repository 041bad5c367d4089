"""LocalLockBackend: locks between the threads of one process (the embedded default).

Limit: the lock is not seen by any other process, so it serialises nothing across nodes; use
:class:`~nocluster.locks.backends.redis.RedisLockBackend` in a cluster. It implements the whole contract
(ttl, owner-checked release, fencing tokens, inspection) so code and tests behave the same on both.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase

from nocluster.locks.backend import Lease, LockBackend, LockInfo


@dataclass
class _Hold:
    owner: str
    instance_id: str
    token: int
    expires_at: float  # time.monotonic() seconds


class LocalLockBackend(LockBackend):
    """One ``threading.Condition`` guards every lock of the process; a ttl is a monotonic-clock deadline.

    Fencing tokens count per sequence from 1 for the life of the process.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holds: dict[str, _Hold] = {}
        self._tokens: dict[str, int] = {}
        self._waiting: dict[str, int] = {}

    def _live(self, name: str, now: float) -> _Hold | None:
        hold = self._holds.get(name)
        if hold is not None and hold.expires_at <= now:
            # The ttl passed: the lock is free, the old holder has lost it.
            del self._holds[name]
            return None
        return hold

    def acquire(self, name: str, instance_id: str, ttl: float, timeout: float | None, sequence: str) -> Lease | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                hold = self._live(name, now)
                if hold is None:
                    token = self._tokens.get(sequence, 0) + 1
                    self._tokens[sequence] = token
                    owner = f"{instance_id}:{secrets.token_hex(8)}:{token}"
                    self._holds[name] = _Hold(owner, instance_id, token, now + ttl)
                    return Lease(name, token, owner)
                wait = hold.expires_at - now
                if deadline is not None:
                    if deadline <= now:
                        return None
                    wait = min(wait, deadline - now)
                self._waiting[name] = self._waiting.get(name, 0) + 1
                try:
                    self._cond.wait(wait)
                finally:
                    self._waiting[name] -= 1
                    if not self._waiting[name]:
                        del self._waiting[name]

    def release(self, lease: Lease) -> bool:
        with self._cond:
            hold = self._live(lease.name, time.monotonic())
            if hold is None or hold.owner != lease.owner:
                return False
            del self._holds[lease.name]
            self._cond.notify_all()
            return True

    def extend(self, lease: Lease, ttl: float) -> bool:
        with self._cond:
            now = time.monotonic()
            hold = self._live(lease.name, now)
            if hold is None or hold.owner != lease.owner:
                return False
            hold.expires_at = now + ttl
            return True

    def _info(self, name: str, hold: _Hold, now: float) -> LockInfo:
        left = max(0.0, hold.expires_at - now)
        return LockInfo(name, name, hold.instance_id, hold.token, left, self._waiting.get(name, 0))

    def inspect(self, name: str) -> LockInfo | None:
        with self._cond:
            now = time.monotonic()
            hold = self._live(name, now)
            return None if hold is None else self._info(name, hold, now)

    def scan(self, prefix: str, pattern: str = "*") -> list[LockInfo]:
        with self._cond:
            now = time.monotonic()
            found = []
            for name in sorted(self._holds):
                hold = self._live(name, now)
                if hold is not None and name.startswith(prefix) and fnmatchcase(name[len(prefix) :], pattern):
                    found.append(self._info(name, hold, now))
            return found

    def force_release(self, name: str, token: int | None = None) -> bool:
        with self._cond:
            hold = self._live(name, time.monotonic())
            if hold is None or (token is not None and hold.token != token):
                return False
            del self._holds[name]
            self._cond.notify_all()
            return True

    def after_fork(self) -> None:
        # A forked child holds none of its parent's locks, and the parent's threads do not exist in it.
        self._cond = threading.Condition()
        self._holds = {}
        self._waiting = {}
