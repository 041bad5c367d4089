"""RedisLockBackend: python-redis-lock 4.0.1, extended to millisecond ttls, sub-second waits and fencing tokens.

python-redis-lock turns ``expire`` and the wait ``timeout`` into whole seconds with ``int()``, so the spec's
``ttl=0.5`` would become 0. :class:`MillisecondLock` subclasses its ``Lock`` and keeps what makes it good:

- the owner-checked release: its ``UNLOCK_SCRIPT`` (compare the stored owner id, delete, push one element onto
  the signal list), with one line added (the hand-off marker, below), and its ``RESET_SCRIPT`` semantics for a
  force release;
- its wake-up: waiters block in ``BLPOP`` on the signal list instead of polling.

What is ours (Lua, on the same layout): acquire is one script that does ``SET NX PX <ms>`` and, on success,
``INCR`` of the app's token sequence, the fencing token, in the same round trip; extend is ``PEXPIRE`` (ms); a wait
is ``BLPOP`` for at most the holder's remaining ``PTTL``, the caller's remaining timeout and half the socket
timeout, so sub-second waits work and a wait never trips ``socket_timeout`` (redis-py#2807).

Keys of the lock named ``N`` (``"{app.name}:lock:{key}"``):
  ``N``               string, the owner id ``"{instance_id}:{nonce}:{token}"`` (python-redis-lock's ``lock:<name>``);
                      expires after the ttl (PX, rounded up to whole milliseconds).
  ``lock-signal:N``   python-redis-lock's signal list (one element, expires after ``signal_expire`` seconds).
  ``lock-handoff:N``  set by a release for ``HANDOFF_MS``: while it lives and a blocked waiter took the signal,
                      only that woken waiter may take the lock, so a releaser looping on the lock cannot starve
                      the waiters (fairness only; exclusion never depends on it).
  ``{app}:lock-tokens`` the fencing-token sequence (named by the manager); one per app, never expires.

Redis's blocking-command timeouts are checked on its timer (``hz``, 10 by default), so a wait that ends by
timeout, not by a release, may end up to ~100 ms late. A release wakes one waiter at once.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
import redis_lock
from redis.backoff import NoBackoff
from redis.retry import Retry

from nocluster.errors import BackendUnavailable
from nocluster.globs import glob_escape
from nocluster.locks.backend import Lease, LockBackend, LockInfo

# KEYS[1] lock, KEYS[2] token sequence, KEYS[3] hand-off marker, KEYS[4] signal list; ARGV[1] owner id prefix,
# ARGV[2] ttl in ms, ARGV[3] "1" when the caller was just woken by a release's signal.
# Returns {1, token} when acquired, else {0, ms to wait at most}: the holder's PTTL, or the rest of a hand-off.
# Hand-off (ours): a release whose signal a blocked waiter took (the list is empty again) leaves the lock to
# that waiter for a moment; a caller that was not woken must not barge in ahead of it. Only a fairness rule:
# exclusion does not depend on it, and the marker expires by itself if the waiter never comes.
ACQUIRE_SCRIPT = b"""
    local pttl = redis.call("pttl", KEYS[1])
    if pttl ~= -2 then
        return {0, pttl}
    end
    if ARGV[3] ~= "1" and redis.call("exists", KEYS[4]) == 0 then
        local handoff = redis.call("pttl", KEYS[3])
        if handoff > 0 then
            return {0, handoff}
        end
    end
    redis.call("del", KEYS[3])
    local token = redis.call("incr", KEYS[2])
    redis.call("set", KEYS[1], ARGV[1] .. ":" .. token, "PX", ARGV[2])
    return {1, token}
"""

# python-redis-lock's UNLOCK_SCRIPT (owner-checked: compare, delete, push one element onto the signal list),
# plus the hand-off marker. KEYS[1] lock, KEYS[2] signal, KEYS[3] hand-off; ARGV[1] owner id, ARGV[2] signal
# expiry in ms, ARGV[3] hand-off window in ms. Returns 0 when released, 1 when the lock was not ours.
RELEASE_SCRIPT = b"""
    if redis.call("get", KEYS[1]) ~= ARGV[1] then
        return 1
    end
    redis.call("del", KEYS[2])
    redis.call("lpush", KEYS[2], 1)
    redis.call("pexpire", KEYS[2], ARGV[2])
    redis.call("del", KEYS[1])
    redis.call("set", KEYS[3], 1, "PX", ARGV[3])
    return 0
