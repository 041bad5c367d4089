"""RedisRateLimiter: rate limits in one Redis server, shared by every node of the cluster.

One Lua script call per reservation (one round trip per message), on Redis's own clock (``TIME``), so the nodes'
clocks do not matter. A limit is one string key, its next slot's start in microseconds of Redis time, which
expires when that slot has passed: an idle limit leaves nothing behind. Needs Redis 5 or later (a script that
reads ``TIME`` and then writes is replicated by its effects). One Redis server, not Redis Cluster.
"""

from __future__ import annotations

import math
from typing import Any

import redis

from nocluster.durations import seconds
from nocluster.errors import BackendUnavailable
from nocluster.queue.rates.backend import RateLimiter, Reservation
from nocluster.queue.rates.limit import RateLimit

# KEYS[1] the limit. ARGV[1] its interval, ARGV[2] the horizon, both whole microseconds.
# Returns {1, microseconds until the booked slot} or {0, microseconds until the next free slot} (nothing booked).
RESERVE_SCRIPT = b"""
local clock = redis.call("time")
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local start = tonumber(redis.call("get", KEYS[1]) or "0")
if start < now then
    start = now
end
local wait = start - now
if wait > tonumber(ARGV[2]) then
    return {0, wait}
end
local following = start + tonumber(ARGV[1])
redis.call("set", KEYS[1], string.format("%.0f", following), "PX", math.ceil((following - now) / 1000) + 1)
return {1, wait}
"""


def to_us(value: float, *, up: bool) -> int:
    """Seconds as whole microseconds, rounded up (an interval: never faster than the limit) or down."""
    return math.ceil(value * 1_000_000) if up else math.floor(value * 1_000_000)


class RedisRateLimiter(RateLimiter):
    """Parameters (``NOCLUSTER["RATE_LIMITS"]["OPTIONS"]``, keyword-only):
    url: the Redis URL (``redis://host:port/db``); settings/base.py gives ``REDIS_URL``, the locks' Redis.
    socket_timeout: seconds a call may take (default 5); connect_timeout: seconds to connect (default 5).
    """

    def __init__(self, *, url: str, socket_timeout: float = 5.0, connect_timeout: float = 5.0) -> None:
        if not isinstance(url, str) or not url:
            raise ValueError("RedisRateLimiter needs a Redis url (NOCLUSTER['RATE_LIMITS']['OPTIONS']['url'])")
        self.url = url
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=seconds(socket_timeout, "RedisRateLimiter option socket_timeout"),
            socket_connect_timeout=seconds(connect_timeout, "RedisRateLimiter option connect_timeout"),
        )
        self._reserve: Any = self._client.register_script(RESERVE_SCRIPT)

    def reserve(self, key: str, limit: RateLimit, horizon: float) -> Reservation:
        try:
            booked, wait = self._reserve(keys=[key], args=[to_us(limit.interval, up=True), to_us(horizon, up=False)])
        except redis.RedisError as exc:
            raise BackendUnavailable(f"rate limit {key!r}: Redis at {self.url} failed: {exc}") from exc
        return Reservation(bool(booked), int(wait) / 1_000_000)

    def ping(self) -> None:
        self._client.ping()

    def after_fork(self) -> None:
        # Connections must not be shared with the parent (redis-py also checks the pid; this makes it explicit).
        self._client.connection_pool.reset()

    def close(self) -> None:
        self._client.connection_pool.disconnect()
