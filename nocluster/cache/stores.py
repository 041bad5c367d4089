"""What Django's ``BaseCache`` lacks, per store: deleting every key under a prefix, and reading values with
their remaining time to live.

``BaseCache.clear()`` wipes the whole store (``FLUSHDB`` on Redis, taking broker queues and locks with it), so a
named cache's ``reset()`` needs a prefix-scoped delete. A near cache's local tier must not keep a value longer
than the store does, so it reads the time to live with the value (one round trip on Redis). Supported stores:
Django's ``LocMemCache`` and django-redis's ``RedisCache``; any other store raises ``ImproperlyConfigured``
naming the alias.
"""

from __future__ import annotations

import time
from typing import Any

from django.core.cache.backends.base import BaseCache
from django.core.cache.backends.locmem import LocMemCache
from django.core.exceptions import ImproperlyConfigured

from nocluster.globs import glob_escape


def delete_prefix(store: BaseCache, alias: str, prefix: str) -> int:
    """Delete every key of ``store`` whose (unversioned) key starts with ``prefix``; return how many.

    Raises:
      ImproperlyConfigured: the store cannot delete by prefix.
    """
    if isinstance(store, LocMemCache):
        return _delete_prefix_locmem(store, prefix)
    delete_pattern = getattr(store, "delete_pattern", None)  # django-redis
    if callable(delete_pattern):
        return int(delete_pattern(glob_escape(prefix) + "*"))
    raise ImproperlyConfigured(
        f"CACHES[{alias!r}] ({type(store).__module__}.{type(store).__name__}) cannot delete keys by prefix, so a "
        "nocluster cache on it cannot reset(); use LocMemCache or django_redis.cache.RedisCache"
    )


def supports_ttl_reads(store: BaseCache) -> bool:
    """True if :func:`get_many_with_ttl` works on ``store``."""
    return isinstance(store, LocMemCache) or _is_django_redis(store)


def get_many_with_ttl(store: BaseCache, alias: str, keys: list[str]) -> dict[str, tuple[Any, float | None]]:
    """``{key: (value, seconds left or None for no expiry)}`` for the ``keys`` present in ``store``.

    One ``MULTI`` of ``GET`` and ``PTTL`` per key on django-redis (one round trip), so a value and its time to
    live belong together. Errors of the store propagate (redis-py's ``ConnectionError`` when Redis is down).

    Raises:
      ImproperlyConfigured: the store cannot tell a key's time to live.
    """
    if isinstance(store, LocMemCache):
        return _get_many_with_ttl_locmem(store, keys)
    if _is_django_redis(store):
        return _get_many_with_ttl_redis(store, keys)
    raise ImproperlyConfigured(
        f"CACHES[{alias!r}] ({type(store).__module__}.{type(store).__name__}) cannot tell a key's time to live, so "
        "a near cache (local=True) cannot use it; use LocMemCache or django_redis.cache.RedisCache"
    )


def _is_django_redis(store: BaseCache) -> bool:
    client = getattr(type(store), "client", None)
    return isinstance(client, property) and type(store).__module__.startswith("django_redis.")


def _get_many_with_ttl_redis(store: Any, keys: list[str]) -> dict[str, tuple[Any, float | None]]:
    client = store.client  # django-redis's DefaultClient (Sentinel and Herd clients derive from it)
    # The primary, not a replica: a replica's lagging value read after an invalidation would be kept locally.
    redis = client.get_client(write=True)
    pipe = redis.pipeline(transaction=True)
    for key in keys:
        full = client.make_key(key)
        pipe.get(full)
        pipe.pttl(full)
    replies = pipe.execute()
    found: dict[str, tuple[Any, float | None]] = {}
    for index, key in enumerate(keys):
        raw, pttl = replies[2 * index], replies[2 * index + 1]
        if raw is None or pttl == -2:
            continue
        found[key] = (client.decode(raw), None if pttl < 0 else pttl / 1000)
    return found


def _get_many_with_ttl_locmem(store: LocMemCache, keys: list[str]) -> dict[str, tuple[Any, float | None]]:
    internals: Any = store  # _lock and _expire_info are private (see _delete_prefix_locmem)
    values = store.get_many(keys)
    found: dict[str, tuple[Any, float | None]] = {}
    with internals._lock:
        now = time.time()
        for key, value in values.items():
            expires = internals._expire_info.get(store.make_key(key))
            found[key] = (value, None if expires is None else max(0.0, expires - now))
    return found


def _delete_prefix_locmem(store: LocMemCache, prefix: str) -> int:
    # LocMemCache stores make_key(key); with the default key function the user's key is its suffix, so every
    # stored key of this prefix starts with make_key(prefix).
    full_prefix = store.make_key(prefix)
    internals: Any = store  # LocMemCache's _lock, _cache and _expire_info are private (django-stubs omits them)
    with internals._lock:
        doomed = [key for key in internals._cache if key.startswith(full_prefix)]
        for key in doomed:
            internals._cache.pop(key, None)
            internals._expire_info.pop(key, None)
    return len(doomed)