"""

# How long a release keeps the lock for the waiter it woke (ms): longer than a scheduling delay on a busy box.
HANDOFF_MS = 5

# KEYS[1] lock; ARGV[1] owner id, ARGV[2] ttl in ms. Returns 1 when extended, 0 when the lock was lost.
EXTEND_MS_SCRIPT = b"""
    if redis.call("get", KEYS[1]) ~= ARGV[1] then
        return 0
    end
    redis.call("pexpire", KEYS[1], ARGV[2])
    return 1
"""

# python-redis-lock's RESET_SCRIPT (delete, wake one waiter) when the holder's token is ARGV[1] (or ARGV[1] is
# empty): an operator's release of the holder they saw never frees the holder that came after it.
FORCE_RELEASE_SCRIPT = b"""
local value = redis.call("get", KEYS[1])
if not value then
    return 0
end
if ARGV[1] ~= "" and string.match(value, ":(%d+)$") ~= ARGV[1] then
    return 0
end
redis.call("del", KEYS[2])
redis.call("lpush", KEYS[2], 1)
redis.call("pexpire", KEYS[2], ARGV[2])
redis.call("del", KEYS[1])
return 1
"""

# Shortest BLPOP timeout we send, in seconds (0 would mean "forever" to Redis).
MIN_BLOCK = 0.001


def to_ms(seconds: float) -> int:
    """Seconds to whole milliseconds, rounded up, at least 1."""
    return max(1, math.ceil(seconds * 1000))


class MillisecondLock(redis_lock.Lock):
    """python-redis-lock's ``Lock`` with a float ``expire`` in seconds kept to the millisecond, sub-second
    ``acquire(timeout=...)``, and a fencing token (``self.token``) taken in the acquiring round trip.

    The lock lives at ``name`` itself (not ``lock:<name>``) so its key is the spec's ``"{app}:lock:{key}"``.
    """

    acquire_script: Any = None
    release_script: Any = None
    extend_ms_script: Any = None
    force_release_script: Any = None

    def __init__(
        self,
        redis_client: redis.Redis,
        name: str,
        expire: float,
        id: str,
        signal_expire: int = 1000,
        sequence: str = "",
    ) -> None:
        # Register python-redis-lock's scripts on its own class first: its register_scripts() runs once per
        # process (a module global), so registering through this subclass would leave plain Locks without them.
        redis_lock.Lock.register_scripts(redis_client)
        super().__init__(redis_client, name, expire=None, id=id, signal_expire=signal_expire)
        self._name = name
        self._signal = f"lock-signal:{name}"
        self._token_key = sequence
        self._expire = expire
        self._expire_ms = to_ms(expire)
        self.token: int | None = None

    @classmethod
    def register_ms_scripts(cls, redis_client: redis.Redis) -> None:
        """Register our scripts once per process, both before either is used (a Script works on any client)."""
        if cls.acquire_script is None:
            extend = redis_client.register_script(EXTEND_MS_SCRIPT)
            force_release = redis_client.register_script(FORCE_RELEASE_SCRIPT)
            release = redis_client.register_script(RELEASE_SCRIPT)
            cls.extend_ms_script, cls.force_release_script, cls.release_script = extend, force_release, release
            cls.acquire_script = redis_client.register_script(ACQUIRE_SCRIPT)

    def acquire(self, blocking: bool = True, timeout: float | None = None, max_block: float = 10.0) -> bool:
        """Take the lock; wait up to ``timeout`` seconds (None: forever) when ``blocking``. True when held.

        On success ``self.id`` becomes ``"<id>:<token>"``, the value python-redis-lock's release compares.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        woken = False
        while True:
            acquired, value = self.acquire_script(
                keys=(self._name, self._token_key, f"lock-handoff:{self._name}", self._signal),
                args=(self._id, self._expire_ms, "1" if woken else "0"),
                client=self._client,
            )
            if acquired:
                self.token = int(value)
                self._id = f"{self._id}:{self.token}"
                return True
            # value is the holder's PTTL: -2 it just vanished (retry now), -1 it has no expiry (foreign key).
            wait = max_block if value == -1 else value / 1000
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                wait = min(wait, remaining)
            if not blocking:
                return False
            woken = False
            if value != -2:
                woken = self._client.blpop([self._signal], timeout=max(MIN_BLOCK, min(wait, max_block))) is not None

    def extend(self, expire: float | None = None) -> None:
        """Set the time left to ``expire`` seconds (default: the ttl). Raises ``redis_lock.NotAcquired`` if lost."""
        ms = self._expire_ms if expire is None else to_ms(expire)
        if not self.extend_ms_script(keys=(self._name,), args=(self._id, ms), client=self._client):
            raise redis_lock.NotAcquired(f"Lock {self._name} is not acquired or it already expired.")


