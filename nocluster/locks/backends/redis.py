"""RedisLockBackend: python-redis-lock 4.0.1, extended to millisecond ttls, fencing tokens and a FIFO hand-off.

python-redis-lock turns ``expire`` and the wait ``timeout`` into whole seconds with ``int()``, so the spec's
``ttl=0.5`` would become 0. :class:`MillisecondLock` subclasses its ``Lock`` and keeps its model: the lock is
one string key holding the owner id, set with ``NX`` and an expiry; a release is owner-checked (compare the
stored owner id, then let go: its ``UNLOCK_SCRIPT``); waiters block in ``BLPOP`` until a release wakes them
instead of polling.

What is ours (Lua, one round trip each):

- acquire: ``SET`` with ``PX <ms>`` when the lock is free, plus ``INCR`` of the app's token sequence, the
  fencing token, in the same script;
- the hand-off: python-redis-lock's release pushes one element onto a shared signal list, and whoever comes
  first (often the releaser itself, looping) takes the lock while the woken waiter is still being scheduled.
  Ours queues each waiter and its release gives the lock straight to the longest-waiting live waiter (its
  owner id, its ttl, a new token) and pushes that token onto the waiter's own list, which it is blocked on.
  Waiters are served in arrival order, and the woken one already holds the lock: no second round trip;
- a wait is ``BLPOP`` for at most the holder's remaining ``PTTL``, the caller's remaining timeout, half the
  socket timeout and :data:`WAIT_CHUNK`, so sub-second waits work and a wait never trips ``socket_timeout``
  (redis-py#2807); extend is ``PEXPIRE`` (ms).

Keys of the lock named ``N`` (``"{app.name}:lock:{key}"``):
  ``N``                    string, the owner id ``"{instance_id}:{nonce}:{token}"`` (python-redis-lock's
                           ``lock:<name>``); expires after the holder's ttl (PX, whole milliseconds, rounded up).
  ``lock-queue:N``         list of waiter ids, oldest first.
  ``lock-waiter:N:W``      waiter ``W`` (its nonce): JSON ``[ttl ms, token sequence, owner prefix]``. It expires
                           :data:`WAITER_GRACE` after the waiter's current ``BLPOP`` would end, and the waiter renews
                           it each time it comes back, so a waiter killed while queued is skipped once it expires
                           (until then a release may hand it the lock, which then frees itself after that ttl).
  ``lock-grant:N:W``       the waiter's list: the release pushes its token there (expires after ``signal_expire``;
                           a waiter that comes back later still finds the lock under its owner id).
  ``{app}:lock-tokens``    the fencing-token sequence (named by the manager); one per app, never expires.

A release reaches keys it computes from the waiter ids (not declared in ``KEYS``): one Redis server, not Redis
Cluster. Redis's blocking-command timeouts are checked on its timer (``hz``, 10 by default), so a wait that ends
by timeout, not by a release, may end up to ~100 ms late. A release wakes the next waiter at once.
"""

from __future__ import annotations

import contextlib
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

# Hands lock ``lock`` to the oldest live waiter in its queue, skipping waiters whose record expired (they died or
# gave up). True when handed over; false when nobody waits (the caller then deletes the lock). ``box_ms``: how
# long the token waits in the waiter's list.
GRANT_FUNCTION = b"""
local function grant(lock, box_ms)
    local queue = "lock-queue:" .. lock
    while true do
        local waiter = redis.call("lpop", queue)
        if not waiter then
            return false
        end
        local record = "lock-waiter:" .. lock .. ":" .. waiter
        local found = redis.call("get", record)
        if found then
            redis.call("del", record)
            local ttl_ms, sequence, owner = unpack(cjson.decode(found))
            local token = redis.call("incr", sequence)
            redis.call("set", lock, owner .. ":" .. token, "PX", ttl_ms)
            local box = "lock-grant:" .. lock .. ":" .. waiter
            redis.call("rpush", box, token)
            redis.call("pexpire", box, box_ms)
            return true
        end
    end
end
"""

