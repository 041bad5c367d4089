"""Rate limits of queue channels: the ``"N/s|m|h"`` strings, the limiter contract on both limiters (process-local
and Redis GCRA), and the gate that waits for a slot or puts a message aside. Runs with real limits on both servers
are in test_contract.py (every queue backend) and test_rate_limits.py (the acceptance figure on Celery)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from nocluster import Application, UnknownChannel, checks
from nocluster.errors import BackendUnavailable
from nocluster.queue.rates import RateLimit, RateLimiter, Reservation
from nocluster.queue.rates.backends.local import LocalRateLimiter
from nocluster.queue.rates.backends.redis import RedisRateLimiter
from nocluster.queue.rates.gate import UNAVAILABLE_DELAY, take_slot
from tests.conftest import unique_name
from tests.helpers import free_port, wait_until

TEN_PER_SECOND = RateLimit(10, 1.0)


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [("20/s", 20, 1.0), (" 100/m ", 100, 60.0), ("1/h", 1, 3600.0), ("1000000/s", 1_000_000, 1.0)],
)
def test_a_rate_limit_is_n_per_second_minute_or_hour(text: str, count: int, period: float) -> None:
    limit = RateLimit.parse(text, "channel 'x': rate_limit")
    assert (limit.count, limit.period, limit.interval) == (count, period, period / count)
    assert str(limit) == text.strip()


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("20", ValueError),
        ("20/d", ValueError),
        ("0/s", ValueError),
        ("-1/s", ValueError),
        ("1.5/s", ValueError),
        ("20 / s", ValueError),
        ("", ValueError),
        ("1000001/s", ValueError),
        (20, TypeError),
        (True, TypeError),
    ],
)
def test_a_bad_rate_limit_is_refused_naming_the_channel(value: object, error: type[Exception]) -> None:
    app = Application(
        {"NAME": unique_name(), "EVENT_QUEUE": {"BACKEND": "nocluster.queue.backends.memory.MemoryQueueBackend"}}
    )
    with pytest.raises(error, match=r"channel 'orders': rate_limit must be"):
        app.event_queue.subscribe("orders", lambda payload, context: None, rate_limit=value)  # type: ignore[arg-type]
    # And nothing was subscribed
    with pytest.raises(UnknownChannel):
        app.event_queue.publish("orders", {})


def test_a_subscription_keeps_its_rate_limit() -> None:
    app = Application(
        {"NAME": unique_name(), "EVENT_QUEUE": {"BACKEND": "nocluster.queue.backends.memory.MemoryQueueBackend"}}
    )
    app.event_queue.subscribe("orders", lambda payload, context: None, rate_limit="100/m")
    app.event_queue.subscribe("other", lambda payload, context: None)
    assert app.event_queue.subscription("orders").rate_limit == RateLimit(100, 60.0)
    assert app.event_queue.subscription("other").rate_limit is None
    assert app.event_queue.rate_key("orders") == f"{app.name}:rate:orders"


# --- the limiter contract, on both limiters ---------------------------------------------------------------------
@pytest.fixture(params=["local", "redis"])
def limiter(request: pytest.FixtureRequest) -> Iterator[RateLimiter]:
    if request.param == "local":
        yield LocalRateLimiter()
        return
    found = RedisRateLimiter(url=request.getfixturevalue("redis_url"))
    yield found
    found.close()


@pytest.fixture
def key(request: pytest.FixtureRequest) -> Iterator[str]:
    """A key of this test only, under its own app name; its keys in Redis are deleted afterwards (they would
    expire by themselves, the hourly one after an hour)."""
    name = f"{unique_name()}:rate:orders"
    yield name
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("limiter") == "redis":
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        for found in client.scan_iter(match=f"{name}*"):
            client.delete(found)


def test_slots_are_booked_one_interval_apart(limiter: RateLimiter, key: str) -> None:
    # When five slots of 10/s are booked at once (a horizon of 1 s)
    started = time.monotonic()
    found = [limiter.reserve(key, TEN_PER_SECOND, 1.0) for _ in range(5)]
    elapsed = time.monotonic() - started

    # Then each is booked, the first now and each next one 0.1 s after the one before (less what passed meanwhile)
    assert all(reservation.booked for reservation in found)
    assert found[0].delay <= elapsed
    for index, reservation in enumerate(found):
        assert index * 0.1 - elapsed - 0.001 <= reservation.delay <= index * 0.1 + 0.001, found


def test_a_slot_beyond_the_horizon_is_not_booked(limiter: RateLimiter, key: str) -> None:
    # Given three slots booked (now, +0.1 s, +0.2 s)
    started = time.monotonic()
    for _ in range(3):
        assert limiter.reserve(key, TEN_PER_SECOND, 1.0).booked

    # When a caller only takes a slot starting within 0.05 s, it learns when the next one is, without booking it
    first = limiter.reserve(key, TEN_PER_SECOND, 0.05)
    second = limiter.reserve(key, TEN_PER_SECOND, 0.05)
    assert (first.booked, second.booked) == (False, False)
    assert 0.3 - (time.monotonic() - started) - 0.001 <= second.delay <= first.delay <= 0.3 + 0.001

    # And a caller with a longer horizon gets that very slot (nothing was booked meanwhile)
    booked = limiter.reserve(key, TEN_PER_SECOND, 1.0)
    assert booked.booked and booked.delay <= first.delay


def test_limits_of_two_keys_are_apart(limiter: RateLimiter, key: str) -> None:
    # A horizon of 0 books only a slot that starts now: the second call on the same key finds none
    assert limiter.reserve(key, TEN_PER_SECOND, 0.0) == Reservation(True, 0.0)
    assert not limiter.reserve(key, TEN_PER_SECOND, 0.0).booked
    # Another key has its own slots
    assert limiter.reserve(key + "-other", TEN_PER_SECOND, 0.0) == Reservation(True, 0.0)


def test_a_limit_left_alone_leaves_no_key_in_redis(redis_url: str, key: str) -> None:
    limiter = RedisRateLimiter(url=redis_url)
    client = redis.Redis.from_url(redis_url)
    # Given two slots of 10/s booked: the key lives until the second slot has passed (0.2 s), not longer
    limiter.reserve(key, TEN_PER_SECOND, 1.0)
    limiter.reserve(key, TEN_PER_SECOND, 1.0)
    assert 0 < client.pttl(key) <= 201

    # Then it expires by itself
    wait_until(lambda: not client.exists(key), timeout=5, message="the rate key expired")
    limiter.close()


def test_an_unreachable_redis_raises_naming_the_limit() -> None:
    limiter = RedisRateLimiter(url=f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.5)
    with pytest.raises(BackendUnavailable, match=r"rate limit 'app:rate:orders'"):
        limiter.reserve("app:rate:orders", TEN_PER_SECOND, 1.0)


def test_bad_redis_limiter_options_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match="RedisRateLimiter needs a Redis url"):
        RedisRateLimiter(url="")
    with pytest.raises(TypeError, match="RedisRateLimiter option socket_timeout"):
        RedisRateLimiter(url="redis://127.0.0.1:6379/0", socket_timeout=True)


# --- the gate ----------------------------------------------------------------------------------------------------
def test_the_gate_waits_in_place_for_a_near_slot_and_puts_a_far_one_aside(limiter: RateLimiter, key: str) -> None:
    limit = RateLimit(5, 1.0)  # one slot every 0.2 s
    # The first slot is now: run at once
    assert take_slot(limiter, key, limit, hold=0.3, longest_defer=10, what="m1") == 0.0
    # The next one is 0.2 s away, within the hold: the gate waits for it, then says run
    started = time.monotonic()
    assert take_slot(limiter, key, limit, hold=0.3, longest_defer=10, what="m2") == 0.0
    assert time.monotonic() - started >= 0.15
    # Two more booked; the next free slot is then ~0.6 s away, beyond the hold: put aside until it is near
    limiter.reserve(key, limit, 1.0)
    limiter.reserve(key, limit, 1.0)
    aside = take_slot(limiter, key, limit, hold=0.3, longest_defer=10, what="m3")
    assert 0.0 < aside <= 0.6 - 0.3 + 0.01
    # At most longest_defer
    hourly = RateLimit(1, 3600.0)
    assert take_slot(limiter, key + "-hourly", hourly, hold=0.3, longest_defer=2.0, what="m4") == 0.0
    assert take_slot(limiter, key + "-hourly", hourly, hold=0.3, longest_defer=2.0, what="m5") == 2.0


def test_the_gate_puts_a_message_aside_when_the_limiter_cannot_be_asked(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RedisRateLimiter(url=f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.5)
    assert (
        take_slot(limiter, "app:rate:orders", TEN_PER_SECOND, hold=1, longest_defer=60, what="m") == UNAVAILABLE_DELAY
    )
    assert "rate limit 10/s not asked" in caplog.text


# --- the deployment check ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("queue", "limiter_backend", "warned"),
    [
        ("database", "nocluster.queue.rates.backends.local.LocalRateLimiter", True),
        ("memory", "nocluster.queue.rates.backends.local.LocalRateLimiter", False),
        ("database", "nocluster.queue.rates.backends.redis.RedisRateLimiter", False),
    ],
)
def test_check_deploy_warns_of_rate_limits_that_hold_per_process(
    queue: str, limiter_backend: str, warned: bool
) -> None:
    backends = {"database": "DatabaseQueueBackend", "memory": "MemoryQueueBackend"}
    options = {"url": "redis://127.0.0.1:6379/0"} if limiter_backend.endswith("RedisRateLimiter") else {}
    app = Application(
        {
            "NAME": unique_name(),
            "EVENT_QUEUE": {"BACKEND": f"nocluster.queue.backends.{queue}.{backends[queue]}"},
            "RATE_LIMITS": {"BACKEND": limiter_backend, "OPTIONS": options},
        }
    )
    app.event_queue.subscribe("orders", lambda payload, context: None, rate_limit="100/m")
    app.event_queue.subscribe("other", lambda payload, context: None)
    found = checks.rate_limit_check(app.event_queue)()
    assert [(warning.id, "orders" in warning.msg, "other" in warning.msg) for warning in found] == (
        [("nocluster.W002", True, False)] if warned else []
    )
