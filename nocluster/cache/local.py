"""The in-process tier of a near cache: a bounded LRU of JSON values, with expiry and race-safe filling.

Ours (Django's LocMemCache has no notion of "another node changed this"). The tier sits in front of the shared
store; other nodes' writes arrive as invalidations. What it guarantees: once an invalidation of a key has been
applied here, the tier never serves a value read before that invalidation. The hard case is a fill in flight:
this node reads the old value from Redis, another node writes and its invalidation arrives, then this node
stores what it read. So every fill or local write takes a :class:`Ticket` before touching the store, and its
result is kept only if, between the ticket and the store, nothing else happened to the key: no invalidation, no
other fill or write of the key on this node (the ``alone`` rule: two writers on one node may reach Redis in
either order, so neither keeps its value), and no clear of the whole tier (a reset, a reconnect, a gap).
When in doubt the result is not kept, and the next read goes to the store.

Lists and dicts are kept serialised and rebuilt on every hit, so a caller who mutates what ``get`` returned
does not change what the next caller gets (LocMemCache pickles for the same reason); str, int, float, bool and
None are kept as they are. The serialisation is ``marshal``: these bytes never leave the process, and rebuilding
a small dict from them takes a third of ``json.loads``'s time (1 µs), most of a hit. A value is first made what
a JSON round trip through the store would give (a tuple becomes a list, an ``IntEnum`` an int), so the tier never
returns something the store would not. Expiry uses ``time.monotonic()``.
"""

from __future__ import annotations

import json
import marshal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from nocluster.cache.values import is_plain_json
from nocluster.envelope import dumps

MISSING: Any = object()
_SCALARS = frozenset({str, int, float, bool, type(None)})


@dataclass(frozen=True)
class Ticket:
    """One fill or write of ``key`` in flight (see the module docstring)."""

    key: str
    clock: int
    generation: int
    alone: bool
    started: float  # time.monotonic() when it was taken: before the store's own ttl clock started


class LocalTier:
    """At most ``max_entries`` values, least recently used dropped first; thread-safe.

    Parameters:
      max_entries: how many keys the tier holds (>= 1).
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()
        # key -> (value or its marshal bytes, is it serialised, monotonic expiry or None for none)
        self._entries: OrderedDict[str, tuple[Any, bool, float | None]] = OrderedDict()
        self._clock = 0
        self._generation = 0
        # key -> [operations in flight, clock of the last thing that happened to the key]
        self._busy: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any:
        """The value of ``key``, or :data:`MISSING` (absent or expired)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return MISSING
            value, encoded, expires = entry
            if expires is not None and time.monotonic() >= expires:
                del self._entries[key]
                return MISSING
            self._entries.move_to_end(key)
        return marshal.loads(value) if encoded else value  # noqa: S302 (bytes this process made, see above)

    def begin(self, key: str, write: bool) -> Ticket:
        """Take a ticket before reading (``write=False``) or writing ``key`` in the store; a write drops the
        local value at once."""
        with self._lock:
            self._clock += 1
            state = self._busy.get(key)
            alone = state is None
            if state is None:
                self._busy[key] = [1, self._clock]
            else:
                state[0] += 1
                state[1] = self._clock
            if write:
                self._entries.pop(key, None)
            return Ticket(key, self._clock, self._generation, alone, time.monotonic())

    def finish(self, ticket: Ticket, value: Any = MISSING, ttl: float | None = None) -> bool:
        """End ``ticket``; keep ``value`` (a JSON value) if nothing else happened to the key meanwhile, until
        ``ttl`` seconds after the ticket was taken (None: no expiry), so never longer than the store keeps it.
        Without a value it only ends the ticket. Returns whether the value was kept."""
        stored = _kept(value)  # outside the lock
        expires = None if ttl is None else ticket.started + ttl
        with self._lock:
            state = self._busy[ticket.key]
            untouched = ticket.alone and state[1] == ticket.clock and ticket.generation == self._generation
            state[0] -= 1
            if state[0] == 0:
                del self._busy[ticket.key]
            if value is MISSING or not untouched or (ttl is not None and ttl <= 0):
                return False
            self._entries[ticket.key] = (*stored, expires)
            self._entries.move_to_end(ticket.key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return True

    def invalidate(self, keys: list[str]) -> None:
        """Drop ``keys``; a fill or write of one of them in flight will not be kept."""
        with self._lock:
            self._clock += 1
            for key in keys:
                self._entries.pop(key, None)
                state = self._busy.get(key)
                if state is not None:
                    state[1] = self._clock

    def clear(self) -> None:
        """Drop everything; no fill or write in flight will be kept."""
        with self._lock:
            self._generation += 1
            self._entries.clear()

    def keys(self) -> list[str]:
        """The keys held now, least recently used first (expired ones included until read)."""
        with self._lock:
            return list(self._entries)


def _kept(value: Any) -> tuple[Any, bool]:
    """What the tier keeps for ``value``: (the value, False) for a plain scalar, else (marshal bytes, True)."""
    if type(value) in _SCALARS or value is MISSING:
        return value, False
    if not is_plain_json(value, 0):
        value = json.loads(dumps(value))  # as the store would give it back
        if type(value) in _SCALARS:
            return value, False
    return marshal.dumps(value), True
