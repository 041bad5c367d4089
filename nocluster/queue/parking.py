"""Long delays wait in the database, not in a consumer.

A Celery worker holds a countdown message unacked until it is due, and holds at most ``HELD_PER_PROCESS`` of them
per pool process before it stops fetching (``worker_eta_task_limit``, so the Redis visibility timeout covers each
one). A backlog of delayed messages (reminders an hour out, retries waiting out their backoff, messages over a
rate limit) would fill those places and starve every other message of the worker; on the broker they would also
travel again at every hop. So a backend with ``park_after`` set (the Celery one) does not get a message to send
later than that: :meth:`ParkedMessages.park` writes it to a :class:`~nocluster.models.ParkedMessage` row, and
:class:`ParkingRelease`, a thread of every Celery worker's main process (``nocluster-delayed``), sends the rows
that are due within ``LEAD`` seconds to the broker, with the rest of their countdown, and deletes them in the
transaction that claimed them (``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two workers never take
the same row). A worker killed between a send and that commit leaves its rows, which are sent again: delivery
stays at least once. If the row cannot be written (the database is down), the manager sends the message with a
countdown as before (in hops of at most the backend's ``longest_delay``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

from django.db import DEFAULT_DB_ALIAS, transaction
from django.db.models import Count, QuerySet
from django.utils import timezone

from nocluster.db import close_old_connections
from nocluster.errors import MalformedMessage
from nocluster.queue.message import Message

if TYPE_CHECKING:
    from nocluster.models import ParkedMessage

logger = logging.getLogger("nocluster.queue")

# Seconds before it is due that a parked message is sent to the broker (with the rest as its countdown).
LEAD = 1.0
# Seconds between two looks for due rows.
INTERVAL = 0.5
# Rows sent per transaction.
BATCH = 500
# Seconds between two log lines while the release keeps failing.
FAILING_LOG_EVERY = 60.0

# send(message, seconds left before it is due)
Send = Callable[[Message, float], None]


def parked_model() -> type[ParkedMessage]:
    from nocluster.models import ParkedMessage

    return ParkedMessage


class ParkedMessages:
    """The parked messages of app ``app_name``, in database ``database``."""

    def __init__(self, app_name: str, database: str = DEFAULT_DB_ALIAS) -> None:
        self.app_name = app_name
        self.database = database

    def _rows(self) -> QuerySet[ParkedMessage]:
        return parked_model().objects.using(self.database).filter(app_name=self.app_name)

    def park(self, message: Message, delay: float) -> None:
        """Keep ``message`` until ``delay`` seconds from now (raises whatever the database raises)."""
        parked_model().objects.using(self.database).create(
            app_name=self.app_name, channel=message.channel, message_id=message.id, body=message.to_wire(),
            due=timezone.now() + timedelta(seconds=delay),
        )  # fmt: skip

    def release_due(self, send: Send, lead: float = LEAD) -> int:
        """Send the rows due within ``lead`` seconds, earliest first, with ``send(message, seconds left)``, and
        delete them; return how many were sent. A send that raises ends the batch: the rows sent before it are
        deleted, the others stay for the next call, and the error propagates. A row that is not a message any more
        is logged and deleted."""
        now = timezone.now()
        sent: list[int] = []
        error: Exception | None = None
        with transaction.atomic(using=self.database):
            due = self._rows().filter(due__lte=now + timedelta(seconds=lead)).order_by("due", "id")
            for row in due.select_for_update(skip_locked=True)[:BATCH]:
                try:
                    send(Message.from_wire(row.body), max((row.due - now).total_seconds(), 0.0))
                except MalformedMessage as exc:
                    logger.error("queue: dropped parked row %s of %r: %s", row.pk, row.channel, exc)
                except Exception as exc:
                    error = exc  # the commit below must still delete what was sent
                    break
                sent.append(row.pk)
            if sent:
                self._rows().filter(pk__in=sent).delete()
        if error is not None:
            raise error
        return len(sent)

    def discard(self, message_id: str) -> int:
        """Delete the parked copies of ``message_id`` (it was cancelled); return how many."""
        deleted, _ = self._rows().filter(message_id=message_id).delete()
        return deleted

    def count(self) -> int:
        return self._rows().count()

    def counts(self) -> dict[str, int]:
        """Parked messages per channel (channels with none are left out)."""
        rows = self._rows().values("channel").annotate(n=Count("id")).order_by("channel")
        return {row["channel"]: row["n"] for row in rows}


class ParkingRelease:
    """The thread that calls ``release()`` every ``interval`` seconds, and at once again after a full batch."""

    def __init__(self, release: Callable[[], int], interval: float = INTERVAL, name: str = "nocluster-delayed"):
        self.release = release
        self.interval = interval
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def _loop(self) -> None:
        failing_since: float | None = None
        logged = 0.0
        while not self._stop.is_set():
            sent = 0
            try:
                sent = self.release()
                if failing_since is not None:
                    logger.warning("queue: parked messages are released again")
                failing_since = None
            except Exception as exc:
                now = time.monotonic()
                if failing_since is None:
                    failing_since, logged = now, now
                    logger.exception("queue: could not release parked messages; trying every %s s", self.interval)
                elif now - logged >= FAILING_LOG_EVERY:
                    logged = now
                    logger.warning("queue: parked messages still not released for %.0f s: %s: %s",
                                   now - failing_since, type(exc).__name__, str(exc).splitlines()[0][:200])  # fmt: skip
            finally:
                close_old_connections()
            if sent < BATCH:
                self._stop.wait(self.interval)
