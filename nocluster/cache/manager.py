"""``app.cache_manager``: builds named caches over ``CACHES`` aliases, each namespaced by ``app.name``."""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING

from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured

from nocluster.cache.cache import Cache
from nocluster.cache.invalidation import CacheInvalidations
from nocluster.cache.near import NearCache
from nocluster.cache.stores import supports_ttl_reads
from nocluster.durations import count, optional_seconds
from nocluster.identity import NodeIdentity
from nocluster.lifecycle import Component

if TYPE_CHECKING:
    from nocluster.locks import LockManager
    from nocluster.pubsub.manager import PubSubManager


NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")


class CacheManager(Component):
    """Creates and keeps named :class:`Cache` objects (``app.cache_manager``).

    ``create_cache`` with a name that exists returns the existing cache when the other arguments match, and
    raises ``ValueError`` when they differ, so two plugins cannot silently share a name with different stores.

    Parameters:
      identity: the node (its ``name`` prefixes every key).
      locks: the lock manager behind ``wrap``'s stampede guard.
      pubsub: what near caches' invalidations travel on (subscribed when the first near cache is created).
    """

    def __init__(self, identity: NodeIdentity, locks: LockManager, pubsub: PubSubManager) -> None:
        self.identity = identity
        self.locks = locks
        self.pubsub = pubsub
        self._caches: dict[str, Cache] = {}
        self._lock = threading.Lock()
        self._invalidations: CacheInvalidations | None = None

    @property
    def default(self) -> Cache:
        """The default cache: ``CACHES["default"]``, prefix ``default``."""
        return self.create_cache(name="default")

    def create_cache(
        self,
        name: str,
        prefix: str | None = None,
        store: str = "default",
        ttl: float | None = None,
        local: bool = False,
        local_max_entries: int = 1000,
    ) -> Cache:
        """Return the named cache, creating it on first call.

        Parameters:
          name: the cache's name: letters, digits, ``_`` and ``-``.
          prefix: the key namespace (default: ``name``); keys are ``"{app.name}:{prefix}:{key}"``.
          store: a ``CACHES`` alias (``LocMemCache`` by default, django-redis in a cluster).
          ttl: the default time to live in seconds for ``set`` without a ttl (default: the store's TIMEOUT).
          local: a near cache (:class:`~nocluster.cache.near.NearCache`): values are kept in this process too, and
            writes on any node invalidate the other nodes' copies over pub/sub. For hot, rarely changing values;
            every node must create it with ``local=True``.
          local_max_entries: with ``local``, how many keys the process keeps (least recently used dropped first).

        Raises:
          ValueError: a malformed name or prefix, a ttl that is not a positive number of seconds (TypeError for a
            non-number), or a name reused with other arguments.
          ImproperlyConfigured: ``store`` is not a ``CACHES`` alias, or (``local``) cannot tell a key's ttl.
        """
        for label, value in (("name", name), ("prefix", prefix if prefix is not None else name)):
            if not isinstance(value, str) or not NAME_PATTERN.match(value):
                raise ValueError(f"cache {label} {value!r} must be letters, digits, '_' and '-'")
        ttl = optional_seconds(ttl, f"cache {name!r}: ttl")
        if not isinstance(local, bool):
            raise TypeError(f"cache {name!r}: local must be a bool, got {local!r}")
        max_entries = count(local_max_entries, f"cache {name!r}: local_max_entries", least=1, most=10_000_000)
        if store not in caches.settings:
            raise ImproperlyConfigured(f"cache {name!r}: store {store!r} is not an alias in CACHES")
        if local and not supports_ttl_reads(caches[store]):
            raise ImproperlyConfigured(
                f"cache {name!r}: store {store!r} cannot tell a key's time to live, so it cannot back a near cache "
                "(local=True); use LocMemCache or django_redis.cache.RedisCache"
            )
        wanted = (prefix or name, store, ttl, max_entries if local else None)
        with self._lock:
            existing = self._caches.get(name)
            if existing is None:
                existing = self._caches[name] = self._build(name, prefix or name, store, ttl, local, max_entries)
            elif (existing.prefix, existing.store_alias, existing.ttl, existing.local_max_entries) != wanted:
                raise ValueError(
                    f"cache {name!r} exists with prefix={existing.prefix!r}, store={existing.store_alias!r}, "
                    f"ttl={existing.ttl!r}, local={existing.local_max_entries is not None!r}"
                    f"{f', local_max_entries={existing.local_max_entries}' if existing.local_max_entries else ''}"
                )
            return existing

    def _build(self, name: str, prefix: str, store: str, ttl: float | None, local: bool, max_entries: int) -> Cache:
        if not local:
            return Cache(self.identity.name, self.locks, name, prefix, store, ttl)
        if self._invalidations is None:
            self._invalidations = CacheInvalidations(self.identity, self.pubsub)
        return NearCache(
            self.identity.name, self.locks, name, prefix, store, ttl,
            invalidations=self._invalidations, max_entries=max_entries,
        )  # fmt: skip

    @property
    def invalidations(self) -> CacheInvalidations | None:
        """This node's near-cache invalidations (None until the first near cache is created)."""
        return self._invalidations

    def after_fork(self) -> None:
        """In a forked child: near caches forget their values (the child is not listening yet)."""
        self._lock = threading.Lock()
        if self._invalidations is not None:
            self._invalidations.after_fork()

    def get(self, name: str) -> Cache:
        """The cache created under ``name`` (``KeyError`` if none)."""
        return self._caches[name]

    def names(self) -> list[str]:
        return sorted(self._caches)
