"""``app.outbox``: what is published inside a transaction is written to a table in that transaction, and relayed
to its broker after the commit.

Ours (Django's ``transaction.on_commit`` alone loses the message when the broker is down at the commit, and a
failing callback skips every later one): ``add()`` inserts an :class:`~nocluster.models.OutboxMessage` row on the
caller's database alias, so the row and the caller's data commit or roll back together. After the commit a robust
``on_commit`` callback flushes at once, in the committing thread; rows that could not be sent wait, and every
node's relay thread (``nocluster-outbox``) sends them with backoff once the broker answers again, whichever node is
up. A row is deleted only after its target accepted it (publisher confirms on RabbitMQ), so delivery is at least
once: a relay killed between sending and deleting sends the row again, and the receiving side drops the copy.

Claiming: ``SELECT ... FOR UPDATE SKIP LOCKED`` where the database has it (PostgreSQL), so relays of several nodes
share the backlog without sending a row twice; elsewhere (SQLite) one relay at a time per process, and SQLite's
write lock (``transaction_mode: IMMEDIATE`` in the settings) serialises processes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import Count, Min, Q
from django.utils import timezone

from nocluster.db import close_old_connections
from nocluster.durations import count, seconds
from nocluster.envelope import JSON
from nocluster.identity import NodeIdentity
from nocluster.lifecycle import Component

if TYPE_CHECKING:
    from nocluster.models import OutboxMessage

logger = logging.getLogger("nocluster.outbox")

Sender = Callable[["OutboxMessage"], None]


def outbox_model() -> type[OutboxMessage]:
    """The model, imported on use: this module loads before Django's app registry is ready."""
    from nocluster.models import OutboxMessage

    return OutboxMessage


@dataclass(frozen=True)
class OutboxSettings:
    """``NOCLUSTER["OUTBOX"]``: seconds, and rows per relay batch."""

    interval: float = 1.0
    backoff_max: float = 5.0
    batch: int = 100
    databases: tuple[str, ...] = (DEFAULT_DB_ALIAS,)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> OutboxSettings:
        values = config.get("OUTBOX", {})
        key = 'NOCLUSTER["OUTBOX"]'
        return cls(
            interval=seconds(values.get("INTERVAL", cls.interval), f'{key}["INTERVAL"]'),
            backoff_max=seconds(values.get("BACKOFF_MAX", cls.backoff_max), f'{key}["BACKOFF_MAX"]'),
            batch=count(values.get("BATCH", cls.batch), f'{key}["BATCH"]', least=1, most=10_000),
            databases=tuple(values.get("DATABASES", cls.databases)),
        )


