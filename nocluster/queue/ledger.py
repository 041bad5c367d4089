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

    def is_second_copy(self, message: Message) -> bool:
        """For the first try of a relayed message: record it, and say whether another copy of it started before.

        Any other message is never a second copy (and costs no query).
        """
        if not message.relayed or message.retried or not message.send_id:
            return False
        model = relayed_run_model()
        if not self._insert(model, message):
            first = model.objects.filter(app_name=self.app_name, message_id=message.id)
            return first.values_list("send_id", flat=True).first() != message.send_id
        if next(self._writes) % PURGE_EVERY == 0:
            model.objects.filter(created__lt=timezone.now() - timedelta(seconds=self.window)).delete()
        return False

    def _insert(self, model: type[RelayedRun], message: Message) -> bool:
        """One statement, in autocommit or in the caller's transaction: True when this copy is the first.

        ``ON CONFLICT DO NOTHING`` (PostgreSQL, SQLite): a conflict neither raises nor breaks a transaction. The
        SQL is built from the model's own table and column names (quoted); every value is a parameter.
        """
        connection = connections[DEFAULT_DB_ALIAS]
        quote = connection.ops.quote_name
        columns = ", ".join(quote(name) for name in ("app_name", "message_id", "send_id", "created"))
        table = quote(model._meta.db_table)
        sql = f"INSERT INTO {table} ({columns}) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING"  # noqa: S608
        with connection.cursor() as cursor:
            cursor.execute(sql, [self.app_name, message.id, message.send_id, timezone.now()])
            return bool(cursor.rowcount)
