"""Database connections in nocluster's long-lived threads (consumers, queue workers, heartbeats)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

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
    deletions): it saves a disk flush per commit. Other databases: no-op.
    """
    connection = connections[alias]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")


# A statement run in autocommit on PostgreSQL is its own transaction: this CTE, selected from, turns off the wait for
# the WAL flush for that transaction alone (``set_config(..., is_local => true)``), in the same round trip.
RELAXED_CTE = "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true))"


def relaxed_autocommit(alias: str) -> bool:
    """True when a statement on ``alias`` may use :data:`RELAXED_CTE`: PostgreSQL, and not inside a transaction
    (there the setting would relax the caller's whole commit)."""
    connection = connections[alias]
    return connection.vendor == "postgresql" and not connection.in_atomic_block


def execute_lean(alias: str, sql: str, params: Sequence[Any]) -> tuple[int, Any]:
    """Run one of our own hot statements on ``alias``; return its row count and first row (or None).

    On PostgreSQL (psycopg 3) it goes on a plain psycopg cursor of Django's connection: parameters bound on the
    server, and prepared after the connection's ``prepare_threshold`` runs (the ``OPTIONS`` key of that name;
    ``None`` there turns preparing off, as behind a transaction-pooling PgBouncer) instead of quoted into the text
    on every call by Django's client-side cursor. About 100 us less per statement on the outbox's insert.
    Database errors are Django's, as with any query; Django's ``execute_wrapper`` hooks and ``DEBUG`` query log do
    not see the statement. Elsewhere it is an ordinary Django cursor. ``sql`` uses ``%s`` placeholders.
    """
    connection = connections[alias]
    if connection.vendor != "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.rowcount, cursor.fetchone() if cursor.description else None
    import psycopg

    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount, cursor.fetchone() if cursor.description else None


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
