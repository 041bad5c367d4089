"""The Cache contract, run on LocMemCache and on django-redis over the real Redis."""

from __future__ import annotations

import threading
import time

import pytest
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured

from nocluster import Application
from nocluster.cache.cache import Cache
from tests.helpers import wait_until


def test_get_set_delete(cache: Cache) -> None:
    assert cache.get("k") is None
    assert cache.get("k", "fallback") == "fallback"

    cache.set("k", {"a": [1, 2.5, "x", True, None]})
    assert cache.get("k") == {"a": [1, 2.5, "x", True, None]}

    cache.delete("k")
    assert cache.get("k", "gone") == "gone"


def test_a_stored_none_is_returned_as_none_not_as_the_default(cache: Cache) -> None:
    cache.set("nothing", None)
    assert cache.get("nothing", "default") is None


def test_keys_are_namespaced_by_app_name_and_prefix(cache: Cache, store: str, app_name: str) -> None:
    cache.set("k", 1)
    assert caches[store].get(f"{app_name}:things:k") == 1


def test_a_value_expires_after_its_ttl(cache: Cache) -> None:
    cache.set("short", "v", ttl=0.3)
    cache.set("long", "v", ttl=60)
    assert cache.get("short") == "v"
    wait_until(lambda: cache.get("short") is None, timeout=5, message="the 0.3 s key to expire")
    assert cache.get("long") == "v"


@pytest.mark.parametrize("ttl", [0, -1])
def test_a_ttl_of_zero_or_less_stores_nothing_and_removes_the_key(cache: Cache, ttl: float) -> None:
    cache.set("k", "old")
    cache.set("k", "new", ttl=ttl)
    assert cache.get("k") is None


def test_the_cache_default_ttl_applies_when_set_has_none(cache_app: Application, store: str) -> None:
    short = cache_app.cache_manager.create_cache(name="short", store=store, ttl=0.3)
    short.set("k", "v")
    wait_until(lambda: short.get("k") is None, timeout=5, message="the cache's default ttl to expire the key")


def test_reset_removes_this_cache_only(cache: Cache, cache_app: Application, store: str, app_name: str) -> None:
    # Given this cache, another named cache, the same name under another app name, and a raw key in the store
    other = cache_app.cache_manager.create_cache(name="other", store=store)
    other_app = Application({"NAME": f"{app_name}-other"}).cache_manager.create_cache(name="things", store=store)
    cache.mset({"a": 1, "b": 2})
    other.set("a", "kept")
    other_app.set("a", "kept too")
    caches[store].set("raw-key", "untouched")

    # When this cache is reset
    removed = cache.reset()

    # Then only its keys are gone
    assert removed == 2
    assert cache.mget("a", "b") == [None, None]
    assert other.get("a") == "kept"
    assert other_app.get("a") == "kept too"
    assert caches[store].get("raw-key") == "untouched"
    caches[store].delete("raw-key")
    other_app.reset()


def test_wrap_computes_on_a_miss_and_then_reads_the_cache(cache: Cache) -> None:
    calls: list[int] = []

    def compute() -> dict[str, int]:
        calls.append(1)
        return {"n": len(calls)}

    assert cache.wrap("w", compute) == {"n": 1}
    assert cache.wrap("w", compute) == {"n": 1}
    assert len(calls) == 1


def test_wrap_does_not_store_none(cache: Cache) -> None:
    calls: list[int] = []

    def compute() -> None:
        calls.append(1)

    assert cache.wrap("none", compute) is None
    assert cache.wrap("none", compute) is None
    assert len(calls) == 2
    assert cache.get("none", "absent") == "absent"


def test_wrap_with_condition_stores_only_cacheable_values(cache: Cache) -> None:
    assert cache.wrap_with_condition("c", lambda: {"ok": False}, is_cacheable=lambda v: v["ok"]) == {"ok": False}
    assert cache.get("c") is None

    assert cache.wrap_with_condition("c", lambda: {"ok": True}, is_cacheable=lambda v: v["ok"]) == {"ok": True}
    assert cache.get("c") == {"ok": True}


def test_wrap_with_condition_use_cache_false_skips_the_read_and_refreshes(cache: Cache) -> None:
    cache.set("c", "stale")

    assert cache.wrap_with_condition("c", lambda: "fresh", use_cache=False) == "fresh"
    assert cache.get("c") == "fresh"
    assert cache.wrap_with_condition("c", lambda: "not called") == "fresh"


def test_batch_methods(cache: Cache) -> None:
    cache.mset({"a": 1, "b": [2], "c": {"three": 3}})
    assert cache.mget("c", "missing", "a", "b") == [{"three": 3}, None, 1, [2]]

    cache.mdel("a", "c", "missing")
    assert cache.mget("a", "b", "c") == [None, [2], None]
    assert cache.mget() == []


