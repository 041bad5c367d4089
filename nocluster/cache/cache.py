"""A named cache over one Django cache store, namespaced ``"{app.name}:{prefix}:{key}"``.

Values are JSON values (dict, list, str, int, float, bool, None), checked on write with a ``TypeError`` that
names the cache and key: a cluster store holds them as JSON (``settings/base.py`` configures django-redis's
JSON serializer), so a value reads back the same on every node and nothing is pickled.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from django.core.cache import caches
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache
from django.core.signals import setting_changed
from django.dispatch import receiver

from nocluster.cache.local import MISSING
from nocluster.cache.stores import delete_prefix
from nocluster.cache.values import checked
from nocluster.durations import seconds
from nocluster.envelope import JSON, MAX_KEY_LENGTH, ensure_key
from nocluster.errors import LockAcquireError, LockNotOwned

if TYPE_CHECKING:
    from nocluster.locks import Lock, LockManager


T = TypeVar("T")
logger = logging.getLogger("nocluster.cache")
_MISSING: Any = MISSING

# The stampede guard of wrap(): one filler per key at a time across the cluster (seconds).
FILL_LOCK_TTL = 10.0
FILL_LOCK_WAIT = 10.0

# Bumped when a test changes CACHES (override_settings): every Cache then asks ``caches`` for its store again.
_stores_generation = 0


@receiver(setting_changed)
def _caches_changed(setting: str, **kwargs: Any) -> None:
    global _stores_generation
    if setting == "CACHES":
        _stores_generation += 1


class Cache:
    """One named cache (build it with ``app.cache_manager.create_cache()``).

    ``ttl`` arguments are seconds: ``None`` means the cache's default (``create_cache(ttl=...)``, else the
    store's ``TIMEOUT``); ``0`` or less stores nothing and removes the key, as Django's cache does.
    """

    local_max_entries: int | None = None  # a near cache's bound (NearCache); None: no local tier

    def __init__(
        self, app_name: str, locks: LockManager, name: str, prefix: str, store_alias: str, ttl: float | None
    ) -> None:
        self.app_name = app_name
        self.locks = locks
        self.name = name
        self.prefix = prefix
        self.store_alias = store_alias
        self.ttl = ttl
        self._thread = threading.local()
        self._what = f"cache {name!r} key"
        self._namespace = f"{app_name}:{prefix}:"

    @property
    def store(self) -> BaseCache:
        """The Django cache store (per thread, as Django's ``caches`` gives it)."""
        # Kept per thread: ``caches[alias]`` goes through asgiref's Local, about 3 µs a call, which is 3 % of a
        # Redis round trip on every operation.
        thread = self._thread
        try:
            if thread.generation == _stores_generation:
                store: BaseCache = thread.store
                return store
        except AttributeError:
            pass
        thread.store, thread.generation = caches[self.store_alias], _stores_generation
        return thread.store

    @property
    def namespace(self) -> str:
        """``"{app.name}:{prefix}:"``, the start of every store key of this cache."""
        return self._namespace

    def full_key(self, key: str) -> str:
        """The store key of ``key``: ``"{app.name}:{prefix}:{key}"``; raises ``ValueError`` for a bad key."""
        if type(key) is str and key.isascii() and 0 < len(key) <= MAX_KEY_LENGTH:
            return self._namespace + key  # the common case, without ensure_key's UTF-8 round trip
        return self._namespace + ensure_key(key, f"cache {self.name!r}: key")

    def _timeout(self, ttl: float | None) -> Any:
        if ttl is None:
            return DEFAULT_TIMEOUT if self.ttl is None else self.ttl
        if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl <= 0:
            return ttl  # Django's meaning: not stored (the key is removed)
        return seconds(ttl, f"cache {self.name!r}: ttl")

    def _checked(self, key: str, value: Any) -> JSON:
        return checked(value, key, self._what)

    # --- single keys ---------------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        value = self._lookup(key)
        return default if value is _MISSING else value

    def _lookup(self, key: str) -> Any:
        """The value of ``key``, or ``_MISSING`` (what every read goes through; the near cache adds its tier)."""
        return self.store.get(self.full_key(key), _MISSING)

    def set(self, key: str, value: JSON, ttl: float | None = None) -> None:
        """Store ``value`` (a JSON value) under ``key`` for ``ttl`` seconds."""
        self.store.set(self.full_key(key), self._checked(key, value), timeout=self._timeout(ttl))

    def delete(self, key: str) -> None:
        self.store.delete(self.full_key(key))

    def invalidate(self, key: str) -> None:
        """Delete ``key`` once no ``wrap`` of it is computing (waiting up to 10 s for one that is).

        Use it after a change commits: a ``wrap`` that read the old data before the commit and stores it after
        a plain ``delete`` would leave the old value cached; this deletes after that store instead.
        """
        lock, _ = self._fill_lock(key)
        try:
            self.delete(key)
        finally:
            self._release(lock, key)

    def reset(self) -> int:
        """Remove every key of this cache (its namespace) and nothing else; return how many were removed.

        Never clears the whole store (no ``FLUSHDB``): other caches, locks and broker keys are untouched.
        """
        return delete_prefix(self.store, self.store_alias, self.namespace)

    # --- batches: one round trip each on Redis --------------------------------------------------------------
    def mset(self, mapping: Mapping[str, JSON], ttl: float | None = None) -> None:
        """Store every ``key: value`` of ``mapping`` (one pipelined round trip on Redis)."""
        data = {self.full_key(key): self._checked(key, value) for key, value in mapping.items()}
        if data:
            self.store.set_many(data, timeout=self._timeout(ttl))

    def mget(self, *keys: str) -> list[Any]:
        """The values of ``keys`` as a list aligned with them; ``None`` where a key is missing (one ``MGET``)."""
        full_keys = [self.full_key(key) for key in keys]
        found = self.store.get_many(full_keys) if full_keys else {}
        return [found.get(full_key) for full_key in full_keys]

    def mdel(self, *keys: str) -> None:
        """Remove ``keys`` (one ``DEL`` on Redis)."""
        full_keys = [self.full_key(key) for key in keys]
        if full_keys:
            self.store.delete_many(full_keys)

    # --- read-through ----------------------------------------------------------------------------------------
    def wrap(self, key: str, fn: Callable[[], T], ttl: float | None = None) -> T:
        """The cached value of ``key``, else ``fn()``, stored (unless ``None``) and returned.

        On a miss, one caller at a time per key in the whole cluster computes ``fn()`` (a short lock from
        ``app.lock_manager``); the others wait up to 10 s for it and then read its value, so a cold key under
        load does not stampede the database. If the filler takes longer, the waiter computes itself.
        """
        return self.wrap_with_condition(key, fn, ttl=ttl)

    def wrap_with_condition(
        self,
        key: str,
        fn: Callable[[], T],
        use_cache: bool = True,
        is_cacheable: Callable[[T], bool] | None = None,
        ttl: float | None = None,
    ) -> T:
        """As :meth:`wrap`, with two switches.

        Parameters:
          use_cache: False skips reading the cache (``fn()`` always runs); its result is still stored when
            cacheable, so this refreshes the key.
          is_cacheable: decides whether the result is stored; by default anything but ``None`` is.
        """
        if use_cache:
            value = self._lookup(key)
            if value is not _MISSING:
                return value
        return self._fill(key, fn, use_cache, is_cacheable, ttl)

    def _fill(
        self,
        key: str,
        fn: Callable[[], T],
        use_cache: bool,
        is_cacheable: Callable[[T], bool] | None,
        ttl: float | None,
    ) -> T:
        lock, waited = self._fill_lock(key)
        try:
            if lock is not None and waited and use_cache:
                # Fetch the value again: the holder before us may have filled the key while we waited.
                value = self._lookup(key)
                if value is not _MISSING:
                    return value
                # It computed nothing storable: do not make the callers behind us wait for our fn() too.
                self._release(lock, key)
                lock = None
            value = fn()
            cacheable = is_cacheable(value) if is_cacheable is not None else value is not None
            if cacheable:
                self.set(key, value, ttl)  # type: ignore[arg-type]
            return value
        finally:
            self._release(lock, key)

    def _fill_lock(self, key: str) -> tuple[Lock | None, bool]:
        """The fill lock of ``key`` and whether we had to wait for it; (None, True) when it did not come."""
        locks, name = self.locks, f"cache:{self.namespace}{key}"
        try:
            return locks.try_acquire(name, ttl=FILL_LOCK_TTL), False
        except LockAcquireError:
            pass
        try:
            return locks.acquire(name, ttl=FILL_LOCK_TTL, timeout=FILL_LOCK_WAIT), True
        except LockAcquireError:
            logger.warning(
                "cache %r: no fill lock for key %r after %s s; going on without it",
                self.name,
                key,
                FILL_LOCK_WAIT,
                extra={"lock_key": name},
            )
            return None, True

    def _release(self, lock: Lock | None, key: str) -> None:
        if lock is None:
            return
        try:
            lock.release()
        except LockNotOwned:
            logger.warning("cache %r: fill lock of key %r expired before fn() returned", self.name, key)

    def __repr__(self) -> str:
        return f"<Cache {self.name!r} on {self.store_alias!r} namespace {self.namespace!r}>"
