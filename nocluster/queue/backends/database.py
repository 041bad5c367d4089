"""DatabaseQueueBackend: the event queue in a table of the project's database. The embedded default.

Every process of the project on one machine shares it (SQLite by default): a message published from
``manage.py shell`` runs on the ``runserver``/``runnode`` process, and nothing is lost when a process exits. A
node takes a message by leasing its row (a conditional ``UPDATE``, so two nodes never take the same row) for
``lease`` seconds and renews the lease while the message runs; the row is deleted when the try is settled, in
the same transaction as its retry or failed record. A node killed with kill -9 leaves its leases to expire: its
messages run again within ``lease`` seconds (at least once). Publishing inside ``atomic()`` on the queue's
database is transactional by itself (the row is written in the caller's transaction).

Worker threads per channel (``concurrency`` each) poll the table every ``poll_interval`` seconds, and are woken
at once by a publish from this process. For a cluster use the celery backend: polling a table from many nodes
does not scale like a broker.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import Count, Min, Q
from django.utils import timezone

from nocluster.db import close_old_connections
from nocluster.durations import seconds
from nocluster.errors import MalformedMessage
from nocluster.queue.backend import QueueBackend
from nocluster.queue.message import Message, Subscription
from nocluster.queue.stats import ChannelStats

if TYPE_CHECKING:
    from django.db.models import QuerySet

    from nocluster.models import QueuedMessage

logger = logging.getLogger("nocluster.queue.database")


def queued_model() -> type[QueuedMessage]:
    from nocluster.models import QueuedMessage  # this module loads before the app registry is ready

    return QueuedMessage


@dataclass
class _Channel:
    full_name: str
    subscription: Subscription
    threads: list[threading.Thread] = field(default_factory=list)
    in_flight: int = 0


class DatabaseQueueBackend(QueueBackend):
    """Options (keyword-only; durations in seconds):
    database: the database alias holding the queue table (default ``"default"``).
    poll_interval: how often an idle worker thread looks for due messages (and asks ``idle()`` again).
    lease: how long a taken message is this node's before another node may take it (renewed every third of it).
    grace: work still running this long after its timeout is stopped in its thread (see ``runner``).
    retry_backoff, retry_backoff_max: retry delays, ``min(retry_backoff * 2**n, retry_backoff_max)``.
    stop_timeout: how long ``stop()`` waits for each worker thread to finish its message.
    """

    def __init__(
        self,
        *,
        database: str = DEFAULT_DB_ALIAS,
        poll_interval: float = 0.2,
        lease: float = 10.0,
        grace: float = 5.0,
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        option = "DatabaseQueueBackend option"
        self.database = database
        self.alias = database
        self.poll_interval = seconds(poll_interval, f"{option} poll_interval")
        self.lease = seconds(lease, f"{option} lease")
        self.grace = seconds(grace, f"{option} grace")
        self.retry_backoff = seconds(retry_backoff, f"{option} retry_backoff", allow_zero=True)
        self.retry_backoff_max = seconds(retry_backoff_max, f"{option} retry_backoff_max", allow_zero=True)
        self.stop_timeout = seconds(stop_timeout, f"{option} stop_timeout")
        self._channels: dict[str, _Channel] = {}
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._running: set[int] = set()  # row ids leased by this process
        self._started = False
        self._stopping = False
        self._stopped = threading.Event()  # wakes the lease renewer on stop
        self._renewer: threading.Thread | None = None

    def _rows(self) -> QuerySet[QueuedMessage]:
        return queued_model().objects.using(self.alias).filter(app_name=self.manager.identity.name)

    # --- the contract -----------------------------------------------------------------------------------
    def register(self, full_channel: str, subscription: Subscription) -> None:
        with self._cond:
            channel = self._channels.get(full_channel)
            if channel is None:
                channel = self._channels[full_channel] = _Channel(full_channel, subscription)
            channel.subscription = subscription
            if self._started:
                self._spawn(channel)

    def publish(self, full_channel: str, message: Message, delay: float = 0.0) -> None:
        queued_model().objects.using(self.alias).create(
            app_name=self.manager.identity.name,
            channel=message.channel,
            message_id=message.id,
            body=message.to_wire(),
            due=timezone.now() + timedelta(seconds=max(delay, 0.0)),
        )
        connection = connections[self.alias]
        if connection.in_atomic_block:
            transaction.on_commit(self._wake, using=self.alias)
        else:
            self._wake()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until no row of this app is left (queued, delayed or running); polls every 20 ms."""
        deadline = timezone.now() + timedelta(seconds=timeout)
        while self._rows().exists():
            if timezone.now() >= deadline:
                return False
            with self._cond:
                self._cond.wait(0.02)
        return True

    def depth(self, full_channel: str) -> int:
        """Messages of ``full_channel`` waiting (not leased), delayed ones included."""
        channel = self._channels[full_channel].subscription.channel
        now = timezone.now()
        return self._rows().filter(channel=channel).filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now)).count()

    def channel_stats(self, full_channel: str) -> ChannelStats:
        """Waiting rows (delayed ones included) and the age of the oldest since it was written (a retry is a new
        row); consumers are unknown (every process of the project may consume)."""
        channel = self._channels[full_channel].subscription.channel
        now = timezone.now()
        waiting = self._rows().filter(channel=channel).filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now))
        found = waiting.aggregate(n=Count("id"), first=Min("created"))
        first = found["first"]
        return ChannelStats(found["n"], None if first is None else max((now - first).total_seconds(), 0.0))

    # --- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._started:
                return
            self._started, self._stopping = True, False
            self._stopped.clear()
            for channel in self._channels.values():
                self._spawn(channel)
            self._renewer = threading.Thread(target=self._renew_leases, name="queue-db-leases", daemon=True)
            self._renewer.start()

    def stop(self) -> None:
        """Stop the workers once their current message is settled; queued messages stay in the table."""
        with self._cond:
            if not self._started:
                return
            self._stopping = True
            self._stopped.set()
            self._cond.notify_all()
            threads = [thread for channel in self._channels.values() for thread in channel.threads]
            if self._renewer is not None:
                threads.append(self._renewer)
        for thread in threads:
            thread.join(self.stop_timeout)
            if thread.is_alive():
                logger.error("queue worker %s did not stop within %s s", thread.name, self.stop_timeout)
        with self._cond:
            for channel in self._channels.values():
                channel.threads = [thread for thread in channel.threads if thread.is_alive()]
            self._started = False

    def after_fork(self) -> None:
        # The parent's threads are gone; its leases are the parent's (they expire if it is gone too).
        self._reset()
        for channel in self._channels.values():
            channel.threads = []

    def consuming(self) -> bool:
        return self._started

    # --- workers ----------------------------------------------------------------------------------------------
    def _spawn(self, channel: _Channel) -> None:
        if not self.manager.consumes(channel.subscription.channel):
            return  # routed elsewhere (NOCLUSTER_WORKER_CHANNELS)
        alive = [thread for thread in channel.threads if thread.is_alive()]
        for index in range(len(alive), channel.subscription.concurrency):
            thread = threading.Thread(
                target=self._work, args=(channel,), name=f"queue-{channel.full_name}-{index}", daemon=True
            )
            alive.append(thread)
            thread.start()
        channel.threads = alive

    def _work(self, channel: _Channel) -> None:
        try:
            while not self._stopping:
                taken = self._next(channel)
                if taken is None:
                    with self._cond:
                        if not self._stopping:
                            self._cond.wait(self.poll_interval)
                    continue
                try:
                    self._run(channel, *taken)
                finally:
                    with self._cond:
                        channel.in_flight -= 1
        finally:
            close_old_connections()
            connections.close_all()

    def _next(self, channel: _Channel) -> tuple[int, Message] | None:
        """A leased message once this node is idle for the channel and below its concurrency, else None."""
        with self._cond:
            if channel.in_flight >= channel.subscription.concurrency:
                return None  # subscribed again with a lower concurrency: the extra threads wait
            channel.in_flight += 1
        taken = None
        try:
            if self._is_idle(channel):
                taken = self._take(channel.subscription.channel)
        except Exception:
            logger.exception("queue %s: could not take a message", channel.full_name)
        if taken is None:
            with self._cond:
                channel.in_flight -= 1
        return taken

    def _take(self, channel: str) -> tuple[int, Message] | None:
        """Lease the next due message of ``channel``; None when there is none (or another node was faster)."""
        now = timezone.now()
        free = Q(lease_until__isnull=True) | Q(lease_until__lt=now)
        candidates = list(self._rows().filter(free, channel=channel, due__lte=now).values_list("pk", "lease_until")[:5])
        for pk, lease_until in candidates:
            claimed = (
                self._rows().filter(pk=pk, lease_until=lease_until)
                if lease_until
                else self._rows().filter(pk=pk, lease_until__isnull=True)
            )
            owner = self.manager.identity.instance_id
            if claimed.update(lease_owner=owner, lease_until=now + timedelta(seconds=self.lease)):
                with self._cond:
                    self._running.add(pk)
                return pk, self._message(pk)
        return None

    def _message(self, pk: int) -> Message:
        row = self._rows().get(pk=pk)
        try:
            return Message.from_wire(row.body)
        except MalformedMessage:
            self._rows().filter(pk=pk).delete()
            raise

    def _run(self, channel: _Channel, pk: int, message: Message) -> None:
        node = self.manager.identity.instance_id
        try:
            if self._rate_limited(channel, pk, message):
                return
            outcome = self.manager.execute(channel.subscription, message, self.grace)
            with transaction.atomic(using=self.alias):
                # The retry or failed record and the deletion of this try commit together.
                self.manager.settle(message, outcome, node)
                self._rows().filter(pk=pk, lease_owner=node).delete()
        except Exception:
            # Not settled (the database refused the failed record, say): the row keeps its lease, which expires,
            # and the message runs again then (no loop faster than the lease).
            logger.exception("queue %s: message %s could not be settled", channel.full_name, message.id)
        finally:
            with self._cond:
                self._running.discard(pk)
            close_old_connections()

    def _rate_limited(self, channel: _Channel, pk: int, message: Message) -> bool:
        """Wait for the channel's rate limit; when its slot is far, give the row back, due later (True)."""
        delay = self.manager.rate_slot(channel.subscription, message, self.rate_hold, self.longest_defer)
        if not delay:
            return False
        due = timezone.now() + timedelta(seconds=delay)
        owner = self.manager.identity.instance_id
        self._rows().filter(pk=pk, lease_owner=owner).update(due=due, lease_owner="", lease_until=None)
        return True

    def _renew_leases(self) -> None:
        while not self._stopped.wait(self.lease / 3):
            with self._cond:
                running = sorted(self._running)
            if not running:
                continue
            try:
                until = timezone.now() + timedelta(seconds=self.lease)
                self._rows().filter(pk__in=running, lease_owner=self.manager.identity.instance_id).update(
                    lease_until=until
                )
            except Exception:
                logger.exception("queue: could not renew the leases of %d running messages", len(running))
            finally:
                close_old_connections()

    def _is_idle(self, channel: _Channel) -> bool:
        """``idle()`` of the subscription; a paused channel is never idle (its messages stay queued)."""
        if self.manager.is_paused(channel.subscription.channel):
            return False
        try:
            return channel.subscription.is_idle()
        except Exception:
            logger.exception("queue %s: idle() raised; treating this node as busy", channel.full_name)
            return False