# KEYS[1] lock, KEYS[2] token sequence. ARGV[1] owner prefix "{instance_id}:{nonce}", ARGV[2] ttl in ms,
# ARGV[3] waiter id (the nonce), ARGV[4] ms the waiter record lives, ARGV[5] mode: "try" (one attempt), "wait"
# (queue up, or stay queued), "leave" (a last attempt, then out of the queue). Returns {1, token} when held,
# else {0, the holder's PTTL}. The queue, record and grant list keys are derived from the lock's name.
ACQUIRE_SCRIPT = b"""
local queue = "lock-queue:" .. KEYS[1]
local record = "lock-waiter:" .. KEYS[1] .. ":" .. ARGV[3]
local granted = redis.call("lpop", "lock-grant:" .. KEYS[1] .. ":" .. ARGV[3])
local holder = redis.call("get", KEYS[1])
if granted and holder == ARGV[1] .. ":" .. granted then
    return {1, tonumber(granted)}
end
if holder then
    local mine = ARGV[1] .. ":"
    if string.sub(holder, 1, #mine) == mine then
        -- handed to us while we were away for longer than the grant list lives
        return {1, tonumber(string.sub(holder, #mine + 1))}
    end
    if ARGV[5] == "wait" then
        if redis.call("exists", record) == 0 then
            redis.call("rpush", queue, ARGV[3])
        end
        redis.call("set", record, cjson.encode({ARGV[2], KEYS[2], ARGV[1]}), "PX", ARGV[4])
        if redis.call("pttl", queue) < tonumber(ARGV[4]) then
            redis.call("pexpire", queue, ARGV[4])
        end
    elseif ARGV[5] == "leave" and redis.call("del", record) == 1 then
        redis.call("lrem", queue, 1, ARGV[3])
    end
    return {0, redis.call("pttl", KEYS[1])}
end
if ARGV[5] ~= "try" and redis.call("del", record) == 1 then
    redis.call("lrem", queue, 1, ARGV[3])
end
local token = redis.call("incr", KEYS[2])
redis.call("set", KEYS[1], ARGV[1] .. ":" .. token, "PX", ARGV[2])
return {1, token}
"""

# python-redis-lock's UNLOCK_SCRIPT (owner-checked: compare the stored owner id, then let go), letting go by
# handing the lock to the next waiter. KEYS[1] lock; ARGV[1] owner id, ARGV[2] grant list expiry in ms.
# Returns 0 when released, 1 when the lock was not ours.
RELEASE_SCRIPT = (
    GRANT_FUNCTION
    + b"""
if redis.call("get", KEYS[1]) ~= ARGV[1] then
    return 1
end
if not grant(KEYS[1], ARGV[2]) then
    redis.call("del", KEYS[1])
end
return 0
"""
)

# KEYS[1] lock; ARGV[1] owner id, ARGV[2] ttl in ms. Returns 1 when extended, 0 when the lock was lost.
EXTEND_MS_SCRIPT = b"""
    if redis.call("get", KEYS[1]) ~= ARGV[1] then
        return 0
    end
    redis.call("pexpire", KEYS[1], ARGV[2])
    return 1
"""

# python-redis-lock's RESET_SCRIPT (let go whoever holds it) when the holder's token is ARGV[1] (or ARGV[1] is
# empty), so an operator's release of the holder they saw never frees the holder that came after it; the next
# waiter gets the lock. KEYS[1] lock; ARGV[2] grant list expiry in ms. Returns 1 when released.
FORCE_RELEASE_SCRIPT = (
    GRANT_FUNCTION
    + b"""
local value = redis.call("get", KEYS[1])
if not value then
    return 0
end
if ARGV[1] ~= "" and string.match(value, ":(%d+)$") ~= ARGV[1] then
    return 0
end
if not grant(KEYS[1], ARGV[2]) then
    redis.call("del", KEYS[1])
end
return 1
"""
)

# Shortest BLPOP timeout we send, in seconds (0 would mean "forever" to Redis).
MIN_BLOCK = 0.001
# Smallest socket_timeout accepted (seconds): a BLPOP of half of it, ended up to ~100 ms late, still fits.
MIN_SOCKET_TIMEOUT = 0.5
# Longest BLPOP of a waiter (seconds): it then renews its waiter record, so a dead waiter is forgotten soon.
WAIT_CHUNK = 2.0
# How long a waiter record outlives the BLPOP it was written for (seconds): the time to come back and renew it.
WAITER_GRACE = 2.0


def to_ms(seconds: float) -> int:
    """Seconds to whole milliseconds, rounded up, at least 1."""
    return max(1, math.ceil(seconds * 1000))


