"""The consumer thread of :class:`~nocluster.pubsub.backends.kombu.KombuPubSubBackend` (imported by it only).

Built on ``kombu.mixins.ConsumerMixin``: it reconnects with backoff, re-declares and re-binds every subscription on
each connection, and drains with a short timeout so it can stop, apply (un)subscriptions and send heartbeats.

Liveness: on RabbitMQ, AMQP heartbeats (``heartbeat`` seconds). On Redis, kombu checks the pub/sub connection only
in its event loop, not in ``drain_events``, so this thread pings itself (ours): every ``heartbeat`` seconds it
publishes on its own channel ``{app.name}.pubsub-ping.{instance_id}``; if no ping has come back for two intervals
the connection is dead or was dropped by Redis, and the thread reconnects (and the node resyncs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from kombu import Connection, Consumer, Producer
from kombu.mixins import ConsumerMixin

if TYPE_CHECKING:
    from nocluster.pubsub.backends.kombu import KombuPubSubBackend

logger = logging.getLogger("nocluster.pubsub.kombu")

# RabbitMQ: unacknowledged messages the broker may push ahead to this node, and how acknowledgements are batched
# (a redelivery after a dropped connection is dropped by the manager's recent-id check).
PREFETCH = 1000
ACK_EVERY = 100
ACK_DELAY = 0.2  # seconds


class StaleConnection(Exception):
    """The Redis pub/sub connection stopped answering this node's pings."""


class _Stopping(Exception):
    """Raised inside the reconnect loop to give up when the node stops."""


