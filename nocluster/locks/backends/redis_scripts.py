"""The Lua of :class:`~nocluster.locks.backends.redis.RedisLockBackend`: every script of its wire protocol, one
round trip each, and the one place where seconds become the milliseconds Redis is sent (:func:`to_ms`).

Part of the Redis backend (only ``redis.py`` imports it). Keys of the lock named ``N`` (``"{app.name}:lock:{key}"``):
  ``N``                    string, the owner id ``"{instance_id}:{nonce}:{token}"``; expires after the holder's ttl
                           (PX, whole milliseconds, rounded up).
  ``lock-queue:N``         list of waiter ids (their nonces), oldest first.
  ``lock-waiter:N:W``      waiter ``W``: JSON ``[ttl ms, token sequence, owner prefix]``; expires unless the waiter
                           renews it (a waiter killed while queued is then skipped).
  ``lock-grant:N:W``       the waiter's own list: a release pushes its token there; expires after ``signal_expire``.
  ``{app}:lock-tokens``    the fencing-token sequence (named by the manager); one per app, never expires.

The scripts reach keys they compute from the lock's name and the waiter ids (not declared in ``KEYS``): one Redis
server, not Redis Cluster.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import redis

# "try": one attempt; "wait": queue up (or stay queued, renewing the waiter record); "leave": a last attempt, then
# out of the queue.
Mode = Literal["try", "wait", "leave"]

# A Lua function, not a script: hands lock ``lock`` to the oldest live waiter in its queue, skipping waiters whose
# record expired (they died or gave up): sets the lock to that waiter's owner id with its ttl and a new token, and
# pushes the token onto the waiter's grant list, which lives ``box_ms``. Returns true when handed over, false when
# nobody waits (the caller then deletes the lock).
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
# ARGV[3] waiter id (the nonce), ARGV[4] ms the waiter record lives, ARGV[5] mode (see Mode).
# Returns {1, token} when held (taken now, or handed over by a release), else {0, the holder's PTTL in ms}.
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

# Owner-checked release (python-redis-lock's UNLOCK_SCRIPT, and its return codes), letting go by handing the lock
# to the next waiter. KEYS[1] lock; ARGV[1] owner id, ARGV[2] grant list life in ms.
# Returns 0 when released, 1 when the lock was not ours (expired, forced, taken by another).
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
EXTEND_SCRIPT = b"""
if redis.call("get", KEYS[1]) ~= ARGV[1] then
    return 0
end
redis.call("pexpire", KEYS[1], ARGV[2])
return 1
"""

# Let go whoever holds it, but only the holder whose token is ARGV[1] (when not empty), so an operator's release
# of the holder they saw never frees the holder that came after; the next waiter gets the lock. KEYS[1] lock;
# ARGV[1] token or "", ARGV[2] grant list life in ms. Returns 1 when released, 0 when free or another token.
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


# KEYS[1] lock. Returns how many waiters are queued for it and alive: a waiter whose record expired (it was killed,
# or gave up without leaving) is not counted, though its id stays in the queue until a release skips it.
WAITING_SCRIPT = b"""
local prefix = "lock-waiter:" .. KEYS[1] .. ":"
local live = 0
for _, waiter in ipairs(redis.call("lrange", "lock-queue:" .. KEYS[1], 0, -1)) do
    live = live + redis.call("exists", prefix .. waiter)
end
return live
"""


def to_ms(seconds: float) -> int:
    """Seconds to whole milliseconds, rounded up, at least 1: every duration sent to Redis goes through here."""
    return max(1, math.ceil(seconds * 1000))


def from_ms(ms: int) -> float | None:
    """A PTTL reply in milliseconds to seconds; None for a key without expiry (-1) or missing (-2)."""
    return None if ms < 0 else ms / 1000


class Attempt(NamedTuple):
    """What one run of the acquire script found.

    Attributes:
      held: True when the lock is ours now.
      token: the fencing token when held, else None.
      holder_left: when not held, seconds until the holder's ttl frees the lock (None: it never expires).
    """

    held: bool
    token: int | None
    holder_left: float | None


class LockScripts:
    """The lock scripts, registered once on ``client`` (redis-py loads each into the server on its first use).

    Durations are seconds; they become milliseconds here only.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._acquire = client.register_script(ACQUIRE_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)
        self._extend = client.register_script(EXTEND_SCRIPT)
        self._force_release = client.register_script(FORCE_RELEASE_SCRIPT)
        self._waiting = client.register_script(WAITING_SCRIPT)

    def acquire(
        self, name: str, sequence: str, owner: str, waiter: str, ttl: float, record_life: float, mode: Mode
    ) -> Attempt:
        """Take ``name`` for ``ttl`` seconds, or (``mode``) queue ``waiter``, its record living ``record_life`` s."""
        args = (owner, to_ms(ttl), waiter, to_ms(record_life), mode)
        held, value = self._acquire(keys=(name, sequence), args=args)
        return Attempt(True, int(value), None) if held else Attempt(False, None, from_ms(int(value)))

    def release(self, name: str, owner_id: str, signal_expire: float) -> bool:
        """Let go of ``name`` if ``owner_id`` holds it, handing it to the next waiter; False when it was not ours.

        ``signal_expire``: seconds the hand-off waits in the next waiter's grant list.
        """
        code = self._release(keys=(name,), args=(owner_id, to_ms(signal_expire)))
        if code not in (0, 1):
            raise RuntimeError(f"lock {name!r}: unexpected code {code!r} from the release script")
        return code == 0

    def extend(self, name: str, owner_id: str, ttl: float) -> bool:
        """Set the time left of ``name`` to ``ttl`` seconds if ``owner_id`` holds it; False when it was lost."""
        return bool(self._extend(keys=(name,), args=(owner_id, to_ms(ttl))))

    def queue_waiting(self, pipe: redis.client.Pipeline, name: str) -> None:
        """Add to ``pipe`` the count of live waiters of ``name`` (see :data:`WAITING_SCRIPT`); its reply is an int."""
        self._waiting(keys=(name,), client=pipe)

    def force_release(self, name: str, token: int | None, signal_expire: float) -> bool:
        """Let go of ``name`` whoever holds it (only under ``token``, when given); True when a lock was released."""
        args = ("" if token is None else str(token), to_ms(signal_expire))
        return bool(self._force_release(keys=(name,), args=args) == 1)
