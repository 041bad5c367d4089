"""What Django's ``BaseCache`` lacks, per store: deleting every key under a prefix.

``BaseCache.clear()`` wipes the whole store (``FLUSHDB`` on Redis, taking broker queues and locks with it), so a
named cache's ``reset()`` needs a prefix-scoped delete. Supported stores: Django's ``LocMemCache`` and
django-redis's ``RedisCache``; any other store raises ``ImproperlyConfigured`` naming the alias.
"""

from __future__ import annotations

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
