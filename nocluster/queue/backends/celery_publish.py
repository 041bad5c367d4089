"""Publishing event-queue messages as ordinary Celery task messages, for a fraction of ``apply_async``'s cost.

``apply_async`` routes each call, sends two signals, and on Redis builds two redis-py clients (one to look up the
exchange's bindings, one for the ``LPUSH``; building a client costs more than the command, redis/redis-py#3624).
Here, for every message the same Celery message as ``apply_async`` would send (``celery.app.amqp.as_task_v2``,
protocol 2, JSON) goes out on a producer kept between calls, through the default exchange with the channel's queue
as routing key (AMQP's default exchange, and kombu's anonymous exchange on Redis, deliver to the queue of that
name: no binding lookup), and on Redis through a channel that keeps its one client
(:mod:`~nocluster.queue.backends.redis_transport`). A stock Celery worker runs these messages as it runs
``apply_async``'s.

:meth:`CeleryPublisher.publish` sends a batch: on Redis in one round trip, on RabbitMQ on a channel in confirm mode
with one wait for all the confirms. On Redis, one message or many are written here rather than through kombu's
``Producer.publish``, which for each message serialises, wraps and routes through four layers (half of a batch's
time, a tenth of a single publish's): each message is the JSON envelope kombu's Redis channel writes
(:func:`redis_envelope`), and one ``LPUSH`` per queue carries the queue's messages in order. A single message is
tried again after a connection error as kombu's ``Producer.publish(retry=True)`` would (the redis-py client kombu
builds does not retry: its pool gives it no retries).
"""

from __future__ import annotations

import contextlib
import os
import queue as stdlib_queue
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import amqp
from amqp.exceptions import MessageNacked
from celery import Celery
from kombu import Connection, Producer, Queue
from kombu.entity import PERSISTENT_DELIVERY_MODE
from kombu.serialization import dumps
from kombu.utils.json import dumps as json_dumps
from redis import exceptions as redis_exceptions

from nocluster.queue.backends.celery_worker import TASK_NAME
from nocluster.queue.backends.redis_transport import one_client_transport
from nocluster.queue.message import Message

