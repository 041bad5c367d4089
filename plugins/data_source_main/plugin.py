"""The main data source plugin: schema changes in the database, mirrored on every node through sync messages.

In the spirit of NocoBase's plugin-data-source-main. Each change runs in a transaction; when it commits, this node
reloads the collection into its registry and a sync message ``{"collection": name}`` tells the other nodes to do
the same. A node that missed messages (gap, reconnect) reloads everything (:meth:`resync`). Removing a field
holds the cluster lock ``"{plugin}:fields.before_destroy:{collection}"`` while it deletes and announces it.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction

from nocluster import Plugin
from nocluster.sync.sequence import is_resync
from plugins.data_source_main.models import Collection, Field
from plugins.data_source_main.registry import Schema, SchemaRegistry, load_from_database

# Safety release of the field-removal lock, seconds: longer than a delete plus a publish on a loaded node.
REMOVE_FIELD_LOCK_TTL = 10.0


class DataSourceMainPlugin(Plugin):
    """Collections and fields; ``self.registry`` is this node's in-memory copy of the schema."""

    # A schema change must reach every node fast (a request on another node may use the new field at once):
    # coalesce equal sync messages over 0.2 s rather than the default 1 s.
    sync_debounce = 0.2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.registry = SchemaRegistry()

    def after_start(self) -> None:
        # Subscriptions are bound by now, so nothing published from here on is missed.
        try:
            self.registry.reload()
        except Exception as exc:
            # No database yet (before migrate): the registry loads on first use instead.
            self.logger.warning("schema registry not loaded at start (%s); it will load on first use", exc)

    # --- sync ----------------------------------------------------------------------------------------
    def handle_sync_message(self, message: Any) -> None:
        """Another node changed a collection: reload it (or everything for a resync marker)."""
        if is_resync(message) or not isinstance(message, dict) or not isinstance(message.get("collection"), str):
            self.registry.reload()
        else:
            self.registry.reload(message["collection"])

    def resync(self, reason: str) -> None:
        self.logger.info("data_source_main on %s: reloading the schema (%s)", self.app.instance_id, reason)
        self.registry.reload()

    def changed(self, collection: str, using: str | None = None) -> None:
        """Announce a change of ``collection`` made in the current transaction: after the commit this node reloads
        it and the other nodes are told to. The methods below call it; code that writes the models directly (the
        admin, a data migration) must call it too."""
        transaction.on_commit(lambda: self.registry.reload(collection, using), using=using, robust=True)
        self.send_sync_message({"collection": collection}, using=using)

    # --- collections ---------------------------------------------------------------------------------
    def create_collection(self, name: str, title: str = "", options: dict[str, Any] | None = None) -> None:
        with transaction.atomic():
            Collection.objects.create(name=name, title=title, options=options or {})
            self.changed(name)

    def update_collection(self, name: str, *, title: str | None = None, options: dict[str, Any] | None = None) -> None:
        with transaction.atomic():
            collection = Collection.objects.select_for_update().get(name=name)
            if title is not None:
                collection.title = title
            if options is not None:
                collection.options = options
            collection.save()
            self.changed(name)

    def remove_collection(self, name: str) -> None:
        with transaction.atomic():
            Collection.objects.filter(name=name).delete()
            self.changed(name)

    # --- fields --------------------------------------------------------------------------------------
    def add_field(self, collection: str, name: str, type: str, options: dict[str, Any] | None = None) -> None:
        with transaction.atomic():
            owner = Collection.objects.select_for_update().get(name=collection)
            Field.objects.create(collection=owner, name=name, type=type, options=options or {})
            self.changed(collection)

    def change_field(
        self,
        collection: str,
        name: str,
        *,
        new_name: str | None = None,
        type: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        """Rename a field and/or change its type or options."""
        with transaction.atomic():
            field = Field.objects.select_for_update().get(collection__name=collection, name=name)
            field.name = new_name if new_name is not None else field.name
            field.type = type if type is not None else field.type
            field.options = options if options is not None else field.options
            field.save()
            self.changed(collection)

    def remove_field(self, collection: str, name: str) -> None:
        """Delete a field under the cluster lock ``"{plugin}:fields.before_destroy:{collection}"``.

        The transaction commits, and so the sync message is sent, while the lock is held.
        """

        def destroy() -> None:
            with transaction.atomic():
                Field.objects.filter(collection__name=collection, name=name).delete()
                self.changed(collection)

        key = f"{self.name}:fields.before_destroy:{collection}"
        self.app.lock_manager.run_exclusive(key, destroy, ttl=REMOVE_FIELD_LOCK_TTL)

    # --- checks --------------------------------------------------------------------------------------
    def database_schema(self) -> Schema:
        """The schema as stored now (for comparing with ``self.registry.snapshot()``)."""
        return load_from_database()

    def in_sync(self) -> bool:
        """True when this node's registry equals the database."""
        return self.registry.snapshot() == self.database_schema()
