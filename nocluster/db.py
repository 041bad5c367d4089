"""Database connections in nocluster's long-lived threads (consumers, queue workers, heartbeats)."""

from __future__ import annotations

from django.db import connections


def close_old_connections() -> None:
    """Django's ``close_old_connections()`` for our threads, as Django runs it around each request: close this
    thread's connections that are unusable or older than ``CONN_MAX_AGE``, so a handler gets a working one and
    none stays open for ever. A connection inside ``atomic()`` (a handler called synchronously by code in a
    transaction, e.g. ``only_self`` delivery) is left alone: closing it would break that transaction."""
    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            connection.close_if_unusable_or_obsolete()


def relaxed_commit(alias: str) -> None:
    """In a transaction of ``alias`` on PostgreSQL: its commit does not wait for the WAL to reach the disk.

    For writes whose loss in a database crash only causes a message to be sent or checked once more (the outbox's
    deletions, the record of relayed messages that ran): it saves a disk flush per commit. Other databases: no-op.
    """
    connection = connections[alias]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")
