"""Database connections in nocluster's long-lived threads (consumers, queue workers, heartbeats)."""

from __future__ import annotations

import contextlib
import os

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


def forget_inherited_connections() -> None:
    """In a forked child, first thing: drop the database connections of the thread that forked, without a word
    on their sockets (a close would end the parent's session, a query would interleave with the parent's on the
    same socket and hang one of them). Celery's Django fixup does the same on ``worker_process_init``, but may run
    after a handler that already uses the database."""
    for connection in connections.all(initialized_only=True):
        if connection.connection is not None:
            with contextlib.suppress(Exception):
                os.close(connection.connection.fileno())
        with contextlib.suppress(Exception):
            connection.close()
        connection.connection = None


def close_this_thread_connections() -> None:
    """Close this thread's connections (the worker's main thread, before its pool forks: a child must not
    inherit an open one)."""
    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            connection.close()