# How often a publish is tried again on a connection error, as apply_async's default retry policy.
RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
# What a broken Redis connection raises (what kombu's Redis transport counts as a connection error, but KeyError).
REDIS_CONNECTION_ERRORS = (OSError, redis_exceptions.ConnectionError, redis_exceptions.TimeoutError)
# Producers (each with its connection) kept for reuse between calls; more may exist while that many threads publish.
IDLE_PRODUCERS = 10
# Seconds to wait for RabbitMQ to confirm a batch (a socket timeout after it: the batch is not known queued).
CONFIRM_TIMEOUT = 30.0


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

        On Redis one message alone is tried again after a connection error, on another connection, as kombu's
        retry policy would (3 more tries, 0 to 0.2 s apart; a try whose command reached Redis before the error may queue
        it twice). A batch is one round trip, sent once every message is ready: a connection error fails the whole
        batch (delivery uncertain), it is not tried again.
        """
        tries = 1 + int(RETRY_POLICY["max_retries"]) if self.redis and len(batch) == 1 else 1
        for attempt in range(tries):
            try:
                self._publish_once(batch)
                return
            except REDIS_CONNECTION_ERRORS:
                if attempt + 1 == tries:
                    raise
                time.sleep(min(RETRY_POLICY["interval_start"] + attempt * RETRY_POLICY["interval_step"],
                               RETRY_POLICY["interval_max"]))  # fmt: skip

    def _publish_once(self, batch: Sequence[Outgoing]) -> None:
        with self._producer() as kept:
            self._declare(kept, {outgoing.queue for outgoing in batch})
            if self.redis and (len(batch) == 1 or kept.producer.channel.supports_batch_publish):
                self._push_to_redis(kept, batch)
            elif self.redis:  # retry_on_timeout: redis-py would replay a whole pipeline, so one by one (as kombu)
                for outgoing in batch:
                    self._send(kept.producer, outgoing, retry=True)
            elif len(batch) == 1:
                self._send(kept.producer, batch[0], retry=True)
            elif kept.connection.transport.driver_type == "amqp":
                self._send_confirmed(kept.connection, batch)
            else:  # another kombu transport: one publish after another
                for outgoing in batch:
                    self._send(kept.producer, outgoing, retry=True)

    @staticmethod
    def _declare(kept: KeptProducer, queues: set[Queue]) -> None:
        """Declare each queue once per kept connection (a worker consuming it declares it too)."""
        for queue in queues - kept.declared:
            kept.producer.maybe_declare(queue, retry=True, **RETRY_POLICY)
            kept.declared.add(queue)

    def _send(self, producer: Producer, outgoing: Outgoing, retry: bool) -> None:
        task = self._task_message(outgoing)
        producer.publish(
            task.body, exchange="", routing_key=outgoing.queue.name, headers=task.headers, serializer="json",
            retry=retry, retry_policy=RETRY_POLICY, **task.properties,
        )  # fmt: skip

    def _push_to_redis(self, kept: KeptProducer, batch: Sequence[Outgoing]) -> None:
        """Redis: one ``LPUSH`` per queue with that queue's messages in order (Redis pushes them one after the other
        to the head and a worker pops from the tail, so the first published runs first), in one round trip, through
        the channel's kept client (which adds the ``global_keyprefix``). kombu's Redis channel writes a message of
        priority 0 to the key named after its queue, as here; a queue declared with ``x-expires`` (none of ours)
        would also need kombu's ``PEXPIRE``."""
        channel = kept.producer.channel
        pushes: dict[str, list[str]] = {}
        for outgoing in batch:
            envelope = redis_envelope(self._task_message(outgoing), outgoing, channel)
            pushes.setdefault(outgoing.queue.name, []).append(envelope)
        with channel.conn_or_acquire() as client:
            if len(pushes) == 1:
                [(key, messages)] = pushes.items()
                client.lpush(key, *messages)
                return
            with client.pipeline(transaction=False) as pipe:
                for key, messages in pushes.items():
                    pipe.lpush(key, *messages)
                pipe.execute()

    def _send_confirmed(self, connection: Connection, batch: Sequence[Outgoing]) -> None:
        """RabbitMQ: publish the batch on a channel of its own in confirm mode, then wait once for every confirm
        (py-amqp's confirm mode waits after each message). A fresh channel numbers its messages from 1."""
        channel = self._confirm_channel(connection)
        confirms = Confirms(channel)
        for outgoing in batch:
            task = self._task_message(outgoing)
            content_type, encoding, body = dumps(task.body, serializer="json")
            properties = {"delivery_mode": PERSISTENT_DELIVERY_MODE, **task.properties}
            message = channel.prepare_message(body, 0, content_type, encoding, task.headers, properties)
            amqp.Channel._basic_publish(channel, message, exchange="", routing_key=outgoing.queue.name)
            confirms.sent += 1
        confirms.wait()
        # Closed only after success: on an error the caller drops the whole connection without a handshake (a
        # blocked connection would never answer a channel close).
        channel.close()

    @staticmethod
    def _confirm_channel(connection: Connection) -> Any:
        """A fresh channel in confirm mode. A kept connection that went stale while idle (no heartbeats on a
        publisher) fails here, before anything was sent, so it is replaced and tried once more."""
        for attempt in (1, 2):
            try:
                channel: Any = connection.channel()
                channel.confirm_select()
                return channel
            except connection.connection_errors:
                if attempt == 2:
                    raise
                connection.collect()
                connection.ensure_connection(**RETRY_POLICY)
        raise AssertionError("unreachable")

    def _task_message(self, outgoing: Outgoing) -> Any:
        message = outgoing.message
        soft, hard = self.limits(message)
        return self.celery_app.amqp.as_task_v2(
            str(uuid.uuid4()), TASK_NAME, args=(message.to_wire(),), kwargs={},
            countdown=outgoing.delay if outgoing.delay > 0 else None, soft_time_limit=soft, time_limit=hard,
            ignore_result=True,
            # What logs and events show; also spares Celery a saferepr of the whole payload.
            argsrepr=f"({message.channel!r}, id={message.id!r}, retried={message.retried})", kwargsrepr="{}",
        )  # fmt: skip

    @contextmanager
    def _producer(self) -> Iterator[KeptProducer]:
        """A producer of this process (kept between calls); one that failed is closed, not kept."""
        kept = self._acquire()
        try:
            yield kept
        except BaseException:
            # Dropped without a closing handshake, which a broken or blocked connection may never answer.
            with contextlib.suppress(Exception):
                kept.connection.collect()
            raise
        if self._idle.qsize() < IDLE_PRODUCERS:
            self._idle.put(kept)
        else:
            kept.connection.release()

    def _take_kept(self) -> KeptProducer | None:
        """A kept producer of this process, or None. One inherited over fork is dropped, never used or closed
        here: its socket is the parent's."""
        while True:
            try:
                kept = self._idle.get_nowait()
            except stdlib_queue.Empty:
                return None
            if kept.pid == os.getpid():
                return kept

    def _acquire(self) -> KeptProducer:
        kept = self._take_kept()
        if kept is not None:
            return kept
        transport = one_client_transport(self.celery_app.conf.broker_url)
        connection = self.celery_app.connection_for_write(transport=transport)
        try:
            # Connect within the publish retry policy: left to itself, the first use of a new connection retries
            # with the transport's own defaults (about 6 s on Redis) before a publish can fail.
            connection.ensure_connection(**RETRY_POLICY)
            return KeptProducer(os.getpid(), connection, Producer(connection))
        except BaseException:
            with contextlib.suppress(Exception):
                connection.release()
            raise

    def close(self) -> None:
        """Close the kept producers' connections (those of this process)."""
        while (kept := self._take_kept()) is not None:
            with contextlib.suppress(Exception):
                kept.connection.release()


