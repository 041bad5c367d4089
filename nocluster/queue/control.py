"""The event queue's cluster-wide state, in the database: paused channels, cancelled messages, unique keys.

Every node and worker reads the same rows, so the state holds across nodes and survives restarts of all of them:

- a paused channel (:class:`~nocluster.models.ChannelState`): its messages stay queued. Every delivery reads
  it (with the cancel, below) before it runs, so no try starts after ``pause()`` returned; consumers read the
  paused set every ``refresh`` seconds to stop taking the channel's messages at all;
- a cancelled message (:class:`~nocluster.models.CancelledMessage`): a delivery of it is dropped before it runs
  (one query per delivery reads both); the record is kept ``CANCEL_KEPT`` seconds;
- a unique key (:class:`~nocluster.models.UniqueMessage`): held by one message from its publish until it ends,
  or until its ttl passed. The claim is one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE expired RETURNING``
  (PostgreSQL and SQLite), in the caller's transaction when there is one, so concurrent publishes with one key
  queue one message whatever the number of processes.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from django.db import DEFAULT_DB_ALIAS, connections
from django.utils import timezone

from nocluster.db import execute_lean

if TYPE_CHECKING:
    from nocluster.models import CancelledMessage, ChannelState, UniqueMessage

logger = logging.getLogger("nocluster.queue")

# Seconds a process keeps the paused set before reading it again.
PAUSE_REFRESH = 1.0
# Seconds a cancel is remembered (a message delayed longer than this after its cancel would run).
CANCEL_KEPT = 7 * 24 * 3600.0
# Every PRUNE_EVERY cancels, the expired records are removed.
PRUNE_EVERY = 100
# The longest unique key.
UNIQUE_KEY_LENGTH = 200


class GateSql(NamedTuple):
    """More for the run gate's statement (:meth:`QueueControl.run_gate`): common table expressions before it and
    columns after its own, with their parameters."""

    ctes: str = ""
    cte_params: tuple[Any, ...] = ()
    columns: str = ""
    column_params: tuple[Any, ...] = ()


def models() -> tuple[type[ChannelState], type[CancelledMessage], type[UniqueMessage]]:
    from nocluster.models import CancelledMessage, ChannelState, UniqueMessage  # loads before the app registry

    return ChannelState, CancelledMessage, UniqueMessage


class QueueControl:
    """The paused channels, cancelled messages and unique keys of app ``app_name`` (default database).

    Parameters:
      refresh: seconds a process keeps the paused set it read.
      clock: a monotonic clock (tests).
    """

    def __init__(
        self, app_name: str, refresh: float = PAUSE_REFRESH, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.app_name = app_name
        self.refresh = refresh
        self._clock = clock
        self._paused: frozenset[str] = frozenset()
        self._read_at: float | None = None
        self._lock = threading.Lock()
        self._cancels = itertools.count(1)

    # --- paused channels ---------------------------------------------------------------------------------
    def set_paused(self, channel: str, paused: bool, by: str = "") -> None:
        """Pause or resume ``channel`` for the whole cluster (one upsert); this process sees it at once."""
        channel_state = models()[0]
        channel_state.objects.update_or_create(
            app_name=self.app_name, channel=channel, defaults={"paused": paused, "changed_by": by[:200]}
        )
        with self._lock:
            self._read_at = None

    def paused_channels(self, fresh: bool = False) -> frozenset[str]:
        """The paused channels, as read at most ``refresh`` seconds ago (``fresh``: read now).

        If the database cannot be read, the last set read is kept (and the error logged).
        """
        with self._lock:
            now = self._clock()
            if not fresh and self._read_at is not None and now - self._read_at < self.refresh:
                return self._paused
        channel_state = models()[0]
        try:
            rows = channel_state.objects.filter(app_name=self.app_name, paused=True)
            paused = frozenset(rows.values_list("channel", flat=True))
        except Exception as exc:
            logger.warning("queue: could not read the paused channels (%s: %s); keeping the last known set",
                           type(exc).__name__, exc)  # fmt: skip
            return self._paused
        with self._lock:
            self._paused, self._read_at = paused, now
        return paused

    def is_paused(self, channel: str) -> bool:
        return channel in self.paused_channels()

    def forget_paused(self) -> None:
        """Read the paused set again on next use (after a fork)."""
        self._lock = threading.Lock()  # a lock held by a parent thread at fork time is never released here
        self._read_at = None

    # --- cancelled messages -------------------------------------------------------------------------------
    def store_cancel(self, message_id: str) -> None:
        """Remember that ``message_id`` is cancelled, and free any unique key it holds."""
        _, cancelled, unique = models()
        cancelled.objects.bulk_create([cancelled(app_name=self.app_name, message_id=message_id)],
                                      ignore_conflicts=True)  # fmt: skip
        unique.objects.filter(app_name=self.app_name, message_id=message_id).delete()
        if next(self._cancels) % PRUNE_EVERY == 0:
            cancelled.objects.filter(created__lt=timezone.now() - timedelta(seconds=CANCEL_KEPT)).delete()

    def is_cancelled(self, message_id: str) -> bool:
        cancelled = models()[1]
        return cancelled.objects.filter(app_name=self.app_name, message_id=message_id).exists()

    def run_gate(
        self, message_id: str, channel: str, also: GateSql | None = None
    ) -> tuple[bool, bool, tuple[Any, ...]]:
        """The run gate of every delivery, read now in one statement: whether ``message_id`` is cancelled, whether
        ``channel`` is paused, and what ``also`` selects (one round trip): ``(cancelled, paused, the columns of
        also)``. Raises on a database error."""
        channel_state, cancelled, _ = models()
        quote = connections[DEFAULT_DB_ALIAS].ops.quote_name
        also = also or GateSql()
        sql = (
            f"{also.ctes} SELECT (SELECT 1 FROM {quote(cancelled._meta.db_table)} "  # noqa: S608
            f"WHERE {quote('app_name')} = %s AND {quote('message_id')} = %s), "
            f"(SELECT 1 FROM {quote(channel_state._meta.db_table)} "
            f"WHERE {quote('app_name')} = %s AND {quote('channel')} = %s AND {quote('paused')})"
            f"{', ' + also.columns if also.columns else ''}"
        )
        params = [*also.cte_params, self.app_name, message_id, self.app_name, channel, *also.column_params]
        row = execute_lean(DEFAULT_DB_ALIAS, sql, params)[1]
        return row[0] is not None, row[1] is not None, tuple(row[2:])

    # --- unique keys -----------------------------------------------------------------------------------------
    def claim_unique(self, key: str, message_id: str, ttl: float) -> str | None:
        """Make ``message_id`` the holder of ``key`` for ``ttl`` seconds, unless another message holds it.

        Returns None when this message holds it now, else the id of the message that does. Runs on the default
        database, in the caller's transaction if one is open there.
        """
        unique = models()[2]
        connection = connections[DEFAULT_DB_ALIAS]
        quote = connection.ops.quote_name
        table = quote(unique._meta.db_table)
        now = timezone.now()
        values = [connection.ops.adapt_datetimefield_value(value) for value in (now + timedelta(seconds=ttl), now)]
        sql = (
            f"INSERT INTO {table} ({quote('app_name')}, {quote('key')}, {quote('message_id')}, {quote('expires')}) "  # noqa: S608
            f"VALUES (%s, %s, %s, %s) ON CONFLICT ({quote('app_name')}, {quote('key')}) DO UPDATE SET "
            f"{quote('message_id')} = excluded.{quote('message_id')}, {quote('expires')} = excluded.{quote('expires')} "
            f"WHERE {table}.{quote('expires')} < %s RETURNING {quote('message_id')}"
        )
        for _ in range(3):
            with connection.cursor() as cursor:
                cursor.execute(sql, [self.app_name, key, message_id, *values])
                if cursor.fetchone() is not None:
                    return None
            holder = unique.objects.filter(app_name=self.app_name, key=key).values_list("message_id", flat=True)
            held_by = holder.first()
            if held_by is not None:
                return str(held_by)
            # Released between the two statements: claim again.
        raise RuntimeError(f"unique key {key!r}: could not be claimed (released and taken again three times)")

    def release_unique(self, key: str, message_id: str) -> None:
        """Free ``key`` if ``message_id`` still holds it; an error is logged (the key then frees at its ttl)."""
        unique = models()[2]
        try:
            unique.objects.filter(app_name=self.app_name, key=key, message_id=message_id).delete()
        except Exception as exc:
            logger.warning("queue: unique key %r of message %s not released (%s: %s); it frees at its ttl",
                           key, message_id, type(exc).__name__, exc)  # fmt: skip

    def unique_holder(self, key: str) -> str | None:
        """The id of the message holding ``key`` now (an expired hold counts as none)."""
        unique = models()[2]
        rows = unique.objects.filter(app_name=self.app_name, key=key, expires__gte=timezone.now())
        holder = rows.values_list("message_id", flat=True).first()
        return None if holder is None else str(holder)
