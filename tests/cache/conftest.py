"""A cache fixture run on every store (LocMemCache, django-redis on the real Redis) and on both kinds of cache
(plain, and near: ``local=True`` with its pub/sub started on an in-process bus of the test's own)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.test import override_settings

from nocluster import Application
from nocluster.cache.cache import Cache
from settings.test import CACHES


def redis_store(url: str, **pool_kwargs: object) -> dict[str, object]:
    return {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": url,
        "OPTIONS": {
            "CLIENT_CLASS": "django_redis.client.DefaultClient",
            "SERIALIZER": "django_redis.serializers.json.JSONSerializer",
            "CONNECTION_POOL_KWARGS": pool_kwargs,
        },
    }


@pytest.fixture(params=["locmem", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[str]:
    """A ``CACHES`` alias on each store in turn: LocMemCache, then django-redis on the real Redis."""
    if request.param == "locmem":
        yield "local"
        return
    url = request.getfixturevalue("redis_url")
    with override_settings(CACHES={**CACHES, "redis": redis_store(url)}):
        yield "redis"


def local_pubsub(bus: str) -> dict[str, object]:
    return {"BACKEND": "nocluster.pubsub.backends.local.LocalPubSubBackend", "OPTIONS": {"bus": bus}}


@pytest.fixture
def cache_app(store: str, app_name: str) -> Iterator[Application]:
    """An application of its own name; on Redis its locks are Redis locks too. Its pub/sub is stopped after."""
    config: dict[str, object] = {"NAME": app_name, "PUBSUB": local_pubsub(app_name)}
    if store == "redis":
        from settings.test import TEST_REDIS_URL

        config["LOCKS"] = {
            "BACKEND": "nocluster.locks.backends.redis.RedisLockBackend",
            "OPTIONS": {"url": TEST_REDIS_URL},
        }
    application = Application(config)
    yield application
    application.pub_sub_manager.stop()


@pytest.fixture(params=["plain", "near"])
def cache(cache_app: Application, store: str, request: pytest.FixtureRequest) -> Cache:
    """The cache named ``things``: a plain one, then a near one (``local=True``, its node listening)."""
    if request.param == "plain":
        return cache_app.cache_manager.create_cache(name="things", store=store)
    cache_app.pub_sub_manager.start()
    return cache_app.cache_manager.create_cache(name="things", store=store, local=True)