def _parse(name: str, value: bytes | str | None, pttl: int) -> LockInfo | None:
    if value is None or isinstance(value, Exception) or pttl == -2:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    parts = text.rsplit(":", 2)
    token = int(parts[2]) if len(parts) == 3 and parts[2].isdigit() else None
    instance_id = parts[0] if token is not None else text
    return LockInfo(name, name, instance_id, token, None if pttl < 0 else pttl / 1000)


class RedisLockBackend(LockBackend):
    """Locks in one Redis server, shared by every node.

    Parameters (``NOCLUSTER["LOCKS"]["OPTIONS"]``, keyword-only):
      url: the Redis URL (``redis://host:port/db``).
      socket_timeout: seconds a Redis call may take before redis-py gives up (default 30). A wait is cut into
        ``BLPOP`` calls of at most half of it, so a long wait never trips it. None: no limit.
      connect_timeout: seconds to connect (default 5).
      signal_expire: seconds a release's wake-up signal stays for a waiter that was not yet blocking (default 1).
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
        self.url = url
        # No retry: acquire and release are not idempotent, a blind retry could report a held lock as lost.
        self._client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout, retry=Retry(NoBackoff(), 0)
        )
        self._max_block = socket_timeout / 2 if socket_timeout else 10.0
        redis_lock.Lock.register_scripts(self._client)
        MillisecondLock.register_ms_scripts(self._client)
        self._signal_expire = to_ms(signal_expire)

    @contextmanager
    def _errors(self, name: str) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise BackendUnavailable(f"lock {name!r}: Redis at {self.url} is unavailable: {exc}") from exc
        except redis.RedisError as exc:  # READONLY after a failover, OOM...: the lock state is unknown
            raise BackendUnavailable(f"lock {name!r}: Redis at {self.url} refused the command: {exc}") from exc

    def _lock(self, name: str, ttl: float, owner: str, sequence: str = "") -> MillisecondLock:
        return MillisecondLock(self._client, name, ttl, owner, self._signal_expire, sequence)

    def acquire(self, name: str, instance_id: str, ttl: float, timeout: float | None, sequence: str) -> Lease | None:
        lock = self._lock(name, ttl, f"{instance_id}:{secrets.token_hex(8)}", sequence)
        with self._errors(name):
            if not lock.acquire(timeout=timeout, max_block=self._max_block):
                return None
        assert lock.token is not None
        return Lease(name, lock.token, lock.id)

    def release(self, lease: Lease) -> bool:
        # python-redis-lock's Lock.release() (its UNLOCK_SCRIPT's keys and checks) plus the hand-off marker.
        with self._errors(lease.name):
            error = MillisecondLock.release_script(
                client=self._client,
                keys=(lease.name, f"lock-signal:{lease.name}", f"lock-handoff:{lease.name}"),
                args=(lease.owner, self._signal_expire, HANDOFF_MS),
            )
        if error not in (0, 1):
            raise RuntimeError(f"lock {lease.name!r}: unexpected code {error!r} from the release script")
        return error == 0

    def extend(self, lease: Lease, ttl: float) -> bool:
        with self._errors(lease.name):
            return bool(
                MillisecondLock.extend_ms_script(
                    keys=(lease.name,), args=(lease.owner, to_ms(ttl)), client=self._client
                )
            )

    def inspect(self, name: str) -> LockInfo | None:
        with self._errors(name):
            pipe = self._client.pipeline(transaction=False)
            value, pttl = pipe.get(name).pttl(name).execute(raise_on_error=False)
        return _parse(name, value, pttl)

    def scan(self, prefix: str, pattern: str = "*") -> list[LockInfo]:
        with self._errors(prefix + pattern):
            match = glob_escape(prefix) + pattern
            names = sorted({n.decode() for n in self._client.scan_iter(match=match, count=1000)})
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.get(name).pttl(name)
            results = pipe.execute(raise_on_error=False) if names else []
        found = (_parse(name, results[2 * i], results[2 * i + 1]) for i, name in enumerate(names))
        return [info for info in found if info is not None]

    def force_release(self, name: str, token: int | None = None) -> bool:
        with self._errors(name):
            released = MillisecondLock.force_release_script(
                keys=(name, f"lock-signal:{name}"),
                args=("" if token is None else str(token), self._signal_expire),
                client=self._client,
            )
        return released == 1

    def after_fork(self) -> None:
        # Connections must not be shared with the parent (redis-py also checks the pid; this makes it explicit).
        self._client.connection_pool.reset()

    def close(self) -> None:
        self._client.close()
        self._client.connection_pool.disconnect()