class MillisecondLock(redis_lock.Lock):
    """python-redis-lock's ``Lock`` with a float ``expire`` in seconds kept to the millisecond, sub-second
    ``acquire(timeout=...)``, a fencing token (``self.token``) taken in the acquiring round trip, and waiters
    served in arrival order.

    The lock lives at ``name`` itself (not ``lock:<name>``) so its key is the spec's ``"{app}:lock:{key}"``.
    ``id`` is the owner prefix (``"{instance_id}:{nonce}"``, unique per acquisition); once acquired, ``self.id``
    is the stored owner id ``"<prefix>:<token>"``.
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
        self._token_key = sequence
        self._expire = expire
        self._expire_ms = to_ms(expire)
        self._waiter = id.rsplit(":", 1)[-1]
        self.token: int | None = None

    @classmethod
    def register_ms_scripts(cls, redis_client: redis.Redis) -> None:
        """Register our scripts once per process, all before any is used (a Script works on any client)."""
        if cls.acquire_script is None:
            extend = redis_client.register_script(EXTEND_MS_SCRIPT)
            force_release = redis_client.register_script(FORCE_RELEASE_SCRIPT)
            release = redis_client.register_script(RELEASE_SCRIPT)
            cls.extend_ms_script, cls.force_release_script, cls.release_script = extend, force_release, release
            cls.acquire_script = redis_client.register_script(ACQUIRE_SCRIPT)

    def _held_as(self, token: Any) -> bool:
        self.token = int(token)
        self._id = f"{self._id}:{self.token}"
        return True

    def acquire(self, blocking: bool = True, timeout: float | None = None, max_block: float = 10.0) -> bool:
        """Take the lock; wait up to ``timeout`` seconds (None: forever) when ``blocking``. True when held.

        A waiter queues up on its first attempt and is handed the lock by a release, oldest waiter first. When
        ``timeout`` passes it leaves the queue; if the lock was handed to it at that instant it keeps it (True).
        """
        chunk = min(max_block, WAIT_CHUNK)  # the longest BLPOP; the waiter record outlives it by WAITER_GRACE
        if not blocking or timeout == 0:
            return self._attempt("try", chunk)[0]
        try:
            return self._wait(timeout, chunk)
        except BaseException:
            # Raised while queued (Redis unreachable, a signal handler, KeyboardInterrupt): leave the queue, so a
            # release does not hand the lock to a waiter that is gone, and let go of it if that just happened.
            self._leave_after_error(chunk)
            raise

    def _attempt(self, mode: str, chunk: float) -> tuple[bool, int]:
        """One run of the acquire script: (True, token) when held, else (False, the holder's PTTL)."""
        acquired, value = self.acquire_script(
            keys=(self._name, self._token_key),
            args=(self._id, self._expire_ms, self._waiter, to_ms(chunk + WAITER_GRACE), mode),
            client=self._client,
        )
        return (self._held_as(value), value) if acquired else (False, value)

    def _wait(self, timeout: float | None, chunk: float) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        grant_list = f"lock-grant:{self._name}:{self._waiter}"
        mode = "wait"
        while True:
            acquired, value = self._attempt(mode, chunk)
            if acquired or mode == "leave":
                return acquired
            # value is the holder's PTTL (-1: it has no expiry, a foreign key).
            wait = chunk if value < 0 else min(chunk, value / 1000)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    mode = "leave"
                    continue
                wait = min(wait, remaining)
            granted = self._client.blpop([grant_list], timeout=max(MIN_BLOCK, wait))
            if granted is not None:
                return self._held_as(granted[1])

    def _leave_after_error(self, chunk: float) -> None:
        # Best effort: Redis may be why we are here; then the waiter record expires by itself.
        with contextlib.suppress(Exception):
            if self.token is not None or self._attempt("leave", chunk)[0]:
                self.release()

    def release(self) -> None:
        """Release the lock, handing it to the next waiter. Raises ``redis_lock.NotAcquired`` if it was lost."""
        if self.release_script(keys=(self._name,), args=(self._id, self._signal_expire), client=self._client):
            raise redis_lock.NotAcquired(f"Lock {self._name} is not acquired or it already expired.")

    def reset(self) -> None:
        """Let go of the lock whoever holds it (python-redis-lock's ``reset``); the next waiter gets it."""
        self.force_release_script(keys=(self._name,), args=("", self._signal_expire), client=self._client)

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

    def acquire(self, name: str, instance_id: str, ttl: float, timeout: float | None, sequence: str) -> Lease | None:
        owner = f"{instance_id}:{secrets.token_hex(8)}"
        lock = MillisecondLock(self._client, name, ttl, owner, self._signal_expire, sequence)
        with self._errors(name):
            if not lock.acquire(timeout=timeout, max_block=self._max_block):
                return None
        assert lock.token is not None
        return Lease(name, lock.token, lock.id)

    def release(self, lease: Lease) -> bool:
        with self._errors(lease.name):
            error = MillisecondLock.release_script(
                keys=(lease.name,), args=(lease.owner, self._signal_expire), client=self._client
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
                keys=(name,),
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
