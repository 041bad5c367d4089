"""CeleryQueueBackend: the event queue on Celery, RabbitMQ or Redis (``celery -A nocluster.celery worker``).

The backend owns its Celery app (:mod:`.celery_app`: every reliability setting, written once), its one task
``nocluster.queue.deliver`` and the worker's signal handlers (:mod:`.celery_worker`), and its limits (OPTIONS).
Each channel is its own durable Celery queue ``"{app.name}.{channel}"``, which workers consume for every
subscribed channel. Messages stay ordinary Celery messages (JSON, one positional argument). Here:

- timeout: ``context.signal`` fires at the timeout (a timer in the pool process); the Celery soft time limit
  (timeout + grace) raises ``SoftTimeLimitExceeded`` in work that ignored it, and the hard limit
  (timeout + 2 x grace) kills the pool process. Either way the try counts as failed: retried or recorded.
- concurrency: a per-node file-lock semaphore (:mod:`nocluster.queue.slots`); a node whose slots are full, or
  whose ``idle()`` says False, publishes the message again after ``defer_delay`` seconds and acks this copy,
  without counting a retry.
- rate limits: holding a concurrency slot, the pool process waits in place for a booked slot up to ``rate_hold``
  seconds (``min(1, grace / 2)``, so the wait never eats the time limits' grace), or puts the message aside until
  its slot is near, at most ``longest_defer`` seconds at a time (:mod:`..rates.gate`).
- delays (``publish(delay=)``, retries' backoff, put-asides over a rate limit): one longer than ``park_after``
  (2 s) waits in the database and is sent with a countdown of at most 1 s, by a thread of every worker's main
  process (:mod:`..parking`); a shorter one is a Celery countdown.
- routing: a worker consumes the channels its ``--channels`` option (or ``NOCLUSTER_WORKER_CHANNELS``) names, or
  every subscribed one (:mod:`.celery_worker`).
- a pool process killed mid-task (SIGKILL, OOM, ``os._exit``): Celery runs the message again
  (``task_retry_on_worker_lost``), ``max_deliveries`` times in all, then it is recorded as failed. A whole worker
  killed: the broker delivers it again (RabbitMQ at once; on Redis a live worker puts it back about
  ``gone_after`` + ``heartbeat`` seconds later, :mod:`.gone_workers`, the visibility timeout being the last
  resort); a message whose worker died ``max_deliveries`` times is recorded as failed instead of run once more.
  No poison loop either way.
- a try whose failed record cannot be written (the database is down) is kept: the message goes back to the
  broker with a growing delay (up to ``retry_backoff_max``) and only its settling is tried again.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.exceptions import Reject
from django.db import transaction
from django.db.models import F
from kombu import Exchange, Queue

from nocluster.durations import count, seconds
from nocluster.errors import PublishError, UnknownChannel
from nocluster.queue.backend import QueueBackend
from nocluster.queue.backends import celery_worker
from nocluster.queue.backends.celery_app import QueueLimits, build_celery_app, is_redis, longest_delay
from nocluster.queue.backends.celery_publish import CeleryPublisher, Outgoing
from nocluster.queue.backends.celery_stats import amqp_stats, redis_stats
from nocluster.queue.backends.gone_workers import (
    GoneWorkers,
    Liveness,
    held_deliveries,
    plain_client,
    worker_transport_options,
)
from nocluster.queue.control import PAUSE_REFRESH
from nocluster.queue.message import Message, Subscription
from nocluster.queue.parking import LEAD
from nocluster.queue.slots import node_slot
from nocluster.queue.stats import ChannelStats

if TYPE_CHECKING:
    from nocluster.models import Redelivery

logger = logging.getLogger("nocluster.queue.celery")

TASK_NAME = celery_worker.TASK_NAME
# Seconds: a message to be sent later than this waits in the database until LEAD seconds before it is due
# (a worker holds a countdown message unacked, and only a few: see nocluster.queue.parking).
PARK_AFTER = 2 * LEAD


def redelivery_model() -> type[Redelivery]:
    from nocluster.models import Redelivery  # this module loads before the app registry is ready

    return Redelivery


# One quick retry when channel_stats connects: the figures are for a scrape or a page, which must not hang.
STATS_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


class CeleryQueueBackend(QueueBackend):
    """Options (keyword-only; durations in seconds, see :class:`~.celery_app.QueueLimits`):
    broker_url: ``amqp://...`` (RabbitMQ) or ``redis://...``.
    max_timeout (300), grace (5), retry_backoff (1), retry_backoff_max (60), defer_delay (0.5).
    max_deliveries: how many times a message may make its whole worker die before it is recorded failed (5).
    queue_type: RabbitMQ only: ``"classic"`` (default, durable) or ``"quorum"`` (replicated over the RabbitMQ
      cluster's nodes, so a queue survives the loss of a minority of them). A queue keeps the type it was
      declared with: switching a running project means draining and deleting its queues first.
    heartbeat (5), gone_after (15): Redis only: a worker beats every ``heartbeat`` seconds, and one silent for
      ``gone_after`` is gone: a live worker puts the messages it held back on their queues (``NOCLUSTER["NODES"]``).
    transport_options: more kombu transport options (under the forced ones).
    """

    # Redis, in a worker's main process: its beat and the restore of gone workers' messages (set when it starts).
    gone_workers: GoneWorkers | None = None
    # Seconds between a worker's reads of the paused channels (it stops consuming a paused channel's queue).
    pause_refresh: float = PAUSE_REFRESH
    # A message to be sent later than this (seconds) waits in the database, not in a worker (queue.parking).
    park_after: float | None = PARK_AFTER
    # In a worker's processes (set by consume() before the pool forks): this process takes messages.
    worker = False

    def __init__(
        self,
        *,
        broker_url: str,
        max_timeout: float = 300.0,
        grace: float = 5.0,
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 60.0,
        defer_delay: float = 0.5,
        max_deliveries: int = 5,
        queue_type: str = "classic",
        heartbeat: float = 5.0,
        gone_after: float = 15.0,
        transport_options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(broker_url, str) or not broker_url:
            raise ValueError('CeleryQueueBackend needs a broker_url (NOCLUSTER["EVENT_QUEUE"]["OPTIONS"])')
        self.broker_url = broker_url
        self.publish_waits = not is_redis(broker_url)  # RabbitMQ: a publisher confirm per message
        self.limits = QueueLimits.checked(
            max_timeout=max_timeout, grace=grace, retry_backoff=retry_backoff,
            retry_backoff_max=retry_backoff_max, defer_delay=defer_delay,
        )  # fmt: skip
        self.max_timeout, self.grace = self.limits.max_timeout, self.limits.grace
        self.retry_backoff, self.retry_backoff_max = self.limits.retry_backoff, self.limits.retry_backoff_max
        self.defer_delay = self.limits.defer_delay
        # A message waits out its countdown in a worker that holds it unacked: on Redis the visibility timeout
        # must cover the longest one, so a longer delay travels in hops of at most this.
        self.longest_delay = longest_delay(self.limits)
        self.rate_hold, self.longest_defer = min(1.0, self.grace / 2), longest_delay(self.limits)
        self.max_deliveries = count(max_deliveries, "CeleryQueueBackend option max_deliveries", least=1)
        self.queue_type = checked_queue_type(queue_type, broker_url)
        self.liveness = checked_liveness(heartbeat, gone_after)
        self.transport_options = dict(transport_options or {})

    @cached_property
    def celery_app(self) -> Celery:
        """This backend's Celery app (built on first use; the worker command takes it from here)."""
        celery_app = build_celery_app(self.broker_url, self.manager.identity.name, self.limits, self.transport_options)
        celery_worker.install(self, celery_app)
        return celery_app

    @cached_property
    def task(self) -> Task:
        return self.celery_app.tasks[TASK_NAME]

    @cached_property
    def publisher(self) -> CeleryPublisher:
        """Sends this backend's messages as Celery messages, with kept producers (:mod:`.celery_publish`)."""
        return CeleryPublisher(self.celery_app, is_redis(self.broker_url), self.time_limits)

    def time_limits(self, message: Message) -> tuple[float, float]:
        """Celery's soft and hard time limits of ``message``: timeout + grace, timeout + 2 x grace."""
        return message.timeout + self.grace, message.timeout + 2 * self.grace

    # --- the contract -------------------------------------------------------------------------------------
    def register(self, full_channel: str, subscription: Subscription) -> None:
        """Nothing to do here: workers consume every subscribed channel when they start."""

    def publish(self, full_channel: str, message: Message, delay: float = 0.0) -> None:
        self.publisher.publish([Outgoing(celery_queue(full_channel, self.queue_type), message, delay)])

    def publish_many(self, full_channel: str, messages: Sequence[Message]) -> None:
        """On Redis in one pipeline; on RabbitMQ with one wait for all the confirms."""
        queue = celery_queue(full_channel, self.queue_type)
        self.publisher.publish([Outgoing(queue, message) for message in messages])

    def stop(self) -> None:
        if "publisher" in self.__dict__:
            self.publisher.close()

    def depth(self, full_channel: str) -> int:
        """Messages waiting in the channel's broker queue (not those a worker holds).

        Declares the queue as a worker would (durable, same arguments) and reads the count from the reply: a
        passive declare on kombu's Redis transport ignores ``global_keyprefix`` and reports every queue missing.
        """
        with self.celery_app.connection_for_read() as connection:
            declared = celery_queue(full_channel, self.queue_type)(connection.default_channel).queue_declare()
            return int(declared.message_count)

    def channel_stats(self, full_channel: str) -> ChannelStats:
        """Depth, oldest age (Redis) and consumers (RabbitMQ) of the channel's broker queue (:mod:`.celery_stats`).
        Raises at once (one quick retry) when the broker is unreachable: a scrape or the Cluster page does not wait
        out kombu's connection retries (about 6 s) for each channel."""
        return self.all_channel_stats([full_channel])[full_channel]

    def all_channel_stats(self, full_channels: Sequence[str]) -> dict[str, ChannelStats]:
        """Every channel's stats over one broker connection (on Redis in one round trip), not one per channel."""
        if not full_channels:
            return {}  # nothing to read: no connection either
        with self.celery_app.connection_for_read() as connection:
            connection.ensure_connection(**STATS_RETRY_POLICY)
            if is_redis(self.broker_url):
                return redis_stats(connection, full_channels)
            return {full_channel: amqp_stats(connection, full_channel) for full_channel in full_channels}

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until no message of this app is queued, delayed, held or running on any worker; True if so.

        A message moves from its queue to a worker in two steps, so "nothing anywhere" must hold for three polls
        in a row (50 ms apart), as Dramatiq's ``join(min_successes)``. Each poll declares every subscribed queue
        and reads its count; on Redis it reads the unacked hash (every message a worker holds: running, prefetched
        or waiting out its countdown); on RabbitMQ, which does not count what consumers hold, it asks every
        worker (remote control: active, reserved, scheduled), having found them with one ``ping`` (0.5 s).
        """
        deadline = time.monotonic() + timeout
        workers = None if is_redis(self.broker_url) else self._workers()
        quiet = 0
        while quiet < 3:
            quiet = 0 if self._busy(workers) else quiet + 1
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _workers(self) -> list[str]:
        replies = self.celery_app.control.ping(timeout=0.5) or []
        return [name for reply in replies for name in reply]

    def _busy(self, workers: list[str] | None) -> bool:
        if any(self.depth(self.manager.full_channel(channel)) for channel in self.manager.channels()):
            return True
        if workers is None:
            with self.celery_app.connection_for_read() as connection:
                return bool(held_deliveries(*plain_client(connection)))
        if not workers:
            return False
        inspect = self.celery_app.control.inspect(destination=workers, limit=len(workers), timeout=2.0)
        prefix = f"{self.manager.identity.name}."
        for held in (inspect.active(), inspect.reserved(), inspect.scheduled()):
            for tasks in (held or {}).values():
                for task in tasks:
                    info = task.get("request", task).get("delivery_info") or {}
                    if str(info.get("routing_key", "")).startswith(prefix):
                        return True
        return False

    def ping(self) -> None:
        with self.celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)

    def durability_warnings(self) -> list[str]:
        """On Redis: persistence off (``appendonly no``) loses the whole backlog on a crash or restart, and an
        eviction policy other than ``noeviction`` may drop queue and binding keys. RabbitMQ queues are durable."""
        if not is_redis(self.broker_url):
            return []
        with self.celery_app.connection_for_read() as connection:
            client = connection.default_channel.client
            config = {**client.config_get("appendonly"), **client.config_get("maxmemory-policy")}
        warnings = []
        if config.get("appendonly") != "yes":
            warnings.append(
                "the event queue's Redis keeps nothing on disk (appendonly no): a Redis crash or restart loses every "
                "queued message; set appendonly yes"
            )
        if config.get("maxmemory-policy", "noeviction") != "noeviction":
            warnings.append(
                f"the event queue's Redis evicts keys (maxmemory-policy {config['maxmemory-policy']}): queued messages "
                "can be dropped; set maxmemory-policy noeviction"
            )
        return warnings

    def queues(self) -> list[Queue]:
        """The Celery queues of the subscribed channels this node's routing allows (what a worker consumes)."""
        return [
            celery_queue(self.manager.full_channel(channel), self.queue_type)
            for channel in self.manager.channels()
            if self.manager.consumes(channel)
        ]

    def consume(self, channels: object) -> list[Queue]:
        """In a worker's main process (before its pool forks): consume ``channels`` (the ``--channels`` option;
        None: the setting's, or every subscribed one) and return their queues. Raises naming an unknown one."""
        self.manager.route(channels, f"celery worker --channels={channels}")
        self.worker = True
        return self.queues()

    def consuming(self) -> bool:
        return self.worker

    # --- in the worker ----------------------------------------------------------------------------------------
    def track_deliveries(self) -> GoneWorkers | None:
        """In a worker's main process, before it connects (Redis only): keep its deliveries in hashes of its own
        and return its :class:`~.gone_workers.GoneWorkers` (started once the worker is ready)."""
        if not is_redis(self.broker_url):
            return None
        instance_id = self.manager.identity.instance_id
        conf = self.celery_app.conf
        conf.broker_transport_options = {**conf.broker_transport_options, **worker_transport_options(instance_id)}
        self.gone_workers = GoneWorkers(
            lambda options: self.celery_app.connection_for_write(transport_options=options), instance_id,
            self.liveness,
        )  # fmt: skip
        self.gone_workers.register()
        return self.gone_workers

    def run(self, task: Task, message: Message) -> None:
        """Run one delivery in a pool process: idle and concurrency gates, then the try, then settle it."""
        node = str(task.request.hostname or f"{os.getpid()}@{socket.gethostname()}")
        full_channel = self.manager.full_channel(message.channel)
        if message.settle_error:
            self._settle(full_channel, message, message.settle_error, node)
            return
        if (task.request.delivery_info or {}).get("redelivered") and self._gave_up(message, node):
            return
        try:
            subscription = self.manager.subscription(message.channel)
        except UnknownChannel as exc:
            self._settle(full_channel, message, f"{exc} (on node {node})", node)
            return
        if not self._idle(subscription, full_channel):
            self.defer(full_channel, message)
            return
        with node_slot(self.manager.identity.name, node, message.channel, subscription.concurrency) as slot:
            if slot is None:
                self.defer(full_channel, message)
                return
            if self._rate_limited(full_channel, subscription, message):
                return
            try:
                outcome = self.manager.execute(subscription, message)
            except PublishError as exc:  # held back (delay, pause), but could not be queued again
                raise Reject(exc, requeue=True) from exc
        if outcome.status == "failed":
            self._settle(full_channel, message, outcome.error, node)
        else:
            self.manager.settle(message, outcome, node)

    def _settle(self, full_channel: str, message: Message, error: str, node: str) -> None:
        """Retry or record the failed try; if neither can be written, keep the message with a growing delay."""
        try:
            self.manager.fail_or_retry(message, error, node)
        except Exception as exc:
            held = message.held(error)
            delay = self.retry_delay(held.settle_attempts)
            logger.warning(
                "%s %s: failed try not settled (attempt %d: %s: %s); kept, settling again in %.1f s",
                full_channel, message.id, held.settle_attempts, type(exc).__name__, str(exc).splitlines()[0][:200],
                delay, extra={"channel": message.channel, "message_id": message.id},
            )  # fmt: skip
            try:
                self.publish(full_channel, held, delay=delay)
            except Exception as publish_error:
                raise Reject(publish_error, requeue=True) from publish_error  # the broker keeps this copy

    def _gave_up(self, message: Message, node: str) -> bool:
        """Count a delivery after a dead worker; at ``max_deliveries`` record the message failed instead of running
        it again. True when it was recorded. Database errors let it run (counting is best effort)."""
        try:
            deliveries = self._count_redelivery(message)
        except Exception:
            logger.warning("queue %s: could not count the redeliveries of %s", message.channel, message.id)
            return False
        if deliveries <= self.max_deliveries:
            return False
        reason = f"its worker died {deliveries - 1} times while it ran (max_deliveries {self.max_deliveries})"
        self.manager.fail(message, f"WorkerLostError: {reason}", node)
        return True

    def _count_redelivery(self, message: Message) -> int:
        model = redelivery_model()
        with transaction.atomic():
            row, created = model.objects.select_for_update().get_or_create(
                app_name=self.manager.identity.name, message_id=message.id, retried=message.retried,
                defaults={"deliveries": 2},
            )  # fmt: skip
            if not created:
                model.objects.filter(pk=row.pk).update(deliveries=F("deliveries") + 1)
                row.refresh_from_db()
        return int(row.deliveries)

    def _idle(self, subscription: Subscription, full_channel: str) -> bool:
        try:
            return subscription.is_idle()
        except Exception:
            logger.exception("queue %s: idle() raised; treating this node as busy", full_channel)
            return False

    def _rate_limited(self, full_channel: str, subscription: Subscription, message: Message) -> bool:
        """Wait for the channel's rate limit; when its slot is far, publish ``message`` again for then (True)."""
        delay = self.manager.rate_slot(subscription, message, self.rate_hold, self.longest_defer)
        if not delay:
            return False
        try:
            self.manager.send_later(full_channel, message, delay)  # parked in the database if far off
        except Exception as exc:
            raise Reject(exc, requeue=True) from exc  # the broker keeps this copy instead
        return True

    def defer(self, full_channel: str, message: Message) -> None:
        """Leave ``message`` for later or another node: publish it again after ``defer_delay`` s (no retry counted)."""
        try:
            self.publish(full_channel, message, delay=self.defer_delay)
        except Exception as exc:
            raise Reject(exc, requeue=True) from exc  # the broker keeps this copy instead
        self.manager.metrics.deferred(message.channel)


QUEUE_TYPES = ("classic", "quorum")


def checked_liveness(heartbeat: object, gone_after: object) -> Liveness:
    liveness = Liveness(
        seconds(heartbeat, "CeleryQueueBackend option heartbeat"),
        seconds(gone_after, "CeleryQueueBackend option gone_after"),
    )
    if liveness.heartbeat >= liveness.gone_after:
        raise ValueError(
            "CeleryQueueBackend needs heartbeat < gone_after (seconds), "
            f"got {liveness.heartbeat}, {liveness.gone_after}"
        )
    return liveness


def checked_queue_type(queue_type: object, broker_url: str) -> str:
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"CeleryQueueBackend option queue_type must be one of {QUEUE_TYPES}, got {queue_type!r}")
    if queue_type == "quorum" and is_redis(broker_url):
        raise ValueError("CeleryQueueBackend option queue_type 'quorum' needs RabbitMQ; the broker is Redis")
    return str(queue_type)


@lru_cache(maxsize=1024)
def celery_queue(full_channel: str, queue_type: str = "classic") -> Queue:
    """The durable queue of a channel, bound to a direct exchange of the same name (publisher and worker agree).

    A quorum queue is declared with ``x-queue-type: quorum``; Celery sees it and turns off global QoS, which
    quorum queues refuse.
    """
    arguments = {"x-queue-type": "quorum"} if queue_type == "quorum" else None
    exchange = Exchange(full_channel, type="direct")
    return Queue(full_channel, exchange, routing_key=full_channel, durable=True, queue_arguments=arguments)
