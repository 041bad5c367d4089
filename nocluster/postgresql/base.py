"""Django's PostgreSQL backend (psycopg 3), plus inserts that wait for the commit and go out with it.

A message published inside ``atomic()`` is an outbox row in the caller's transaction (:mod:`nocluster.outbox`).
Written at once, its ``INSERT`` is a round trip of its own, about a fifth of a short transaction's time on a
server across a socket. With ``ENGINE: "nocluster.postgresql"`` the outbox hands such rows to
:meth:`DatabaseWrapper.insert_at_commit` instead: they are kept in memory and, when the transaction commits, sent
with the ``COMMIT`` in one psycopg pipeline (the ``INSERT`` statements and the ``COMMIT``, then one sync: a single
round trip, or two when a row is the transaction's first statement, as psycopg syncs after the ``BEGIN`` it sends
first). The rows commit or roll back with the caller's data as before.

What a caller may notice: the transaction does not see its own outbox rows before the commit, and an ``INSERT``
the database refuses raises from the commit (the end of ``atomic()``; Django then rolls the transaction back)
rather than from ``publish()``. Only rows added outside any savepoint (and outside a nested
``atomic(savepoint=False)``) wait: before a savepoint is created the waiting rows are inserted (so a rollback to it
cannot take a row it did not hold), and inside one a row is inserted at once, after those waiting, so the rows
keep the order they were added in. As with :func:`~nocluster.db.execute_lean`, these statements go on plain
psycopg cursors: Django's ``execute_wrapper`` hooks and its ``DEBUG`` query log do not see them. Everything else is
Django's backend, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from django.db.backends.postgresql import base
from django.db.transaction import TransactionManagementError


@dataclass
class AtCommit:
    """An ``INSERT ... RETURNING`` waiting for the commit; ``inserted`` gets the first returned column; ``what``
    names the row in the note of an error."""

    sql: str
    params: Sequence[Any]
    inserted: Callable[[Any], None]
    what: str


class DatabaseWrapper(base.DatabaseWrapper):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._at_commit: list[AtCommit] = []
        # Rollbacks to a savepoint on this connection, manual ones included (Django's savepoint_ids lists only
        # atomic()'s): the outbox reads its rows back from the table after one (a row may have gone with it).
        self.savepoint_rollbacks = 0

    def insert_at_commit(self, sql: str, params: Sequence[Any], inserted: Callable[[Any], None], what: str) -> None:
        """Run ``sql`` (one ``INSERT ... RETURNING``) in the commit's round trip, just before the ``COMMIT``, and
        call ``inserted`` with the first column returned; if the database refuses it, the commit raises (and the
        transaction rolls back) with a note naming ``what``. Only inside ``atomic()``.

        Inside a savepoint, or a nested ``atomic(savepoint=False)`` (whose failure rolls back the whole
        transaction, so nothing marks where it began), it runs at once instead, after the statements waiting:
        statements always run in the order they were given.
        """
        if not self.in_atomic_block:
            raise TransactionManagementError("insert_at_commit() needs a transaction (atomic())")
        # As a query would: refused in a transaction that failed, or whose connection closed.
        self.validate_no_broken_transaction()
        self.ensure_connection()
        self._at_commit.append(AtCommit(sql, params, inserted, what))
        if self.savepoint_ids:
            self._insert_waiting("")

    def _commit(self) -> None:
        waiting, self._at_commit = self._at_commit, []
        if not waiting:
            super()._commit()  # type: ignore[misc]  # missing from django-stubs
            return
        if self.connection is None:  # closed in the transaction: what it wrote is gone, and so are these rows
            raise TransactionManagementError("the connection closed before its transaction committed")
        try:
            with self.wrap_database_errors:
                if psycopg.Pipeline.is_supported():
                    self._insert_in_pipeline_and_commit(self.connection, waiting)
                else:  # a libpq before 14: the same statements, one round trip each
                    self._insert_now(waiting)
                    self.connection.commit()
        except Exception as exc:
            exc.add_note(f"while inserting at commit: {', '.join(dict.fromkeys(insert.what for insert in waiting))}")
            raise

    @staticmethod
    def _insert_in_pipeline_and_commit(connection: psycopg.Connection[Any], waiting: list[AtCommit]) -> None:
        # The COMMIT is a statement of the pipeline, not ``connection.commit()``, which syncs by itself: the block's
        # end then sends the one sync, and psycopg reads the transaction's end from the server's status.
        cursors = []
        try:
            with connection.pipeline():
                for insert in waiting:
                    cursor = psycopg.Cursor(connection)
                    cursors.append(cursor)
                    cursor.execute(insert.sql, insert.params)
                cursors.append(commit := psycopg.Cursor(connection))
                commit.execute("COMMIT")
            for cursor, insert in zip(cursors, waiting, strict=False):
                insert.inserted(first_column(cursor))
        finally:
            for cursor in cursors:
                cursor.close()

    def _insert_now(self, waiting: list[AtCommit]) -> None:
        self.ensure_connection()
        assert self.connection is not None
        for insert in waiting:
            with psycopg.Cursor(self.connection) as cursor:
                cursor.execute(insert.sql, insert.params)
                insert.inserted(first_column(cursor))

    def _insert_waiting(self, before: str) -> None:
        waiting, self._at_commit = self._at_commit, []
        try:
            with self.wrap_database_errors:
                self._insert_now(waiting)
        except Exception as exc:
            # The transaction is broken (PostgreSQL would answer its COMMIT with a silent ROLLBACK): Django must
            # roll it back at the end of atomic(), whatever the caller catches, and run no commit callback.
            self.needs_rollback = True
            exc.add_note(f"while inserting{before}: {', '.join(insert.what for insert in waiting)}")
            raise

    def _savepoint(self, sid: str) -> None:
        # A rollback to the savepoint must not take rows added before it: they are inserted first.
        if self._at_commit:
            self._insert_waiting(" before a savepoint")
        super()._savepoint(sid)  # type: ignore[misc]  # missing from django-stubs

    def _savepoint_rollback(self, sid: str) -> None:
        # Every row waiting was added after the newest savepoint (waiting rows are inserted when one is created):
        # a rollback to it, or to an older one, takes them all.
        self._at_commit = []
        self.savepoint_rollbacks += 1
        super()._savepoint_rollback(sid)  # type: ignore[misc]  # missing from django-stubs

    def connect(self) -> None:
        self._at_commit = []  # a new connection starts with nothing waiting (a block whose connection closed)
        super().connect()

    def _rollback(self) -> None:
        self._at_commit = []
        super()._rollback()  # type: ignore[misc]  # missing from django-stubs

    def _close(self) -> None:
        self._at_commit = []
        super()._close()  # type: ignore[misc]  # missing from django-stubs


def first_column(cursor: psycopg.Cursor[Any]) -> Any:
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError("an INSERT ... RETURNING returned no row")
    return row[0]
