"""Publishing event-queue messages as ordinary Celery task messages, for a fraction of ``apply_async``'s cost.

``apply_async`` routes each call, sends two signals, and on Redis builds two redis-py clients (one to look up the
exchange's bindings, one for the ``LPUSH``; building a client costs more than the command, redis/redis-py#3624).
Here, for every message the same Celery message as ``apply_async`` would send (``celery.app.amqp.as_task_v2``,
protocol 2, JSON) goes out on a producer kept between calls, through the default exchange with the channel's queue
as routing key (AMQP's default exchange, and kombu's anonymous exchange on Redis, deliver to the queue of that
name: no binding lookup), and on Redis through a channel that keeps its one client. A stock Celery worker runs
these messages as it runs ``apply_async``'s.

:meth:`CeleryPublisher.publish` sends a batch: on Redis in one pipeline (kombu's ``Producer.batch``), on RabbitMQ
one publish after another, each confirmed.
"""

from __future__ import annotations

import contextlib
import os
import queue as stdlib_queue
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from kombu import Connection, Producer, Queue
from kombu.transport import redis as kombu_redis

from nocluster.queue.backends.celery_worker import TASK_NAME
from nocluster.queue.message import Message

# How often a publish is tried again on a connection error, as apply_async's default retry policy.
RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
# Producers (each with its connection) kept for reuse between calls; more may exist while that many threads publish.
IDLE_PRODUCERS = 10


class OneClientChannel(kombu_redis.Channel):
    """kombu's Redis channel, sending through one redis-py client instead of building one per command."""

    _kept_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        if self._kept_client is None:
            self._kept_client = self._create_client()
        yield self._kept_client

    def _after_fork(self) -> None:
        self._kept_client = None
        super()._after_fork()


class OneClientTransport(kombu_redis.Transport):
    Channel = OneClientChannel


@dataclass
class KeptProducer:
    """A producer kept between calls: its process (not shared over fork), connection and declared queues."""

    pid: int
    connection: Connection
    producer: Producer
    declared: set[Queue] = field(default_factory=set)


@dataclass
class Outgoing:
    """One message to send: the event-queue message, its channel's queue and its delay in seconds."""

    queue: Queue
    message: Message
    delay: float = 0.0


class CeleryPublisher:
    """Sends event-queue messages of one Celery app (the backend's) with kept producers.

    Parameters:
      celery_app: the backend's Celery app (its broker URL, transport options and SSL settings).
      redis: whether the broker is Redis (a channel that keeps its client; batches in one pipeline).
      limits: returns ``(soft, hard)`` time limits in seconds for a message.
    """

    def __init__(self, celery_app: Celery, redis: bool, limits: Callable[[Message], tuple[float, float]]) -> None:
        self.celery_app = celery_app
        self.redis = redis
        self.limits = limits
        self._idle: stdlib_queue.LifoQueue[KeptProducer] = stdlib_queue.LifoQueue()

    def publish(self, batch: Sequence[Outgoing]) -> None:
        """Send ``batch`` in order; returns once the broker has every message (raises if it may not).

        On Redis a batch is one pipeline, sent once every message is in it: a connection error then fails the
        whole batch (kombu's ``BatchPublishError``: delivery uncertain), it is not retried message by message.
        """
        with self._producer() as kept:
            self._declare(kept, {outgoing.queue for outgoing in batch})
            if self.redis and len(batch) > 1:
                with kept.producer.batch(max_size=len(batch) * 2):
                    for outgoing in batch:
                        self._send(kept.producer, outgoing, retry=False)
            else:
                for outgoing in batch:
                    self._send(kept.producer, outgoing, retry=True)

    @staticmethod
    def _declare(kept: KeptProducer, queues: set[Queue]) -> None:
        """Declare each queue once per kept connection (a worker consuming it declares it too)."""
        for queue in queues - kept.declared:
            kept.producer.maybe_declare(queue, retry=True, **RETRY_POLICY)
            kept.declared.add(queue)

    def _send(self, producer: Producer, outgoing: Outgoing, retry: bool) -> None:
        message = outgoing.message
        soft, hard = self.limits(message)
        task = self.celery_app.amqp.as_task_v2(
            str(uuid.uuid4()), TASK_NAME, args=(message.to_wire(),), kwargs={},
            countdown=outgoing.delay if outgoing.delay > 0 else None, soft_time_limit=soft, time_limit=hard,
            ignore_result=True,
            # What logs and events show; also spares Celery a saferepr of the whole payload.
            argsrepr=f"({message.channel!r}, id={message.id!r}, retried={message.retried})", kwargsrepr="{}",
        )  # fmt: skip
        producer.publish(
            task.body, exchange="", routing_key=outgoing.queue.name, headers=task.headers, serializer="json",
            retry=retry, retry_policy=RETRY_POLICY, **task.properties,
        )  # fmt: skip

    @contextmanager
    def _producer(self) -> Iterator[KeptProducer]:
        """A producer of this process (kept between calls); one that failed is closed, not kept."""
        kept = self._acquire()
        try:
            yield kept
        except BaseException:
            with contextlib.suppress(Exception):
                kept.connection.release()
            raise
        if self._idle.qsize() < IDLE_PRODUCERS:
            self._idle.put(kept)
        else:
            kept.connection.release()

    def _acquire(self) -> KeptProducer:
        while True:
            try:
                kept = self._idle.get_nowait()
            except stdlib_queue.Empty:
                break
            if kept.pid == os.getpid():
                return kept
            # Inherited over fork: its socket is the parent's, so it is dropped, never used or closed here.
        transport = OneClientTransport if self.redis else None
        connection = self.celery_app.connection_for_write(transport=transport)
        return KeptProducer(os.getpid(), connection, Producer(connection))

    def close(self) -> None:
        """Close the kept producers' connections (those of this process)."""
        while True:
            try:
                kept = self._idle.get_nowait()
            except stdlib_queue.Empty:
                return
            if kept.pid == os.getpid():
                with contextlib.suppress(Exception):
                    kept.connection.release()
