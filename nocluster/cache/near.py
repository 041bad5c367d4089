"""A near cache: a named cache that also keeps values in process memory (``create_cache(..., local=True)``).

For hot, rarely changing values (settings, permissions, feature flags): a hit in the local tier costs no round
trip. The store (Redis) stays the truth; the local tier is a copy that other nodes' writes invalidate over
pub/sub (:mod:`nocluster.cache.invalidation`). What a caller can rely on:

- A node's own write is in its own tier at once; another node's write replaces the old value there within the
  pub/sub latency (a few ms), and once its invalidation has arrived the old value is never served again, even by
  a read that was in flight when it arrived (:mod:`nocluster.cache.local`).
- While the node's pub/sub consumer is not connected (not started, broker down, reconnecting) every read goes
  to the store, and the tier is cleared; after a reconnect, or a gap in the invalidations it received, too.
  A dead connection the consumer has not noticed yet (no TCP reset: it is noticed within about twice the pub/sub
  heartbeat) can keep an old value that long: that is the bound on staleness.
- Values leave the tier when their ttl passes in the store (the tier reads the remaining ttl with the value),
  and the least recently used go first when it holds ``local_max_entries`` keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT

from nocluster.cache.cache import Cache
from nocluster.cache.local import MISSING, LocalTier
from nocluster.cache.stores import get_many_with_ttl
from nocluster.envelope import JSON

if TYPE_CHECKING:
    from nocluster.cache.invalidation import CacheInvalidations
    from nocluster.locks import LockManager


class NearCache(Cache):
    """A :class:`Cache` with a local tier in front of its store (build it with ``create_cache(..., local=True)``).

    Every method keeps :class:`Cache`'s meaning; the writes (``set``, ``delete``, ``mset``, ``mdel``, ``reset``,
    and ``wrap``'s fill) also tell the other nodes, right after the store write (inside ``atomic()`` too, as the
    store write itself does not wait for a commit). Every node must create the cache with ``local=True``: a node
    that writes through a plain cache of the same name tells nobody.

    Raises (writes, besides the store's errors):
      PublishError: pub/sub could not take the invalidation. The store has the new value and this node's tier
        too; the other nodes keep the old one until they see the gap at this node's next invalidation, reconnect,
        or its ttl passes.
    """

    def __init__(
        self,
        app_name: str,
        locks: LockManager,
        name: str,
        prefix: str,
        store_alias: str,
        ttl: float | None,
        *,
        invalidations: CacheInvalidations,
        max_entries: int,
    ) -> None:
        super().__init__(app_name, locks, name, prefix, store_alias, ttl)
        self.local_max_entries = max_entries
        self.tier = LocalTier(max_entries)
        self.invalidations = invalidations
        invalidations.register(name, self.tier)

    # --- reads -----------------------------------------------------------------------------------------
    def _lookup(self, key: str) -> Any:
        if type(key) is not str or not self.invalidations.listening():
            return super()._lookup(key)
        value = self.tier.get(key)
        return value if value is not MISSING else self._read_through([key])[0]

    def mget(self, *keys: str) -> list[Any]:
        """As :meth:`Cache.mget`; keys missing from the local tier are read in one round trip."""
        if not self.invalidations.listening():
            return super().mget(*keys)
        values = [self.tier.get(key) if type(key) is str else MISSING for key in keys]
        missing = [key for key, value in zip(keys, values, strict=True) if value is MISSING]
        if missing:
            read = iter(self._read_through(missing))
            values = [next(read) if value is MISSING else value for value in values]
        return [None if value is MISSING else value for value in values]

    def _read_through(self, keys: list[str]) -> list[Any]:
        """Read ``keys`` from the store (one round trip) and keep what is safe to keep (see the tier's rules)."""
        full_keys = [self.full_key(key) for key in keys]
        tickets = [self.tier.begin(key, write=False) for key in keys]
        try:
            found = get_many_with_ttl(self.store, self.store_alias, full_keys)
        except BaseException:
            for ticket in tickets:
                self.tier.finish(ticket)
            raise
        values = []
        for ticket, full_key in zip(tickets, full_keys, strict=True):
            value, ttl = found.get(full_key, (MISSING, None))
            self.tier.finish(ticket, value, ttl)
            values.append(value)
        return values

    # --- writes ----------------------------------------------------------------------------------------
    def set(self, key: str, value: JSON, ttl: float | None = None) -> None:
        """As :meth:`Cache.set`; this node's tier holds ``value`` at once, the others drop their copy."""
        self._write({key: value}, ttl)

    def mset(self, mapping: Mapping[str, JSON], ttl: float | None = None) -> None:
        """As :meth:`Cache.mset`, with one invalidation message for the batch."""
        if mapping:
            self._write(dict(mapping), ttl)

    def delete(self, key: str) -> None:
        self._write({key: MISSING}, None)

    def mdel(self, *keys: str) -> None:
        """As :meth:`Cache.mdel`, with one invalidation message for the batch."""
        if keys:
            self._write(dict.fromkeys(keys, MISSING), None)

    def reset(self) -> int:
        """As :meth:`Cache.reset`; every node's tier of this cache is cleared."""
        try:
            removed = super().reset()
        except BaseException:  # the store may be cleared partway: keep nothing here, and tell the others anyway
            self.tier.clear()
            with contextlib.suppress(Exception):
                self.invalidations.publish(self.name, None)
            raise
        self.tier.clear()  # after the store: a read of the old values in flight is not kept
        self.invalidations.publish(self.name, None)
        return removed

    def _write(self, changes: dict[str, Any], ttl: float | None) -> None:
        """Store (or, for ``MISSING`` values, delete) ``changes``, keep them locally, tell the other nodes."""
        full = {self.full_key(key): key for key in changes}
        values = {key: value if value is MISSING else self._checked(key, value) for key, value in changes.items()}
        timeout = self._timeout(ttl)
        keep = self.invalidations.listening()
        tickets = [self.tier.begin(key, write=True) for key in changes]
        try:
            self._store_writes(full, values, timeout)
        except BaseException:
            # The store may or may not have taken the write: keep nothing here, and tell the others anyway.
            for ticket in tickets:
                self.tier.finish(ticket, MISSING, None)
            with contextlib.suppress(Exception):
                self.invalidations.publish(self.name, list(changes))
            raise
        local_ttl = self._local_ttl(timeout)
        for ticket in tickets:
            value = values[ticket.key]
            self.tier.finish(ticket, value if keep else MISSING, local_ttl)
        self.invalidations.publish(self.name, list(changes))

    def _store_writes(self, full: dict[str, str], values: dict[str, Any], timeout: Any) -> None:
        doomed = [full_key for full_key, key in full.items() if values[key] is MISSING]
        kept = {full_key: values[key] for full_key, key in full.items() if values[key] is not MISSING}
        if len(doomed) == 1:
            self.store.delete(doomed[0])
        elif doomed:
            self.store.delete_many(doomed)
        if len(kept) == 1:
            ((full_key, value),) = kept.items()
            self.store.set(full_key, value, timeout=timeout)
        elif kept:
            self.store.set_many(kept, timeout=timeout)

    def _local_ttl(self, timeout: Any) -> float | None:
        """How long the tier may keep a value the store keeps for ``timeout`` (None: no expiry)."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.store.default_timeout
        return None if timeout is None else float(timeout)

    def __repr__(self) -> str:
        return f"<NearCache {self.name!r} on {self.store_alias!r} namespace {self.namespace!r}>"
