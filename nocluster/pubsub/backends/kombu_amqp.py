"""The RabbitMQ topology of the kombu pub/sub backend (``amqp://``): one queue per instance, at least once.

The instance has one queue, ``{app.name}.pubsub.{instance_id}``, bound to the fanout exchange of every channel it
subscribes to. It is not auto-deleted: it outlives a dropped connection for ``queue_expires`` seconds, so a
reconnecting node gets the backlog; ``max_length`` bounds what a stalled node can pile up (the oldest messages go
first). Binding is synchronous (``queue.bind`` returns once RabbitMQ applied it).

Ours, for throughput: messages are acknowledged after dispatch, in batches (every ``ACK_EVERY`` messages or
``ACK_DELAY`` seconds, ``multiple=True``), with up to ``PREFETCH`` pushed ahead. What was in flight when a
connection died comes again; the manager drops redelivered ids. The publisher connection uses publisher
confirms, so ``publish`` returns once RabbitMQ has the message. Liveness: AMQP heartbeats, checked once a
second as ``ConsumerMixin`` does when idle, never per message.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from kombu import Queue, binding

from nocluster.pubsub.backends.kombu_topology import Consuming, KombuPubSubTopology, TopologyConfig

if TYPE_CHECKING:
    from kombu.message import Message

# Unacknowledged messages the broker may push ahead to this node, and how acknowledgements are batched
# (a redelivery after a dropped connection is dropped by the manager's recent-id check).
PREFETCH = 1000
ACK_EVERY = 100
ACK_DELAY = 0.2  # seconds


class AmqpPubSubTopology(KombuPubSubTopology):
    """RabbitMQ: one queue per instance bound to every subscribed exchange; batched acknowledgements."""

    driver_types = ("amqp",)
    no_ack = False
    prefetch_count = PREFETCH

    def __init__(self, config: TopologyConfig) -> None:
        super().__init__(config)
        self._unacked: Message | None = None  # the latest delivered message not yet acknowledged
        self._unacked_count = 0
        self._unacked_since = 0.0
        self._last_heartbeat_check = 0.0

    @classmethod
    def connection_options(
        cls, *, consumer: bool, heartbeat: float, transport_options: dict[str, Any]
    ) -> dict[str, Any]:
        options = dict(transport_options)
        if not consumer:
            options.setdefault("confirm_publish", True)  # publish returns once RabbitMQ has the message
        # Only the consumer checks heartbeats; the publisher's connection is idle between publishes.
        return {"heartbeat": heartbeat if consumer else 0, "transport_options": options}

    def queues(self, channels: set[str]) -> list[Queue]:
        return [
            Queue(
                self.config.queue_name(),
                bindings=[binding(self.config.exchange(full), routing_key="") for full in sorted(channels)],
                durable=False,
                auto_delete=False,
                expires=self.config.queue_expires,
                max_length=self.config.max_length,
            )
        ]

    def start(self, consuming: Consuming) -> bool:
        self._unacked, self._unacked_count = None, 0  # delivery tags of a dead channel mean nothing here
        return True

    def rebind(self, consuming: Consuming, added: set[str], removed: set[str], bound: bool) -> bool:
        channel = consuming.channel
        queue = Queue(self.config.queue_name(), channel=channel)
        for full in sorted(added):
            exchange = self.config.exchange(full)(channel)
            exchange.declare()
            queue.bind_to(exchange=exchange, routing_key="")  # synchronous: bound when it returns
        for full in sorted(removed):
            queue.unbind_from(exchange=self.config.exchange(full), routing_key="")
        return True

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
