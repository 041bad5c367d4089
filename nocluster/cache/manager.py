"""``app.cache_manager``: builds named caches over ``CACHES`` aliases, each namespaced by ``app.name``."""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING

from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured

from nocluster.cache.cache import Cache
from nocluster.durations import optional_seconds
from nocluster.identity import NodeIdentity
from nocluster.lifecycle import Component

if TYPE_CHECKING:
    from nocluster.locks import LockManager


NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")


class CacheManager(Component):
    """Creates and keeps named :class:`Cache` objects (``app.cache_manager``).

    ``create_cache`` with a name that exists returns the existing cache when the other arguments match, and
    raises ``ValueError`` when they differ, so two plugins cannot silently share a name with different stores.

    Parameters:
      identity: the node (its ``name`` prefixes every key).
      locks: the lock manager behind ``wrap``'s stampede guard.
    """

    def __init__(self, identity: NodeIdentity, locks: LockManager) -> None:
        self.identity = identity
        self.locks = locks
        self._caches: dict[str, Cache] = {}
        self._lock = threading.Lock()

    @property
    def default(self) -> Cache:
        """The default cache: ``CACHES["default"]``, prefix ``default``."""
        return self.create_cache(name="default")

    def create_cache(
        self, name: str, prefix: str | None = None, store: str = "default", ttl: float | None = None
    ) -> Cache:
        """Return the named cache, creating it on first call.

        Parameters:
          name: the cache's name: letters, digits, ``_`` and ``-``.
          prefix: the key namespace (default: ``name``); keys are ``"{app.name}:{prefix}:{key}"``.
          store: a ``CACHES`` alias (``LocMemCache`` by default, django-redis in a cluster).
          ttl: the default time to live in seconds for ``set`` without a ttl (default: the store's TIMEOUT).

        Raises:
          ValueError: a malformed name or prefix, a ttl that is not a positive number of seconds (TypeError for a
            non-number), or a name reused with other arguments.
          ImproperlyConfigured: ``store`` is not a ``CACHES`` alias.
        """
        for label, value in (("name", name), ("prefix", prefix if prefix is not None else name)):
            if not isinstance(value, str) or not NAME_PATTERN.match(value):
                raise ValueError(f"cache {label} {value!r} must be letters, digits, '_' and '-'")
        ttl = optional_seconds(ttl, f"cache {name!r}: ttl")
        if store not in caches.settings:
            raise ImproperlyConfigured(f"cache {name!r}: store {store!r} is not an alias in CACHES")
        with self._lock:
            existing = self._caches.get(name)
            if existing is None:
                existing = self._caches[name] = Cache(self.identity.name, self.locks, name, prefix or name, store, ttl)
            elif (existing.prefix, existing.store_alias, existing.ttl) != (prefix or name, store, ttl):
                raise ValueError(
                    f"cache {name!r} exists with prefix={existing.prefix!r}, store={existing.store_alias!r}, "
                    f"ttl={existing.ttl!r}"
                )
            return existing

    def get(self, name: str) -> Cache:
        """The cache created under ``name`` (``KeyError`` if none)."""
        return self._caches[name]

    def names(self) -> list[str]:
        return sorted(self._caches)
