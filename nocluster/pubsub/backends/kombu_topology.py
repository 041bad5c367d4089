"""The contract between the generic kombu consumer and one broker's topology (one strategy per transport).

:class:`~nocluster.pubsub.backends.kombu_consumer.KombuConsumerThread` is the same loop on every broker: it
connects, builds one ``kombu.Consumer``, applies (un)subscriptions, decodes JSON and hands envelopes to the
listener. What differs per broker is written once per transport, behind :class:`KombuPubSubTopology`:

- which queues carry the instance's fanout exchanges, and how a channel is bound and unbound
  (``kombu_amqp``: one queue bound to every exchange; ``kombu_redis``: one virtual queue per channel);
- acknowledgements (batched on RabbitMQ, none on Redis) and liveness (AMQP heartbeats, or pings to ourselves);
- whether a binding holds when the call returns or only once a control message confirms it (Redis).

This module imports no transport, and the transports import nothing but it, so there is no import cycle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from kombu import Connection, Consumer, Exchange, Queue
    from kombu.message import Message


class StaleConnection(Exception):
    """The consumer connection stopped answering this node's liveness checks; the consumer reconnects."""


@dataclass(frozen=True)
class TopologyConfig:
    """What a topology needs from the backend, fixed for the life of one consumer thread.

    Parameters:
      namespace: the app name (queue names start with it).
      instance_id: this node; its queues are named after it.
      heartbeat: liveness interval, seconds (AMQP heartbeat, or the Redis ping interval).
      queue_expires: a queue outlives its consumer by this long, seconds.
      max_length: RabbitMQ: most messages kept for a slow node.
      exchange: the backend's fanout exchange of a full channel (shared with ``publish``).
      durable: RabbitMQ: the instance's queue is durable (it and its messages outlive a broker restart).
    """

    namespace: str
    instance_id: str
    heartbeat: float
    queue_expires: float
    max_length: int
    exchange: Callable[[str], Exchange]
    durable: bool = False

    def queue_name(self, full_channel: str | None = None) -> str:
        """``{app.name}.pubsub.{instance_id}``, with ``.{full_channel}`` for a per-channel queue."""
        base = f"{self.namespace}.pubsub.{self.instance_id}"
        return base if full_channel is None else f"{base}.{full_channel}"


@dataclass(frozen=True)
class Consuming:
    """The kombu objects of one consuming connection (built again on every reconnect)."""

    connection: Connection
    # kombu annotates its channels as the virtual transport's; pyamqp's are amqp.Channel, hence Any.
    channel: Any
    consumer: Consumer


class KombuPubSubTopology(ABC):
    """How one broker carries fanout exchanges to one instance. Built per consumer thread, used from it only.

    The backend picks the subclass once, from the URL's transport (``driver_types``); the consumer calls the
    methods below from its thread. A method returning False means "not bound yet": the consumer completes the
    pending (re)bind when :meth:`on_control` later returns True.
    """

    #: kombu ``Transport.driver_type`` values this topology serves.
    driver_types: ClassVar[tuple[str, ...]]
    #: The broker can keep exchanges, queues and messages across its own restart (the ``durable`` option applies).
    persistent: ClassVar[bool] = False
    # Its publisher waits for the broker's confirm of each message.
    confirms: ClassVar[bool] = False
    #: Consumer options: acknowledge messages (False) or not, and how many the broker may push ahead.
    no_ack: ClassVar[bool]
    prefetch_count: ClassVar[int | None] = None

    def __init__(self, config: TopologyConfig) -> None:
        self.config = config
        #: Full channels of the topology's own messages, consumed beside the subscriptions, never delivered.
        self.control_channels: frozenset[str] = frozenset()

    @classmethod
    @abstractmethod
    def connection_options(
        cls, *, consumer: bool, heartbeat: float, transport_options: dict[str, Any]
    ) -> dict[str, Any]:
        """Keyword arguments of ``kombu.Connection`` for the consumer (``consumer=True``) or publisher."""

    @classmethod
    def declare_exchange(cls, connection: Connection, exchange: Exchange) -> bool:
        """Declare ``exchange`` for the publisher on ``connection``; False (the default) leaves it to
        ``Producer.publish(declare=[exchange])``, True if this did it."""
        return False

    @abstractmethod
    def queues(self, channels: set[str]) -> list[Queue]:
        """The queues to consume ``channels`` (subscriptions and control channels) on a new connection."""

    @abstractmethod
    def start(self, consuming: Consuming) -> bool:
        """The consumer is consuming on a new connection; True if its bindings hold now."""

    @abstractmethod
    def rebind(self, consuming: Consuming, added: set[str], removed: set[str], bound: bool) -> bool:
        """Bind ``added`` and unbind ``removed`` full channels; True if applied when this returns.

        ``bound``: the connection's bindings were confirmed already (False while :meth:`start` is pending).
        """

    def on_control(self, data: Any) -> bool:
        """A message on one of :attr:`control_channels`; True if it confirms the pending bindings."""
        return False

    def settle(self, message: Message) -> None:  # noqa: B027 (optional: brokers without acks do nothing)
        """Called once per consumed message, after it was delivered or dropped."""

    @abstractmethod
    def on_iteration(self, consuming: Consuming) -> None:
        """Called between messages and at least every 0.2 s. Raises:
        StaleConnection: the connection is dead although the socket did not say so."""
