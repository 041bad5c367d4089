"""Pub/sub over kombu fanout exchanges, on RabbitMQ (``amqp://``) or Redis (``redis://``).

One fanout exchange per full channel (``"{app.name}.{channel}"``). Each instance consumes on one thread, the
generic :class:`~nocluster.pubsub.backends.kombu_consumer.KombuConsumerThread` (``kombu.mixins.ConsumerMixin``:
reconnect loop with backoff, drain with liveness checks), from its own queue(s). How the queues are laid out,
acknowledged and kept alive is one strategy per broker, picked once from the URL's transport:

- RabbitMQ, :mod:`~nocluster.pubsub.backends.kombu_amqp`: one queue per instance bound to every exchange it
  subscribes to, kept through a dropped connection; batched acknowledgements (at least once: the manager drops
  redelivered ids); publisher confirms; AMQP heartbeats; durable exchanges and queues and persistent messages
  (``durable``), so a confirmed message survives a broker restart.
- Redis, :mod:`~nocluster.pubsub.backends.kombu_redis`: one virtual queue per channel on one PSUBSCRIBE
  connection (at most once); subscriptions confirmed and liveness checked by pinging ourselves.

Either way the manager is told of every reconnect (``connection_revived``), which the sync messages turn into
a resync. JSON only: published as ``application/json`` text, consumed with ``accept=["json"]``. This module owns
the options, the subscription set and the publisher; it knows no broker's internals.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from kombu import Connection, Exchange, Producer

from nocluster.durations import count, seconds
from nocluster.errors import PublishError
from nocluster.pubsub.backend import PubSubBackend
from nocluster.pubsub.backends.kombu_amqp import AmqpPubSubTopology
from nocluster.pubsub.backends.kombu_consumer import KombuConsumerThread
from nocluster.pubsub.backends.kombu_redis import RedisPubSubTopology
from nocluster.pubsub.backends.kombu_topology import KombuPubSubTopology, TopologyConfig

logger = logging.getLogger("nocluster.pubsub.kombu")

# The brokers this backend speaks to, one topology each; the URL's transport picks one (see topology_for).
TOPOLOGIES: tuple[type[KombuPubSubTopology], ...] = (AmqpPubSubTopology, RedisPubSubTopology)


def topology_for(url: str) -> type[KombuPubSubTopology]:
    """The topology serving ``url``'s kombu transport (its ``driver_type``: ``amqp`` or ``redis``).

    Raises:
      ImproperlyConfigured: no topology serves that transport.
    """
    connection = Connection(url)
    driver_type = connection.transport.driver_type
    for topology in TOPOLOGIES:
        if driver_type in topology.driver_types:
            return topology
    supported = ", ".join(sorted(name for topology in TOPOLOGIES for name in topology.driver_types))
    raise ImproperlyConfigured(
        f"KombuPubSubBackend url {connection.as_uri()!r}: kombu transport {driver_type!r} is not supported "
        f"(supported: {supported})"
    )


class KombuPubSubBackend(PubSubBackend):
    """Parameters (keyword-only ``OPTIONS``):
    url: broker URL, ``amqp://...`` or ``redis://...``.
    heartbeat: liveness interval, seconds: the AMQP heartbeat, or on Redis how often the consumer pings itself
      (a dead connection is noticed within about twice this).
    reconnect_interval_max: longest wait between reconnect attempts, seconds (default 1; backoff from 0.2 s), so a
      node receives again about a second after its broker is back.
    connect_timeout: how long ``connect()`` waits for the first binding, seconds (it keeps retrying after).
    queue_expires: RabbitMQ/Redis queue expiry after its consumer is gone, seconds.
    max_length: RabbitMQ: most messages kept for a slow node (older ones are dropped, then resynced).
    publish_retries: reconnect attempts of one publish before ``PublishError``.
    durable: RabbitMQ: durable exchanges and per-node queues, persistent messages (default True), so a message
      whose ``publish`` returned survives a broker restart; False: transient ones (what is published while the
      broker restarts and the nodes re-bind is lost). Ignored on Redis (PUBLISH is at most once).
    transport_options: extra kombu transport options.
    """

    def __init__(
        self,
        *,
        url: str,
        heartbeat: float = 10.0,
        reconnect_interval_max: float = 1.0,
        connect_timeout: float = 10.0,
        queue_expires: float = 60.0,
        max_length: int = 100_000,
        publish_retries: int = 3,
        durable: bool = True,
        transport_options: dict[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.heartbeat = seconds(heartbeat, "pub/sub OPTIONS heartbeat")
        self.reconnect_interval_max = seconds(reconnect_interval_max, "pub/sub OPTIONS reconnect_interval_max")
        self.connect_timeout = seconds(connect_timeout, "pub/sub OPTIONS connect_timeout")
        self.queue_expires = seconds(queue_expires, "pub/sub OPTIONS queue_expires")
        self.max_length = count(max_length, "pub/sub OPTIONS max_length", least=1, most=10**9)
        self.publish_retries = count(publish_retries, "pub/sub OPTIONS publish_retries", most=100)
        if not isinstance(durable, bool):
            raise TypeError(f"pub/sub OPTIONS durable must be a bool, got {durable!r}")
        self.transport_options = dict(transport_options or {})
        self.topology_class = topology_for(url)
        self.publish_waits = self.topology_class.confirms
        # Durable and persistent where the broker can keep them (RabbitMQ); transient on Redis, as always.
        self.durable = durable and self.topology_class.persistent
        self.channels: set[str] = set()
        self._channels_lock = threading.Lock()
        self._exchanges: dict[str, Exchange] = {}
        self._publish_lock = threading.Lock()
        self._producer_connection: Connection | None = None
        self._producer: Producer | None = None
        # Per exchange, what Producer.publish declares on the publish connection (see _declare).
        self._declared: dict[str, list[Exchange]] = {}
        self._worker: KombuConsumerThread | None = None
        self.instance_id = ""

    # --- connections ---------------------------------------------------------------------------------
    def new_connection(self, *, consumer: bool) -> Connection:
        """A connection for the consumer thread or the publisher, with the topology's options."""
        options = self.topology_class.connection_options(
            consumer=consumer, heartbeat=self.heartbeat, transport_options=self.transport_options
        )
        return Connection(self.url, **options)

    def ping(self) -> None:
        """Raise if the broker cannot be reached (one attempt, 5 s)."""
        with self.new_connection(consumer=False) as connection:
            connection.ensure_connection(max_retries=1, timeout=5)

    def exchange(self, full_channel: str) -> Exchange:
        """The fanout exchange of ``full_channel`` (built once; publisher and topology share it)."""
        exchange = self._exchanges.get(full_channel)
        if exchange is None:
            exchange = Exchange(
                full_channel,
                type="fanout",
                durable=self.durable,
                auto_delete=False,
                delivery_mode=2 if self.durable else 1,  # 2: persistent, written to disk before it is confirmed
            )
            self._exchanges[full_channel] = exchange
        return exchange

    # --- PubSubBackend ---------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._worker is not None and self._worker.bound.is_set()

    def connect(self, instance_id: str) -> None:
        if self._worker is not None:
            return
        self.instance_id = instance_id
        config = TopologyConfig(
            namespace=self.namespace,
            instance_id=instance_id,
            heartbeat=self.heartbeat,
            queue_expires=self.queue_expires,
            max_length=self.max_length,
            exchange=self.exchange,
            durable=self.durable,
        )
        self._worker = KombuConsumerThread(
            connection=self.new_connection(consumer=True),
            topology=self.topology_class(config),
            wanted_channels=self.wanted_channels,
            listener=self.listener,
            instance_id=instance_id,
            reconnect_interval_max=self.reconnect_interval_max,
        )
        self._worker.start()
        if not self._worker.bound.wait(self.connect_timeout):
            logger.warning(
                "pub/sub of instance %s: broker %s not reachable within %s s; still trying",
                instance_id,
                self.new_connection(consumer=True).as_uri(),
                self.connect_timeout,
            )

    def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()
        with self._publish_lock:
            self._reset_producer()

    def subscribe(self, full_channel: str) -> None:
        with self._channels_lock:
            if full_channel in self.channels:
                return
            self.channels.add(full_channel)
        self._rebind()

    def unsubscribe(self, full_channel: str) -> None:
        with self._channels_lock:
            if full_channel not in self.channels:
                return
            self.channels.discard(full_channel)
        self._rebind()

    def wanted_channels(self) -> set[str]:
        """The full channels subscribed now (a copy; read by the consumer thread)."""
        with self._channels_lock:
            return set(self.channels)

    def _rebind(self) -> None:
        worker = self._worker
        if worker is not None:
            worker.request_rebind(wait=threading.current_thread() is not worker)

    def publish(self, full_channel: str, data: str) -> None:
        exchange = self.exchange(full_channel)
        with self._publish_lock:
            retry_policy = {
                "max_retries": self.publish_retries,
                "interval_start": 0.2,
                "interval_step": 0.5,
                "interval_max": self.reconnect_interval_max,
            }
            for attempt in (1, 2):
                try:
                    producer = self._get_producer()
                    producer.publish(
                        data,
                        exchange=exchange,
                        routing_key="",
                        declare=self._declare(full_channel, exchange, retry_policy),
                        content_type="application/json",
                        content_encoding="utf-8",
                        delivery_mode=exchange.delivery_mode,
                        retry=True,
                        retry_policy=retry_policy,
                    )
                    return
                except Exception as exc:
                    # A fresh connection forgets cached declarations (an exchange lost in a broker restart).
                    self._reset_producer()
                    if attempt == 2:
                        raise PublishError(
                            f"channel {full_channel!r}: broker {self.url.rsplit('@', 1)[-1]} refused or is "
                            f"unreachable: {type(exc).__name__}: {exc}"
                        ) from exc

    def after_fork(self) -> None:
        # The parent's sockets and thread are not ours: forget them without closing anything.
        self._worker = None
        self._producer_connection = None
        self._producer = None
        self._declared = {}
        self._publish_lock = threading.Lock()
        self._channels_lock = threading.Lock()

    # --- producer ----------------------------------------------------------------------------------------
    def _declare(self, full_channel: str, exchange: Exchange, retry_policy: dict[str, Any]) -> list[Exchange]:
        """What ``Producer.publish`` must declare: nothing if the topology declared ``exchange`` itself on this
        connection (RabbitMQ, once per connection), else ``[exchange]`` (kombu declares it once per connection)."""
        declare = self._declared.get(full_channel)
        if declare is None:
            connection = self._producer_connection
            assert connection is not None  # _get_producer() made it
            connection.ensure_connection(**retry_policy)
            declare = [] if self.topology_class.declare_exchange(connection, exchange) else [exchange]
            self._declared[full_channel] = declare
        return declare

    def _get_producer(self) -> Producer:
        if self._producer is None:
            self._producer_connection = self.new_connection(consumer=False)
            self._producer = Producer(self._producer_connection)
        return self._producer

    def _reset_producer(self) -> None:
        connection, self._producer_connection, self._producer = self._producer_connection, None, None
        self._declared.clear()
        if connection is not None:
            try:
                connection.release()
            except Exception:
                logger.debug("closing the publish connection failed", exc_info=True)
