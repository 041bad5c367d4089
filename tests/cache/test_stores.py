"""Store-specific behaviour: Redis unreachable, and stores that cannot reset."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from django_redis.exceptions import ConnectionInterrupted
from redis.exceptions import ConnectionError as RedisConnectionError

from nocluster import Application
from nocluster.cache.cache import Cache
from settings.test import CACHES
from tests.cache.conftest import redis_store
from tests.cache.roundtrips import CountingConnection, count_round_trips
from tests.helpers import free_port


def test_an_unreachable_redis_raises_instead_of_returning_stale_or_nothing() -> None:
    # Redis being down must not look like a miss (a stampede on the database) nor lose writes silently.
    down = redis_store(f"redis://127.0.0.1:{free_port()}/0")
    down["OPTIONS"]["SOCKET_CONNECT_TIMEOUT"] = 0.5  # type: ignore[index]
    with override_settings(CACHES={**CACHES, "down": down}):
        cache = Application({"NAME": "down"}).cache_manager.create_cache(name="c", store="down")
        with pytest.raises((ConnectionInterrupted, RedisConnectionError)):
            cache.get("k")
        with pytest.raises((ConnectionInterrupted, RedisConnectionError)):
            cache.set("k", 1)


def test_reset_on_a_store_that_cannot_delete_by_prefix_names_the_alias(tmp_path: object) -> None:
    file_store = {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": str(tmp_path)}
    with override_settings(CACHES={**CACHES, "files": file_store}):
        cache = Application({"NAME": "files"}).cache_manager.create_cache(name="c", store="files")
        cache.set("k", 1)
        with pytest.raises(ImproperlyConfigured, match=r"CACHES\['files'\].*FileBasedCache.*cannot delete keys"):
            cache.reset()


def test_each_batch_method_is_one_round_trip_on_redis(redis_url: str, app_name: str) -> None:
    # django-redis keeps one pool per URL: a URL of its own (the option is redis-py's default) gets a new pool.
    separator = "&" if "?" in redis_url else "?"
    counted = redis_store(f"{redis_url}{separator}health_check_interval=0", connection_class=CountingConnection)
    with override_settings(CACHES={**CACHES, "counted": counted}):
        cache = Application({"NAME": app_name}).cache_manager.create_cache(name="batch", store="counted")
        assert_batches_are_one_round_trip(cache)


def assert_batches_are_one_round_trip(cache: Cache) -> None:
    cache.get("warm-up")  # the connection's handshake is not part of the count

    with count_round_trips() as sent:
        cache.mset({f"k{i}": i for i in range(50)})
    assert len(sent) == 1
    with count_round_trips() as sent:
        values = cache.mget(*(f"k{i}" for i in range(50)))
    assert len(sent) == 1 and values == list(range(50))
    with count_round_trips() as sent:
        cache.mdel(*(f"k{i}" for i in range(50)))
    assert len(sent) == 1
    # The counter sees single commands too: it can fail.
    with count_round_trips() as sent:
        cache.get("a")
        cache.get("b")
    assert len(sent) == 2