def redis_envelope(task: Any, outgoing: Outgoing, channel: Any) -> str:
    """The text kombu's Redis ``channel`` stores for ``task`` (a Celery task message) sent to ``outgoing.queue``
    through the default exchange: kombu's JSON of the body, encoded as the channel encodes bodies (base64 unless
    the ``body_encoding`` transport option says otherwise), inside kombu's JSON envelope with the properties
    ``Producer.publish`` adds (persistent, priority 0) and a delivery tag of its own. A stock Celery worker reads
    it as it reads ``apply_async``'s (``tests/queue/test_publish.py`` compares the two)."""
    body, body_encoding = channel.encode_body(json_dumps(task.body), channel.body_encoding)
    return json_dumps({
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": task.headers,
        "properties": {
            **task.properties,
            "delivery_mode": PERSISTENT_DELIVERY_MODE,
            "delivery_info": {"exchange": "", "routing_key": outgoing.queue.name},
            "priority": 0,
            "body_encoding": body_encoding,
            "delivery_tag": str(uuid.uuid4()),
        },
    })  # fmt: skip


class Confirms:
    """The confirms of a fresh channel in confirm mode (its messages are numbered from 1), counted by the
    channel's ``basic_ack``/``basic_nack`` listeners rather than by the frame a wait returns: py-amqp also reads
    the socket before each publish (to notice a ``connection.blocked``), and what it reads then reaches only the
    listeners."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.sent = 0
        self.confirmed: set[int] = set()
        self.highest_multiple = 0
        self.refused: list[int] = []
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self.highest_multiple = max(self.highest_multiple, delivery_tag)
        else:
            self.confirmed.add(delivery_tag)

    def _on_nack(self, delivery_tag: int, multiple: bool, *rest: Any) -> None:
        self.refused.append(delivery_tag)
        self._on_ack(delivery_tag, multiple)

    def _all_in(self) -> bool:
        return all(tag <= self.highest_multiple or tag in self.confirmed for tag in range(1, self.sent + 1))

    def wait(self, timeout: float = CONFIRM_TIMEOUT) -> None:
        """Return once RabbitMQ confirmed every message sent; raise MessageNacked if it refused one, or a timeout."""
        deadline = time.monotonic() + timeout
        while not self._all_in():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"RabbitMQ did not confirm a batch of {self.sent} within {timeout} s")
            self.channel.connection.drain_events(timeout=remaining)
        if self.refused:
            raise MessageNacked(f"RabbitMQ refused {len(self.refused)} of a batch of {self.sent} messages")