class Outbox(Component):
    """The outbox of one node.

    Parameters:
      identity: this node (its ``name`` scopes the rows; its instance id is the origin of what it adds).
      settings: relay cadence, backoff and batch size.

    Components that publish through it register a sender per ``kind`` (:meth:`register`): the event queue
    (``"queue"``) and the sync messages (``"sync"``).
    """

    def __init__(self, identity: NodeIdentity, settings: OutboxSettings) -> None:
        self.identity = identity
        self.settings = settings
        self._senders: dict[str, Sender] = {}
        self._databases: set[str] = set(settings.databases)
        self._flush_lock = threading.Lock()  # one flush at a time in this process (needed without SKIP LOCKED)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, kind: str, send: Sender) -> None:
        """Relay rows of ``kind`` with ``send(row)``, which returns once the broker accepted the message."""
        self._senders[kind] = send

    # --- inside the caller's transaction ------------------------------------------------------------------
    def add(self, using: str | None, kind: str, channel: str, message_id: str, body: JSON) -> None:
        """Write a row in the current transaction of database ``using``; it is sent after that commit.

        Raises whatever the database raises (the caller's transaction is then broken, as with any write).
        """
        alias = using or DEFAULT_DB_ALIAS
        outbox_model().objects.using(alias).create(
            app_name=self.identity.name,
            kind=kind,
            channel=channel,
            message_id=message_id,
            origin=self.identity.instance_id,
            body=body,
        )
        self._databases.add(alias)
        self._flush_after_commit(alias)

    def _flush_after_commit(self, alias: str) -> None:
        # One flush per transaction, not one per message: register it once (found again among the callbacks
        # unless a rolled-back savepoint dropped it, in which case it is registered anew).
        connection = connections[alias]
        if not any(getattr(entry[1], "__self__", None) is self for entry in connection.run_on_commit):
            transaction.on_commit(self._committed, using=alias, robust=True)

    def _committed(self) -> None:
        for alias in sorted(self._databases):
            self.flush(alias)

    # --- relaying -------------------------------------------------------------------------------------------
    def flush(self, using: str = DEFAULT_DB_ALIAS) -> int:
        """Send the due rows of this app on ``using``, oldest first, until none is left; return how many were
        sent. A row that fails waits with backoff (``attempts``, ``next_attempt``, ``last_error``) and holds
        back the later rows of its channel, so each channel keeps its order."""
        sent_total = 0
        with self._flush_lock:
            while True:
                sent, more = self._flush_batch(using)
                sent_total += sent
                if not more:
                    return sent_total

    def _flush_batch(self, alias: str) -> tuple[int, bool]:
        rows_of_app = outbox_model().objects.using(alias).filter(app_name=self.identity.name)
        now = timezone.now()
        # Order is kept per (kind, channel): a row waiting out its backoff holds back the later rows of its
        # channel, not those of other channels.
        blocked = set(rows_of_app.filter(next_attempt__gt=now).values_list("kind", "channel").distinct())
        held_back = Q()
        for kind, channel in blocked:
            held_back |= Q(kind=kind, channel=channel)
        with transaction.atomic(using=alias):
            rows = list(
                rows_of_app.select_for_update(skip_locked=True)
                .filter(Q(next_attempt__isnull=True) | Q(next_attempt__lte=now))
                .exclude(held_back)
                .order_by("id")[: self.settings.batch]
            )
            sent: list[int] = []
            for row in rows:
                if (row.kind, row.channel) in blocked:
                    continue
                try:
                    self._send(row)
                except Exception as exc:
                    self._postpone(alias, row, exc)
                    blocked.add((row.kind, row.channel))
                    continue
                sent.append(row.pk)
            if sent:
                rows_of_app.filter(pk__in=sent).delete()
        return len(sent), len(rows) == self.settings.batch and len(sent) == len(rows)

    def _send(self, row: OutboxMessage) -> None:
        send = self._senders.get(row.kind)
        if send is None:
            raise LookupError(f"no sender for outbox rows of kind {row.kind!r} on this node")
        send(row)

    def _postpone(self, alias: str, row: OutboxMessage, exc: Exception) -> None:
        delay = min(self.settings.backoff_max, 0.5 * 2 ** min(row.attempts, 16))
        error = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "outbox: %s message %s on %r not relayed (attempt %d), next try in %.1f s: %s",
            row.kind, row.message_id, row.channel, row.attempts + 1, delay, error,
            extra={"channel": row.channel, "message_id": row.message_id},
        )  # fmt: skip
        outbox_model().objects.using(alias).filter(pk=row.pk).update(
            attempts=row.attempts + 1, next_attempt=timezone.now() + timedelta(seconds=delay), last_error=error[:2000]
        )

    # --- inspection -----------------------------------------------------------------------------------------
    def backlog(self) -> dict[str, Any]:
        """Rows waiting on every known database: ``{"pending": n, "oldest_seconds": s or None}``."""
        pending, oldest = 0, None
        now = timezone.now()
        for alias in sorted(self._databases):
            stats = (
                outbox_model()
                .objects.using(alias)
                .filter(app_name=self.identity.name)
                .aggregate(n=Count("id"), first=Min("created"))
            )
            pending += stats["n"]
            if stats["first"] is not None:
                age = (now - stats["first"]).total_seconds()
                oldest = age if oldest is None else max(oldest, age)
        return {"pending": pending, "oldest_seconds": oldest}

    # --- the relay thread -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="nocluster-outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._wake.set()
        thread.join(30)
        if thread.is_alive():
            logger.error("outbox relay thread did not stop within 30 s")

    def after_fork(self) -> None:
        self._thread = None
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()

    def _run(self) -> None:
        failing = False
        while not self._stopping.is_set():
            try:
                for alias in sorted(self._databases):
                    self.flush(alias)
                if failing:
                    logger.warning("outbox relay works again")
                failing = False
            except Exception as exc:
                # The whole traceback once; while the database stays unreachable, one line per attempt.
                if not failing:
                    logger.exception("outbox relay failed; retrying every %s s", self.settings.interval)
                else:
                    logger.warning("outbox relay still failing: %s: %s", type(exc).__name__, str(exc).splitlines()[0])
                failing = True
            finally:
                close_old_connections()
            self._wake.wait(self.settings.interval)
            self._wake.clear()
