"""The RabbitMQ topology of the kombu pub/sub backend (``amqp://``): one queue per instance, at least once.

The instance has one queue, ``{app.name}.pubsub.{instance_id}``, bound to the fanout exchange of every channel it
subscribes to. It is not auto-deleted: it outlives a dropped connection for ``queue_expires`` seconds, so a
reconnecting node gets the backlog; ``max_length`` bounds what a stalled node can pile up (the oldest messages go
first). Binding is synchronous (``queue.bind`` returns once RabbitMQ applied it).

Across a broker restart (``durable=True``, the default): the exchanges and the instance's queue are durable and
messages persistent (delivery mode 2), so a message RabbitMQ confirmed is on disk in every subscribed node's queue
and is delivered after the restart. Transient ones (``durable=False``) are gone with the restart: until a node has
reconnected and bound its new queue, what is published, confirmed or not, reaches no queue.

Each exchange is declared on a channel of its own (:func:`declare_exchange`): an exchange that exists with other
settings, made non-durable by an older nocluster (``PRECONDITION_FAILED``, which closes only that channel), is
used as it is and named in one warning, rather than failing every publish and restarting the consumer.

Ours, for throughput: messages are acknowledged after dispatch, in batches (every ``ACK_EVERY`` messages or
``ACK_DELAY`` seconds, ``multiple=True``), with up to ``PREFETCH`` pushed ahead. What was in flight when a
connection died comes again; the manager drops redelivered ids. The publisher connection uses publisher
confirms, so ``publish`` returns once RabbitMQ has the message. Liveness: AMQP heartbeats, checked once a
second as ``ConsumerMixin`` does when idle, never per message.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from amqp.exceptions import PreconditionFailed
from kombu import Queue

from nocluster.pubsub.backends.kombu_topology import Consuming, KombuPubSubTopology, TopologyConfig

if TYPE_CHECKING:
    from kombu import Connection, Exchange
    from kombu.message import Message

logger = logging.getLogger("nocluster.pubsub.kombu")

# Unacknowledged messages the broker may push ahead to this node, and how acknowledgements are batched
# (a redelivery after a dropped connection is dropped by the manager's recent-id check).
PREFETCH = 1000
ACK_EVERY = 100
ACK_DELAY = 0.2  # seconds

# Exchanges found with other settings than ours, warned about once per process.
_mismatched: set[str] = set()
_mismatched_lock = threading.Lock()


def declare_exchange(connection: Connection, exchange: Exchange) -> None:
    """Declare ``exchange`` on a new channel of ``connection``, closed afterwards.

    RabbitMQ refuses to re-declare an exchange with other settings (``PRECONDITION_FAILED``, e.g. one made
    non-durable by an earlier nocluster or by ``durable=False``) and closes the channel it was asked on: here
    that is this throwaway channel, and the existing exchange is used as it is, named in one warning per process.
    A non-durable one loses its messages at the next broker restart, which also deletes it; the next declaration
    then makes it durable.
    """
    channel = connection.channel()
    try:
        exchange(channel).declare()
    except PreconditionFailed as exc:
        with _mismatched_lock:
            first = exchange.name not in _mismatched
            _mismatched.add(exchange.name)
        if first:
            logger.warning(
                "pub/sub exchange %r exists with other settings than this node's (durable=%s): %s. Using it as it "
                "is; if it is not durable, messages through it do not survive a broker restart until it is deleted "
                "(a broker restart deletes it) and declared again. Give every node the same OPTIONS durable.",
                exchange.name, exchange.durable, exc.reply_text,
            )  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            channel.close()


class AmqpPubSubTopology(KombuPubSubTopology):
    """RabbitMQ: one queue per instance bound to every subscribed exchange; batched acknowledgements."""

    driver_types = ("amqp",)
    persistent = True
    confirms = True
    no_ack = False
    prefetch_count = PREFETCH

    def __init__(self, config: TopologyConfig) -> None:
        super().__init__(config)
        self._unacked: Message | None = None  # the latest delivered message not yet acknowledged
        self._unacked_count = 0
        self._unacked_since = 0.0
        self._last_heartbeat_check = 0.0
        self._queue_channels: set[str] = set()  # bound by start(): the channels of the consumer's queue

    @classmethod
    def connection_options(
        cls, *, consumer: bool, heartbeat: float, transport_options: dict[str, Any]
    ) -> dict[str, Any]:
        options = dict(transport_options)
        if not consumer:
            options.setdefault("confirm_publish", True)  # publish returns once RabbitMQ has the message
        # Only the consumer checks heartbeats; the publisher's connection is idle between publishes.
        return {"heartbeat": heartbeat if consumer else 0, "transport_options": options}

    @classmethod
    def declare_exchange(cls, connection: Connection, exchange: Exchange) -> bool:
        declare_exchange(connection, exchange)
        return True

    def queues(self, channels: set[str]) -> list[Queue]:
        # Declared bare; start() binds it, each exchange declared apart (see declare_exchange).
        self._queue_channels = set(channels)
        return [
            Queue(
                self.config.queue_name(),
                durable=self.config.durable,
                auto_delete=False,
                expires=self.config.queue_expires,
                max_length=self.config.max_length,
            )
        ]

    def start(self, consuming: Consuming) -> bool:
        self._unacked, self._unacked_count = None, 0  # delivery tags of a dead channel mean nothing here
        self._bind(consuming, self._queue_channels)
        return True

    def rebind(self, consuming: Consuming, added: set[str], removed: set[str], bound: bool) -> bool:
        self._bind(consuming, added)
        queue = Queue(self.config.queue_name(), channel=consuming.channel)
        for full in sorted(removed):
            queue.unbind_from(exchange=self.config.exchange(full), routing_key="")
        return True

    def _bind(self, consuming: Consuming, channels: set[str]) -> None:
        queue = Queue(self.config.queue_name(), channel=consuming.channel)
        for full in sorted(channels):
            exchange = self.config.exchange(full)
            declare_exchange(consuming.connection, exchange)
            queue.bind_to(exchange=exchange, routing_key="")  # synchronous: bound when it returns

    def settle(self, message: Message) -> None:
        """Acknowledge in batches (``multiple=True``), every ACK_EVERY messages or ACK_DELAY seconds."""
        if self._unacked is None:
            self._unacked_since = time.monotonic()
        self._unacked = message
        self._unacked_count += 1
        if self._unacked_count >= ACK_EVERY:
            self._ack_now()

    def on_iteration(self, consuming: Consuming) -> None:
        now = time.monotonic()
        if self._unacked is not None and now - self._unacked_since >= ACK_DELAY:
            self._ack_now()
        if now - self._last_heartbeat_check >= 1.0:
            self._last_heartbeat_check = now
            consuming.connection.heartbeat_check()

    def _ack_now(self) -> None:
        message, self._unacked, self._unacked_count = self._unacked, None, 0
        if message is not None:
            message.ack(multiple=True)
