"""The in-memory schema registry of one node: ``{collection: {"title", "options", "fields": {name: {...}}}}``.

It must stay equal to the database. It is only ever filled from the database (never from message contents), so
a sync message just says which collection to reload, and a resync reloads everything.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from plugins.data_source_main.models import Collection

Schema = dict[str, dict[str, Any]]


def load_from_database(name: str | None = None, using: str | None = None) -> Schema:
    """The schema as stored (every collection, or only ``name``)."""
    collections = Collection.objects.using(using).prefetch_related("fields")
    if name is not None:
        collections = collections.filter(name=name)
    return {collection.name: collection.to_schema() for collection in collections}


class SchemaRegistry:
    """Thread-safe; read with :meth:`snapshot` or :meth:`get`, refreshed with :meth:`reload`."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        # Reloads read the database and write the registry one at a time, so a slow full reload that read
        # before a commit cannot overwrite a later reload's fresher data. Readers only take _lock.
        self._reload_lock = threading.Lock()
        self._schema: Schema = {}
        self.loaded = False
        self.reloads = 0

    def reload(self, name: str | None = None, using: str | None = None) -> None:
        """Reload one collection (dropped if it no longer exists), or everything when ``name`` is None."""
        with self._reload_lock:
            fresh = load_from_database(name, using)
            with self._lock:
                if name is None:
                    self._schema = fresh
                    self.loaded = True
                elif name in fresh:
                    self._schema[name] = fresh[name]
                else:
                    self._schema.pop(name, None)
                self.reloads += 1

    def ensure_loaded(self) -> None:
        if not self.loaded:
            self.reload()

    def snapshot(self) -> Schema:
        """A deep copy of the whole registry."""
        self.ensure_loaded()
        with self._lock:
            return copy.deepcopy(self._schema)

    def get(self, name: str) -> dict[str, Any] | None:
        self.ensure_loaded()
        with self._lock:
            value = self._schema.get(name)
            return copy.deepcopy(value) if value is not None else None
