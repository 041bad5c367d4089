"""Dropping a second copy of a relayed message (ours): the outbox delivers at least once.

A node killed between sending an outbox row and deleting it leaves the row, and another node sends it again.
Every send of a relayed message carries a new ``send_id``. When a relayed message starts its first try, its id
and send id are written to :class:`~nocluster.models.RelayedRun` (one ``INSERT ... ON CONFLICT DO NOTHING``); a
message whose id is there
with another send id is a second copy, and is dropped before it runs, even while the first copy still runs. The
same copy delivered again (its worker died, Celery retried it) has the same send id and runs again (at least once).

Limit: if the first copy started and was then lost by the broker itself (a Redis without persistence that
crashed), the second copy is dropped too. Entries older than ``window`` seconds are removed as new ones are written.
"""

from __future__ import annotations

import itertools
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from django.db import DEFAULT_DB_ALIAS, connections
from django.utils import timezone

from nocluster.db import RELAXED_CTE, execute_lean, relaxed_autocommit
from nocluster.queue.control import GateSql
from nocluster.queue.message import Message

if TYPE_CHECKING:
    from nocluster.models import RelayedRun

logger = logging.getLogger("nocluster.queue")

# Seconds a relayed message is remembered; every PURGE_EVERY writes the older entries are removed.
WINDOW = 24 * 3600.0
PURGE_EVERY = 1000


def relayed_run_model() -> type[RelayedRun]:
    from nocluster.models import RelayedRun  # this module loads before the app registry is ready

    return RelayedRun


class DedupeLedger:
    """The relayed messages of app ``app_name`` that started (database-wide, so every worker sees them)."""

    def __init__(self, app_name: str, window: float = WINDOW) -> None:
        self.app_name = app_name
        self.window = window
        self._writes = itertools.count(1)

    @staticmethod
    def checks(message: Message) -> bool:
        """Whether ``message`` is looked up at all: the first try of a relayed message (others cost no query)."""
        return message.relayed and not message.retried and bool(message.send_id)

    def is_second_copy(self, message: Message) -> bool:
        """For the first try of a relayed message: record it, and say whether another copy of it started before.

        Any other message is never a second copy (and costs no query).
        """
        if not self.checks(message):
            return False
        model = relayed_run_model()
        if not self._insert(model, message):
            return self._first_send_id(message) != message.send_id
        self._recorded()
        return False

    def _first_send_id(self, message: Message) -> str | None:
        first = relayed_run_model().objects.filter(app_name=self.app_name, message_id=message.id)
        return first.values_list("send_id", flat=True).first()

    def _recorded(self) -> None:
        if next(self._writes) % PURGE_EVERY == 0:
            relayed_run_model().objects.filter(created__lt=timezone.now() - timedelta(seconds=self.window)).delete()

    # --- in the run gate's query (one round trip for the gate and the record) ----------------------------
    def claim_sql(self, message: Message) -> GateSql | None:
        """For :meth:`QueueControl.run_gate` on PostgreSQL in autocommit: what records this first try in the
        gate's own statement, its commit not waiting for the disk (see :meth:`_insert`), and selects
        ``(inserted, first send id)``; None when the message needs no record or the database cannot (then
        :meth:`is_second_copy` runs on its own)."""
        if not self.checks(message) or not relaxed_autocommit(DEFAULT_DB_ALIAS):
            return None
        quote = connections[DEFAULT_DB_ALIAS].ops.quote_name
        table = quote(relayed_run_model()._meta.db_table)
        columns = ", ".join(quote(name) for name in ("app_name", "message_id", "send_id", "created"))
        return GateSql(
            ctes=f"{RELAXED_CTE}, claim AS (INSERT INTO {table} ({columns}) SELECT %s, %s, %s, %s FROM relaxed "  # noqa: S608
            "ON CONFLICT DO NOTHING RETURNING 1)",
            cte_params=(self.app_name, message.id, message.send_id, timezone.now()),
            columns=f"(SELECT count(*) FROM claim), (SELECT {quote('send_id')} FROM {table} "  # noqa: S608
            f"WHERE {quote('app_name')} = %s AND {quote('message_id')} = %s)",
            column_params=(self.app_name, message.id),
        )

    def judge(self, message: Message, inserted: bool, first_send_id: str | None) -> bool:
        """From :meth:`claim_sql`'s columns: whether ``message`` is a second copy. The statement's snapshot may
        miss a first copy recorded at the same moment by another worker: then it is read again."""
        if inserted:
            self._recorded()
            return False
        if first_send_id is None:
            first_send_id = self._first_send_id(message)
        return first_send_id != message.send_id

    def _insert(self, model: type[RelayedRun], message: Message) -> bool:
        """One statement, in autocommit or in the caller's transaction: True when this copy is the first.

        ``ON CONFLICT DO NOTHING`` (PostgreSQL, SQLite): a conflict neither raises nor breaks a transaction. The
        SQL is built from the model's own table and column names (quoted); every value is a parameter. In
        autocommit on PostgreSQL its commit does not wait for the disk (:data:`~nocluster.db.RELAXED_CTE`): a
        database crash may forget the entries of its last moments, and a copy of one of those that is sent again
        would then run again (at least once, as without the ledger).
        """
        connection = connections[DEFAULT_DB_ALIAS]
        quote = connection.ops.quote_name
        columns = ", ".join(quote(name) for name in ("app_name", "message_id", "send_id", "created"))
        table = quote(model._meta.db_table)
        if relaxed_autocommit(DEFAULT_DB_ALIAS):
            sql = f"{RELAXED_CTE} INSERT INTO {table} ({columns}) SELECT %s, %s, %s, %s FROM relaxed"  # noqa: S608
        else:
            sql = f"INSERT INTO {table} ({columns}) VALUES (%s, %s, %s, %s)"  # noqa: S608
        params = [self.app_name, message.id, message.send_id, timezone.now()]
        return bool(execute_lean(DEFAULT_DB_ALIAS, f"{sql} ON CONFLICT DO NOTHING", params)[0])
