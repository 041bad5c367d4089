"""The Redis topology of the kombu pub/sub backend (``redis://``): PUBLISH/PSUBSCRIBE, at most once.

kombu's Redis transport maps a queue to a single fanout exchange (``Channel._fanout_queues``), so the instance has
one virtual queue per channel, ``{app.name}.pubsub.{instance_id}.{full_channel}``; all of them share one
PSUBSCRIBE connection. Pub/sub on Redis is at most once: what is published while a node is disconnected is lost
for it, and Redis disconnects a subscriber whose output buffer passes ``client-output-buffer-limit pubsub``
(32 MiB by default). There are no acknowledgements.

Ours, by pinging ourselves: this node publishes on its own control channel ``{app.name}.pubsub-ping.{instance_id}``.

- Subscription confirmation. kombu PSUBSCRIBEs at its next poll, and Redis does not order our PSUBSCRIBE
  against another client's PUBLISH. A subscription counts as bound (so ``subscribe()`` may return, and a
  reconnect is reported) once a ping published after it came back through it.
- Liveness. kombu checks the pub/sub connection only in its event loop, not in ``drain_events``; every
  ``heartbeat`` seconds we ping, and if no ping came back for two intervals the connection is dead or was dropped
  by Redis: :class:`StaleConnection`, the consumer reconnects and the node resyncs.

Every kombu Redis-transport internal the backend relies on is used in this file only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from kombu import Producer, Queue

from nocluster.pubsub.backends.kombu_topology import Consuming, KombuPubSubTopology, StaleConnection, TopologyConfig

if TYPE_CHECKING:
    from kombu.transport.redis import Channel as RedisChannel

# While a subscription waits for its confirmation: ping again this often, seconds (a PUBLISH may overtake a
# PSUBSCRIBE on its way to Redis).
CONFIRM_PING_INTERVAL = 0.2
# Longest wait for Redis's answer to one command, seconds (capped by ``heartbeat``); see connection_options.
SOCKET_TIMEOUT = 5.0


class RedisPubSubTopology(KombuPubSubTopology):
    """Redis: one virtual queue per channel on one PSUBSCRIBE connection; confirmation and liveness by ping."""

    driver_types = ("redis",)
    no_ack = True  # Redis fanout has no acknowledgements (at most once)

    def __init__(self, config: TopologyConfig) -> None:
        super().__init__(config)
        self.ping_channel = f"{config.namespace}.pubsub-ping.{config.instance_id}"
        self.control_channels = frozenset({self.ping_channel})
        self._last_ping = self._last_pong = 0.0
        self._ping_token = 0
        self._confirm_from = 0  # first ping token that confirms the latest PSUBSCRIBE (0: nothing to confirm)

    @classmethod
    def connection_options(
        cls, *, consumer: bool, heartbeat: float, transport_options: dict[str, Any]
    ) -> dict[str, Any]:
        # No AMQP heartbeat on Redis: the consumer's liveness is the ping (see on_iteration). A command (the ping,
        # a publish, a subscription's bookkeeping) waits at most SOCKET_TIMEOUT seconds for Redis's answer, so a
        # Redis that does not answer (frozen, or a half-open connection) is an error, not a wait for ever that would
        # also hold a stop. (The subscription connection is read only when it has data: no timeout there.)
        options = dict(transport_options)
        options.setdefault("socket_timeout", min(heartbeat, SOCKET_TIMEOUT))
        options.setdefault("socket_connect_timeout", min(heartbeat, SOCKET_TIMEOUT))
        return {"heartbeat": 0, "transport_options": options}

    def queue(self, full_channel: str) -> Queue:
        """The instance's virtual queue for one channel."""
        return Queue(
            self.config.queue_name(full_channel),
            exchange=self.config.exchange(full_channel),
            routing_key="",
            durable=False,
            auto_delete=True,
            expires=self.config.queue_expires,
        )

    def queues(self, channels: set[str]) -> list[Queue]:
        return [self.queue(full) for full in sorted(channels)]

    def start(self, consuming: Consuming) -> bool:
        self._last_pong = time.monotonic()
        self._subscribe(consuming)
        return False  # bound once the ping comes back (on_control)

    def rebind(self, consuming: Consuming, added: set[str], removed: set[str], bound: bool) -> bool:
        # Removed channels stay subscribed until the next reconnect (the consumer drops their messages, as it
        # no longer lists them): cancelling kombu's fanout queue while a message of it is in flight makes the Redis
        # transport raise KeyError in _deliver_fanout_message, which drops the connection (and, Redis being at
        # most once, every other channel's messages in the gap).
        if not added:
            return True
        for full in sorted(added):
            consuming.consumer.add_queue(self.queue(full))
        consuming.consumer.consume()
        if not bound:
            return True  # start() subscribes everything and confirms it
        self._subscribe(consuming)
        return False  # applied once the ping comes back

    def on_control(self, data: Any) -> bool:
        self._last_pong = time.monotonic()
        token = data.get("token", 0) if isinstance(data, dict) else 0
        if self._confirm_from and token >= self._confirm_from:
            self._confirm_from = 0
            return True
        return False

    def on_iteration(self, consuming: Consuming) -> None:
        now = time.monotonic()
        interval = self.config.heartbeat
        if self._confirm_from:
            if now - self._last_ping >= CONFIRM_PING_INTERVAL:
                self._send_ping(consuming)
            if now - self._last_pong > 3 * interval and self._last_pong < self._last_ping:
                raise StaleConnection(f"subscription not confirmed within {3 * interval:.0f} s")
            return
        if self._last_ping - self._last_pong > 2 * interval:
            raise StaleConnection(f"no answer to pings for {now - self._last_pong:.1f} s")
        if now - self._last_ping >= interval:
            self._send_ping(consuming)

    def _subscribe(self, consuming: Consuming) -> None:
        """PSUBSCRIBE every topic now (kombu would do it on the next poll) and confirm it with a ping."""
        channel: RedisChannel = consuming.channel
        # kombu PSUBSCRIBEs a channel's fanout queues when its poller puts it in LISTEN mode, at the next poll;
        # do that now (kombu's own call), or, when already listening, subscribe the new topics. The whole set
        # goes in one PSUBSCRIBE, so one ping back confirms all of it.
        if channel._in_listen:
            channel._subscribe()
        else:
            consuming.connection.transport.cycle._register_LISTEN(channel)
        self._confirm_from = self._ping_token + 1
        self._send_ping(consuming)

    def _send_ping(self, consuming: Consuming) -> None:
        self._ping_token += 1
        self._last_ping = time.monotonic()
        Producer(consuming.channel).publish(
            {"token": self._ping_token},
            exchange=self.config.exchange(self.ping_channel),
            routing_key="",
            serializer="json",
        )