def test_batch_methods_honour_ttl(cache: Cache) -> None:
    cache.mset({"a": 1, "b": 2}, ttl=0.3)
    wait_until(lambda: cache.mget("a", "b") == [None, None], timeout=5, message="the batch to expire")


def test_a_value_that_is_not_json_is_refused_naming_the_cache_and_key(cache: Cache) -> None:
    with pytest.raises(TypeError, match=r"cache 'things' key 'when'.*datetime at \$"):
        import datetime

        cache.set("when", datetime.datetime(2026, 1, 1))
    with pytest.raises(TypeError, match=r"key 'b'.*set at \$\[0\]"):
        cache.mset({"a": 1, "b": [{1, 2}]})
    assert cache.get("a") is None  # nothing of a refused batch is stored


@pytest.mark.parametrize("key", ["", None, 5])
def test_a_bad_key_gets_a_clear_error(cache: Cache, key: object) -> None:
    with pytest.raises(ValueError, match="cache 'things': key must be a non-empty str"):
        cache.get(key)  # type: ignore[arg-type]


def test_a_cold_key_is_computed_once_under_concurrent_wrap(cache: Cache) -> None:
    # Given a slow computation and eight threads asking for the same cold key at once
    calls: list[int] = []
    results: list[object] = []
    start = threading.Barrier(8)

    def compute() -> str:
        calls.append(1)
        time.sleep(0.3)
        return "value"

    def ask() -> None:
        start.wait()
        results.append(cache.wrap("cold", compute))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    # Then it was computed once and every caller got the value
    assert len(calls) == 1
    assert results == ["value"] * 8


def test_create_cache_returns_the_same_cache_for_the_same_arguments(cache_app: Application, store: str) -> None:
    first = cache_app.cache_manager.create_cache(name="same", store=store)
    assert cache_app.cache_manager.create_cache(name="same", store=store) is first
    with pytest.raises(ValueError, match="cache 'same' exists with prefix='same'"):
        cache_app.cache_manager.create_cache(name="same", store=store, ttl=5)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": ""}, ValueError, "cache name ''"),
        ({"name": "a:b"}, ValueError, "cache name 'a:b'"),
        ({"name": "ok", "prefix": "x*"}, ValueError, "cache prefix 'x\\*'"),
        ({"name": "ok", "ttl": 0}, ValueError, "ttl must be > 0 seconds"),
        ({"name": "ok", "store": "nowhere"}, ImproperlyConfigured, "store 'nowhere' is not an alias in CACHES"),
    ],
)
def test_create_cache_rejects_bad_arguments(kwargs: dict[str, object], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        Application({"NAME": "bad-args"}).cache_manager.create_cache(**kwargs)  # type: ignore[arg-type]


def test_app_cache_is_the_default_store_named_default(app_name: str) -> None:
    app = Application({"NAME": app_name})
    assert app.cache is app.cache_manager.create_cache(name="default")
    assert app.cache.namespace == f"{app_name}:default:"


def test_invalidate_waits_for_a_fill_in_flight_so_a_stale_value_does_not_survive(cache: Cache) -> None:
    # Given a wrap that read the old data and has not stored it yet
    read_old = threading.Event()
    may_store = threading.Event()

    def slow_old_read() -> str:
        read_old.set()
        may_store.wait(10)
        return "old"

    filler = threading.Thread(target=lambda: cache.wrap("policy", slow_old_read))
    filler.start()
    assert read_old.wait(10)
    # When the change commits and invalidates the key while that fill is in flight
    invalidator = threading.Thread(target=lambda: cache.invalidate("policy"))
    invalidator.start()
    may_store.set()
    filler.join(10)
    invalidator.join(10)
    # Then the stale value is not left in the cache
    assert cache.get("policy") is None


def test_waiters_do_not_queue_behind_each_other_when_the_result_is_not_cacheable(cache: Cache) -> None:
    # Given a computation whose result is never stored (None), asked for by eight threads at once
    running = 0
    peak = 0
    guard = threading.Lock()
    start = threading.Barrier(8)

    def compute() -> None:
        nonlocal running, peak
        with guard:
            running += 1
            peak = max(peak, running)
        time.sleep(0.2)
        with guard:
            running -= 1

    def ask() -> None:
        start.wait()
        cache.wrap("never-cached", compute)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    # Then, once the first fill stored nothing, the waiters computed side by side rather than one by one
    assert peak >= 2


def test_a_ttl_that_is_not_finite_is_refused(cache: Cache) -> None:
    with pytest.raises(ValueError, match="finite"):
        cache.set("k", 1, ttl=float("nan"))
    with pytest.raises(ValueError, match="finite"):
        Application({"NAME": "nan"}).cache_manager.create_cache(name="c", ttl=float("inf"))