class KombuConsumerThread(ConsumerMixin):
    """The instance's consumer: one named thread (``nocluster-pubsub-<id>``), reconnecting by itself."""

    def __init__(self, backend: KombuPubSubBackend) -> None:
        self.backend = backend
        self.connection = backend.new_connection(consumer=True)
        self.bound = threading.Event()
        self.connections = 0
        self.ping_channel = f"{backend.namespace}.pubsub-ping.{backend.instance_id}"
        self._rebind_requested = threading.Event()
        self._rebind_done = threading.Condition()
        self._rebind_requests = 0  # subscribe/unsubscribe calls so far; each waits until it is applied
        self._rebind_applied = 0
        self._rebind_pending = 0  # Redis: the request a PSUBSCRIBE confirmation will complete
        self._consumer: Consumer | None = None
        self._bound_channels: set[str] = set()
        self._conn: Connection | None = None
        self._last_ping = self._last_pong = 0.0
        self._ping_token = 0
        self._unacked: Any = None  # RabbitMQ: the latest delivered message not yet acknowledged
        self._unacked_count = 0
        self._unacked_since = 0.0
        self._last_heartbeat_check = 0.0
        self._confirm_from = 0  # first ping token that confirms the latest PSUBSCRIBE (0: nothing to confirm)
        self._unconfirmed_revival = False
        self._thread = threading.Thread(
            target=self._run, name=f"nocluster-pubsub-{backend.instance_id[:8]}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.should_stop = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("pub/sub consumer thread %s did not stop within %s s", self._thread.name, timeout)

    def request_rebind(self, wait: bool) -> None:
        """Ask the consumer thread to (un)bind changed channels; wait up to 5 s for it when connected."""
        with self._rebind_done:
            self._rebind_requests += 1
            request = self._rebind_requests
            self._rebind_requested.set()
            if wait and self.bound.is_set():
                self._rebind_done.wait_for(lambda: self._rebind_applied >= request or self.should_stop, 5.0)

    def wanted(self) -> set[str]:
        channels = self.backend.wanted_channels()
        return channels | {self.ping_channel} if self.backend.is_redis else channels

    # --- the loop --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self.should_stop:
            try:
                self.run(safety_interval=0.2)
            except _Stopping:
                return
            except StaleConnection as exc:
                logger.warning("pub/sub of instance %s: %s; reconnecting", self.backend.instance_id, exc)
            except Exception:
                logger.exception("pub/sub consumer of instance %s failed; restarting", self.backend.instance_id)
                threading.Event().wait(1.0)
            finally:
                self.bound.clear()

    @contextmanager
    def establish_connection(self) -> Iterator[Connection]:
        # As ConsumerMixin's, with a shorter backoff (0.2 s, +0.4 s per try, capped) and a way out on stop.
        with self.create_connection() as conn:
            conn.ensure_connection(
                self.on_connection_error,
                None,
                interval_start=0.2,
                interval_step=0.4,
                interval_max=self.backend.reconnect_interval_max,
                callback=self._abort_if_stopping,
            )
            yield conn

    def _abort_if_stopping(self) -> None:
        if self.should_stop:
            raise _Stopping()

    def on_connection_error(self, exc: Exception, interval: float) -> None:
        self.bound.clear()
        logger.warning(
            "pub/sub of instance %s: broker unreachable (%s); retry in %.1f s", self.backend.instance_id, exc, interval
        )

    def get_consumers(self, consumer_class: Any, channel: Any) -> list[Consumer]:
        channels = self.wanted()
        if self.backend.is_redis:
            queues = [self.backend.queue_for(full) for full in sorted(channels)]
        else:
            queues = [self.backend.instance_queue(channels)]
        # RabbitMQ: acknowledged after dispatch, so what was in flight when a connection died is delivered again
        # (at least once). Redis fanout has no acknowledgements (at most once).
        self._consumer = consumer_class(
            queues=queues,
            on_message=self._on_message,
            accept=["json"],
            no_ack=self.backend.is_redis,
            prefetch_count=None if self.backend.is_redis else PREFETCH,
        )
        self._bound_channels = channels
        return [self._consumer]

    def on_consume_ready(self, connection: Connection, channel: Any, consumers: Any, **kwargs: Any) -> None:
        self._conn = connection
        self.connections += 1
        self._unacked, self._unacked_count = None, 0  # delivery tags of a dead channel mean nothing here
        self._apply_rebind()  # channels changed while connecting
        if self.backend.is_redis:
            # Bound only once a ping has come back through the new subscription (see _confirm).
            self._unconfirmed_revival = True
            self._last_pong = time.monotonic()
            self._subscribe_redis()
        else:
            self._revived()

    def _revived(self) -> None:
        self.bound.set()
        if self.backend.listener is not None:
            self.backend.listener.connection_revived(self.connections > 1)

    def on_consume_end(self, connection: Connection, channel: Any) -> None:
        self.bound.clear()
        if self.should_stop and self._consumer is not None:
            # Graceful stop: remove this instance's queue(s) and bindings now rather than at expiry.
            for queue in list(self._consumer.queues):
                try:
                    queue.delete()
                except Exception:
                    logger.debug("deleting queue %s failed", queue.name, exc_info=True)

    def on_iteration(self) -> None:
        if self._rebind_requested.is_set():
            self._apply_rebind()
        if self._conn is None:
            return
        if self.backend.is_redis:
            self._check_redis_liveness()
        else:
            now = time.monotonic()
            if self._unacked is not None and now - self._unacked_since >= ACK_DELAY:
                self._ack_now()
            if now - self._last_heartbeat_check >= 1.0:  # as ConsumerMixin does on idle seconds; never per message
                self._last_heartbeat_check = now
                self._conn.heartbeat_check()

    # --- Redis: subscription confirmation and liveness, by pinging ourselves -----------------------------
    def _subscribe_redis(self) -> None:
        """PSUBSCRIBE every topic now (kombu would do it on the next poll) and confirm it with a ping."""
        assert self._consumer is not None and self._conn is not None
        channel = self._consumer.channel
        # kombu PSUBSCRIBEs a channel's fanout queues when its poller puts it in LISTEN mode, at the next poll;
        # do that now (kombu's own call), or, when already listening, subscribe the new topics. The whole set
        # goes in one PSUBSCRIBE, so one ping back confirms all of it.
        if channel._in_listen:
            channel._subscribe()
        else:
            self._conn.transport.cycle._register_LISTEN(channel)
        self._confirm_from = self._ping_token + 1
        self._send_ping()

    def _send_ping(self) -> None:
        assert self._consumer is not None
        self._ping_token += 1
        self._last_ping = time.monotonic()
        Producer(self._consumer.channel).publish(
            {"token": self._ping_token},
            exchange=self.backend.exchange(self.ping_channel),
            routing_key="",
            serializer="json",
        )

    def _on_pong(self, data: Any) -> None:
        self._last_pong = time.monotonic()
        token = data.get("token", 0) if isinstance(data, dict) else 0
        if self._confirm_from and token >= self._confirm_from:
            self._confirm_from = 0
            if self._unconfirmed_revival:
                self._unconfirmed_revival = False
                self._revived()
            self._rebind_finished(self._rebind_pending)

    def _check_redis_liveness(self) -> None:
        now = time.monotonic()
        interval = self.backend.heartbeat
        if self._confirm_from:
            # A PUBLISH may overtake our PSUBSCRIBE on its way to Redis: ping again until one comes back.
            if now - self._last_ping >= 0.2:
                self._send_ping()
            if now - self._last_pong > 3 * interval and self._last_pong < self._last_ping:
                raise StaleConnection(f"subscription not confirmed within {3 * interval:.0f} s")
            return
        if self._last_ping - self._last_pong > 2 * interval:
            raise StaleConnection(f"no answer to pings for {now - self._last_pong:.1f} s")
        if now - self._last_ping >= interval:
            self._send_ping()

    # --- subscriptions -----------------------------------------------------------------------------------
    def _apply_rebind(self) -> None:
        # Read the request count before the channels: a request counted here has its channel in wanted().
        with self._rebind_done:
            request = self._rebind_requests
            self._rebind_requested.clear()
        consumer = self._consumer
        if consumer is None:
            return
        wanted = self.wanted()
        added, removed = wanted - self._bound_channels, self._bound_channels - wanted
        if self.backend.is_redis:
            # Removed channels stay subscribed until the next reconnect and are filtered out in _on_message:
            # cancelling kombu's fanout queue while a message of it is in flight makes its Redis transport
            # raise KeyError in _deliver_fanout_message, which drops the connection (and, Redis being at most
            # once, every other channel's messages in the gap).
            for full in sorted(added):
                consumer.add_queue(self.backend.queue_for(full))
            if added:
                consumer.consume()
        else:
            queue = consumer.queues[0]
            for full in sorted(added):
                exchange = self.backend.exchange(full)(consumer.channel)
                exchange.declare()
                queue.bind_to(exchange=exchange, routing_key="")  # synchronous: bound when it returns
            for full in sorted(removed):
                queue.unbind_from(exchange=self.backend.exchange(full), routing_key="")
        self._bound_channels = wanted
        if self.backend.is_redis and added and self.bound.is_set():
            self._rebind_pending = request
            self._subscribe_redis()  # finished when the ping comes back
        else:
            self._rebind_finished(request)

    def _rebind_finished(self, request: int) -> None:
        with self._rebind_done:
            self._rebind_applied = max(self._rebind_applied, request)
            self._rebind_done.notify_all()

    def _on_message(self, message: Any) -> None:
        try:
            data = message.decode()  # enforces accept=["json"]
            full_channel = message.delivery_info.get("exchange", "")  # the fanout exchange is the full channel
        except Exception:
            logger.exception("pub/sub instance %s: undecodable message dropped", self.backend.instance_id)
            if not self.backend.is_redis:
                self._ack_later(message)
            return
        try:
            if full_channel == self.ping_channel:
                self._on_pong(data)
            elif full_channel in self._bound_channels and self.backend.listener is not None:
                self.backend.listener.deliver(full_channel, data)
        finally:
            if not self.backend.is_redis:
                self._ack_later(message)

    def _ack_later(self, message: Any) -> None:
        """RabbitMQ: acknowledge in batches (``multiple=True``), every ACK_EVERY messages or ACK_DELAY seconds."""
        if self._unacked is None:
            self._unacked_since = time.monotonic()
        self._unacked = message
        self._unacked_count += 1
        if self._unacked_count >= ACK_EVERY:
            self._ack_now()

    def _ack_now(self) -> None:
        message, self._unacked, self._unacked_count = self._unacked, None, 0
        if message is not None:
            message.ack(multiple=True)
