"""RedisLockBackend: locks in one Redis server, with millisecond ttls, fencing tokens and a FIFO hand-off.

The protocol is ours, and all its Lua is in :mod:`~nocluster.locks.backends.redis_scripts` (one round trip per
acquire attempt, release, extend and force release). python-redis-lock 4.0.1 is not imported; what we took from
its design: the lock is one string key holding the owner id, set only when free and with an expiry; the release is
owner-checked (its ``UNLOCK_SCRIPT``: compare the stored owner id, then let go, with its return codes); waiters
block in ``BLPOP`` until a release wakes them, instead of polling. None of its code fits unchanged: its ``Lock``
truncates ``expire`` and the wait ``timeout`` to whole seconds with ``int()`` (the spec's ``ttl=0.5`` would be 0)
and names the key ``lock:<name>`` (the spec's is ``"{app}:lock:{key}"``); its ``UNLOCK_SCRIPT``, ``EXTEND_SCRIPT``
and ``RESET_SCRIPT`` delete the lock and wake waiters through a shared signal list, or extend in whole seconds,
so using them would skip the queued waiters (or cost a round trip to learn first that none is queued) and leave a
``lock-signal:`` list behind. It stays in ``requirements.txt`` as the baseline ``benchmarks/locks.py`` measures.

What is ours, and why:

- millisecond ttls (``PX``, ``PEXPIRE``) and sub-second waits, because of the ``int()`` above;
- a fencing token, ``INCR`` of the app's token sequence in the acquiring script (python-redis-lock has none;
  see :mod:`nocluster.locks.backend`);
- the FIFO hand-off: with a shared signal list whoever comes first takes the lock (often the releaser itself,
  looping) while the woken waiter is still being scheduled. Ours queues each waiter, and a release gives the
  lock straight to the longest-waiting live waiter (its owner id, its ttl, a new token) and pushes that token
  onto the waiter's own grant list, which it is blocked on: waiters are served in arrival order, and the woken
  one already holds the lock, so a hand-off costs no second round trip;
- the waiter loop (:class:`Acquisition`): attempt, then ``BLPOP`` for at most the holder's remaining ``PTTL``,
  the caller's remaining timeout and :data:`WAIT_CHUNK` (at most half the socket timeout, so a wait never trips
  ``socket_timeout``: redis-py#2807), then renew the waiter record and repeat; on timeout or any exception the
  waiter leaves the queue and releases a lock handed to it meanwhile;
- the waiter count of :meth:`RedisLockBackend.inspect` and ``scan``: the queued waiters whose record is alive
  (``WAITING_SCRIPT``), so a waiter killed while it waits stops counting once its record expires (at most
  :data:`WAIT_CHUNK` + :data:`WAITER_GRACE` seconds), even while live waiters keep the queue itself alive.

Durations are seconds everywhere here: ``redis_scripts.to_ms`` alone turns them into the milliseconds Redis is sent
(``from_ms`` reads PTTL replies back). Redis checks blocking-command timeouts on its timer (``hz``, 10 by
default), so a wait that ends by timeout, not by a release, may end up to ~100 ms late. A release wakes the next
waiter at once.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from nocluster.durations import optional_seconds, seconds
from nocluster.errors import BackendUnavailable
from nocluster.globs import glob_escape
from nocluster.locks.backend import Lease, LockBackend, LockInfo
from nocluster.locks.backends.redis_scripts import Attempt, LockScripts, Mode, from_ms

# Shortest BLPOP timeout we send, in seconds (0 would mean "forever" to Redis).
MIN_BLOCK = 0.001
# Smallest socket_timeout accepted (seconds): a BLPOP of half of it, ended up to ~100 ms late, still fits.
MIN_SOCKET_TIMEOUT = 0.5
# Longest BLPOP of a waiter (seconds): it then renews its waiter record, so a dead waiter is forgotten soon.
WAIT_CHUNK = 2.0
# How long a waiter record outlives the BLPOP it was written for (seconds): the time to come back and renew it.
WAITER_GRACE = 2.0


class Acquisition:
    """One acquisition of the lock ``name``: one attempt, or a wait in the lock's queue until a release hands it over.

    Parameters:
      scripts: the lock scripts, registered on the client this acquisition uses (its ``BLPOP`` too).
      name: the full lock name; ``sequence``: the counter the fencing token comes from.
      owner: the owner prefix ``"{instance_id}:{nonce}"``, unique per acquisition; its nonce is the waiter id.
      ttl: seconds the lock stays held once granted.
      chunk: seconds a single ``BLPOP`` lasts at most; the waiter record outlives it by :data:`WAITER_GRACE`.
      signal_expire: seconds a hand-off waits in a waiter's grant list (when this one lets go of the lock).

    Attributes:
      token: the fencing token once held (None before); ``owner_id`` is then the stored ``"{owner}:{token}"``.
    """

    def __init__(
        self,
        scripts: LockScripts,
        name: str,
        sequence: str,
        owner: str,
        ttl: float,
        *,
        chunk: float,
        signal_expire: float,
    ) -> None:
        self.name = name
        self.owner = owner
        self.token: int | None = None
        self._scripts = scripts
        self._sequence = sequence
        self._waiter = owner.rsplit(":", 1)[-1]
        self._grant_list = f"lock-grant:{name}:{self._waiter}"
        self._ttl = ttl
        self._chunk = chunk
        self._record_life = chunk + WAITER_GRACE
        self._signal_expire = signal_expire

    @property
    def owner_id(self) -> str:
        """The value of the lock key while this acquisition holds it: ``"{owner}:{token}"``."""
        return f"{self.owner}:{self.token}"

    def acquire(self, timeout: float | None) -> bool:
        """Take the lock, waiting up to ``timeout`` seconds (None: forever; 0: one attempt). True when held.

        A waiter queues up on its first attempt and is handed the lock by a release, oldest waiter first. When
        ``timeout`` passes it leaves the queue; if the lock was handed to it at that instant it keeps it (True).
        """
        if timeout == 0:
            return self._attempt("try").held
        try:
            return self._wait(timeout)
        except BaseException:
            # Raised while queued (Redis unreachable, a signal handler, KeyboardInterrupt): leave the queue, so a
            # release does not hand the lock to a waiter that is gone, and let go of it if that just happened.
            self._leave_after_error()
            raise

    def release(self) -> bool:
        """Let go of the lock, handing it to the next waiter; False when it was no longer ours."""
        return self._scripts.release(self.name, self.owner_id, self._signal_expire)

    def _attempt(self, mode: Mode) -> Attempt:
        scripts, life = self._scripts, self._record_life
        attempt = scripts.acquire(self.name, self._sequence, self.owner, self._waiter, self._ttl, life, mode)
        if attempt.held:
            self.token = attempt.token
        return attempt

    def _wait(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        mode: Mode = "wait"
        while True:
            attempt = self._attempt(mode)
            if attempt.held or mode == "leave":
                return attempt.held
            left = attempt.holder_left
            wait = self._chunk if left is None else min(self._chunk, left)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    mode = "leave"
                    continue
                wait = min(wait, remaining)
            granted = self._scripts.client.blpop([self._grant_list], timeout=max(MIN_BLOCK, wait))
            if granted is not None:
                self.token = int(granted[1])
                return True

    def _leave_after_error(self) -> None:
        # Best effort: Redis may be why we are here; then the waiter record expires by itself.
        with contextlib.suppress(Exception):
            if self.token is not None or self._attempt("leave").held:
                self.release()


def _parse(name: str, value: object, pttl: object, waiting: object = 0) -> LockInfo | None:
    if not isinstance(value, (bytes, str)) or not isinstance(pttl, int) or pttl == -2:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    parts = text.rsplit(":", 2)
    token = int(parts[2]) if len(parts) == 3 and parts[2].isdigit() else None
    instance_id = parts[0] if token is not None else text
    return LockInfo(name, name, instance_id, token, from_ms(pttl), waiting if isinstance(waiting, int) else 0)


class RedisLockBackend(LockBackend):
    """Locks in one Redis server, shared by every node; waiters are served in arrival order.

    Parameters (``NOCLUSTER["LOCKS"]["OPTIONS"]``, keyword-only):
      url: the Redis URL (``redis://host:port/db``).
      socket_timeout: seconds a Redis call may take before redis-py gives up (default 30; at least 0.5). A wait
        is cut into ``BLPOP`` calls of at most half of it, so a long wait never trips it. None: no limit.
      connect_timeout: seconds to connect (default 5).
      signal_expire: seconds a hand-off waits in a waiter's list (default 1); a waiter that comes back later
        still finds the lock under its owner id.
    """

    def __init__(
        self,
        *,
        url: str,
        socket_timeout: float | None = 30.0,
        connect_timeout: float = 5.0,
        signal_expire: float = 1.0,
    ) -> None:
        if not url:
            raise ValueError("RedisLockBackend needs a Redis url (NOCLUSTER['LOCKS']['OPTIONS']['url'])")
        socket_timeout = optional_seconds(socket_timeout, "RedisLockBackend: socket_timeout")
        connect_timeout = seconds(connect_timeout, "RedisLockBackend: connect_timeout")
        signal_expire = seconds(signal_expire, "RedisLockBackend: signal_expire", most=3600)
        if socket_timeout is not None and socket_timeout < MIN_SOCKET_TIMEOUT:
            # A wait is a BLPOP of half of it, which Redis may end up to ~100 ms late (hz 10).
            raise ValueError(
                f"RedisLockBackend: socket_timeout must be at least {MIN_SOCKET_TIMEOUT} s (or None), "
                f"got {socket_timeout!r}"
            )
        self.url = url
        # No retry: acquire and release are not idempotent, a blind retry could report a held lock as lost.
        self._client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout, retry=Retry(NoBackoff(), 0)
        )
        self._scripts = LockScripts(self._client)
        self._chunk = WAIT_CHUNK if socket_timeout is None else min(WAIT_CHUNK, socket_timeout / 2)
        self._signal_expire = signal_expire

    @contextmanager
    def _errors(self, name: str) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise BackendUnavailable(f"lock {name!r}: Redis at {self.url} is unavailable: {exc}") from exc
        except redis.RedisError as exc:  # READONLY after a failover, OOM...: the lock state is unknown
            raise BackendUnavailable(f"lock {name!r}: Redis at {self.url} refused the command: {exc}") from exc

    def acquire(self, name: str, instance_id: str, ttl: float, timeout: float | None, sequence: str) -> Lease | None:
        owner = f"{instance_id}:{secrets.token_hex(8)}"
        acquisition = Acquisition(
            self._scripts, name, sequence, owner, ttl, chunk=self._chunk, signal_expire=self._signal_expire
        )
        with self._errors(name):
            if not acquisition.acquire(timeout):
                return None
        assert acquisition.token is not None
        return Lease(name, acquisition.token, acquisition.owner_id)

    def release(self, lease: Lease) -> bool:
        with self._errors(lease.name):
            return self._scripts.release(lease.name, lease.owner, self._signal_expire)

    def extend(self, lease: Lease, ttl: float) -> bool:
        with self._errors(lease.name):
            return self._scripts.extend(lease.name, lease.owner, ttl)

    def inspect(self, name: str) -> LockInfo | None:
        with self._errors(name):
            pipe = self._client.pipeline(transaction=False)
            pipe.get(name)
            pipe.pttl(name)
            self._scripts.queue_waiting(pipe, name)
            value, pttl, waiting = pipe.execute(raise_on_error=False)
        return _parse(name, value, pttl, waiting)

    def scan(self, prefix: str, pattern: str = "*") -> list[LockInfo]:
        with self._errors(prefix + pattern):
            match = glob_escape(prefix) + pattern
            names = sorted({n.decode() for n in self._client.scan_iter(match=match, count=1000)})
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.get(name)
                pipe.pttl(name)
                self._scripts.queue_waiting(pipe, name)
            results = pipe.execute(raise_on_error=False) if names else []
        found = (_parse(name, *results[3 * i : 3 * i + 3]) for i, name in enumerate(names))
        return [info for info in found if info is not None]

    def force_release(self, name: str, token: int | None = None) -> bool:
        with self._errors(name):
            return self._scripts.force_release(name, token, self._signal_expire)

    def after_fork(self) -> None:
        # Connections must not be shared with the parent (redis-py also checks the pid; this makes it explicit).
        self._client.connection_pool.reset()

    def close(self) -> None:
        self._client.close()
        self._client.connection_pool.disconnect()
