"""The consumer thread of :class:`~nocluster.pubsub.backends.kombu.KombuPubSubBackend`, the same on every broker.

Built on ``kombu.mixins.ConsumerMixin``: it reconnects with backoff, re-declares and re-binds every subscription on
each connection, and drains with a short timeout so it can stop, apply (un)subscriptions and check liveness. What
differs per broker (queues, acknowledgements, liveness, when a binding holds) is the
:class:`~nocluster.pubsub.backends.kombu_topology.KombuPubSubTopology` it is given.

Ours, on top of ``ConsumerMixin``:

- Rebind requests that wait until applied: ``subscribe()`` returns once the channel's messages reach this node,
  so a message published right after it is not missed. The consumer thread applies them; a topology may confirm
  them later (Redis), and the request completes then.
- The node counts as bound, and the listener hears of a reconnect (``connection_revived``, which the sync
  messages turn into a resync), only once the topology says the new connection's bindings hold.
- A shorter reconnect backoff than kombu's (0.2 s, +0.4 s per try, capped), that gives up when the node stops.
- JSON only (``accept=["json"]``): an undecodable message is logged and dropped, and consuming goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from kombu.mixins import ConsumerMixin

from nocluster.pubsub.backends.kombu_topology import Consuming, KombuPubSubTopology, StaleConnection

if TYPE_CHECKING:
    from kombu import Connection, Consumer
    from kombu.message import Message

    from nocluster.pubsub.backend import PubSubListener

logger = logging.getLogger("nocluster.pubsub.kombu")

# On a graceful stop, once the consuming loop is left, how long stop() waits for the clean-up (cancelling the
# consumer, deleting this instance's queues, closing the connection), seconds. A broker that does not answer (frozen,
# or a half-open connection) must not hold the stop: the queues expire after queue_expires anyway, and the daemon
# thread ends by itself once its socket times out.
CLEANUP_TIMEOUT = 2.0


class _Stopping(Exception):
    """Raised inside the reconnect loop to give up when the node stops."""


class KombuConsumerThread(ConsumerMixin):
    """The instance's consumer: one named thread (``nocluster-pubsub-<id>``), reconnecting by itself.

    Parameters:
      connection: the consumer connection (cloned for every attempt).
      topology: the broker's strategy, used from this thread only.
      wanted_channels: the full channels subscribed now (called from this thread).
      listener: gets envelopes and reconnects.
      instance_id: this node (logs and the thread name).
      reconnect_interval_max: longest wait between reconnect attempts, seconds.
    """

    def __init__(
        self,
        *,
        connection: Connection,
        topology: KombuPubSubTopology,
        wanted_channels: Callable[[], set[str]],
        listener: PubSubListener | None,
        instance_id: str,
        reconnect_interval_max: float,
    ) -> None:
        self.connection = connection
        self.topology = topology
        self.instance_id = instance_id
        self.reconnect_interval_max = reconnect_interval_max
        self.bound = threading.Event()
        self.connections = 0
        self._wanted_channels = wanted_channels
        self._listener = listener
        self._rebind_requested = threading.Event()
        self._rebind_done = threading.Condition()
        self._rebind_requests = 0  # subscribe/unsubscribe calls so far; each waits until it is applied
        self._rebind_applied = 0
        self._rebind_pending = 0  # the request the topology's next confirmation completes
        self._revival_pending = False  # the connection counts as bound once the topology confirms it
        self._consuming: Consuming | None = None
        self._left_loop = threading.Event()  # set once the loop is left for good: no callback runs after it
        self._bound_channels: set[str] = set()
        # A daemon: it holds no work of its own (unacknowledged messages stay on the broker), and a node that
        # exits without stop() must not hang on it. stop() joins it.
        self._thread = threading.Thread(target=self._run, name=f"nocluster-pubsub-{instance_id[:8]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Leave the loop (within a drain interval, or when a running callback returns), then give the clean-up
        CLEANUP_TIMEOUT seconds; log it if the thread would not get that far."""
        self.should_stop = True
        with self._rebind_done:
            self._rebind_done.notify_all()  # a subscribe() waiting for its rebind gives up now
        if not self._thread.is_alive():
            return
        if not (self._left_loop.wait(timeout) or not self._thread.is_alive()):
            logger.error("pub/sub consumer thread %s did not stop within %s s", self._thread.name, timeout)
            return
        self._thread.join(CLEANUP_TIMEOUT)
        if self._thread.is_alive():
            logger.warning(
                "pub/sub consumer thread %s: the broker did not answer its clean-up within %s s; not waiting for it "
                "(this node's queues expire by themselves)", self._thread.name, CLEANUP_TIMEOUT,
            )  # fmt: skip

    def request_rebind(self, wait: bool) -> None:
        """Ask the consumer thread to (un)bind changed channels; wait up to 5 s for it when connected."""
        with self._rebind_done:
            self._rebind_requests += 1
            request = self._rebind_requests
            self._rebind_requested.set()
            if wait and self.bound.is_set():
                self._rebind_done.wait_for(lambda: self._rebind_applied >= request or self.should_stop, 5.0)

    def wanted(self) -> set[str]:
        return self._wanted_channels() | self.topology.control_channels

    # --- the loop --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self.should_stop:
            try:
                self.run(safety_interval=0.2)
            except _Stopping:
                break
            except StaleConnection as exc:
                logger.warning("pub/sub of instance %s: %s; reconnecting", self.instance_id, exc)
            except Exception:
                logger.exception("pub/sub consumer of instance %s failed; restarting", self.instance_id)
                threading.Event().wait(1.0)
            finally:
                self.bound.clear()
        self._left_loop.set()

    @contextmanager
    def _consume_from(self, *consumers: Consumer) -> Iterator[Any]:
        # ConsumerMixin's (the consumers, cancelled on exit), noting when the loop is left for a stop, before the
        # clean-up that may wait on the broker.
        with super()._consume_from(*consumers) as consuming:
            try:
                yield consuming
            finally:
                if self.should_stop:
                    self._left_loop.set()

    @contextmanager
    def establish_connection(self) -> Iterator[Connection]:
        # As ConsumerMixin's, with a shorter backoff (0.2 s, +0.4 s per try, capped) and a way out on stop.
        with self.create_connection() as conn:
            conn.ensure_connection(
                self.on_connection_error,
                None,
                interval_start=0.2,
                interval_step=0.4,
                interval_max=self.reconnect_interval_max,
                callback=self._abort_if_stopping,
            )
            yield conn

    def _abort_if_stopping(self) -> None:
        if self.should_stop:
            raise _Stopping()

    def on_connection_error(self, exc: Exception, interval: float) -> None:
        self.bound.clear()
        logger.warning(
            "pub/sub of instance %s: broker unreachable (%s); retry in %.1f s", self.instance_id, exc, interval
        )

    def get_consumers(self, consumer_class: Callable[..., Consumer], channel: Any) -> list[Consumer]:
        channels = self.wanted()
        consumer = consumer_class(
            queues=self.topology.queues(channels),
            on_message=self._on_message,
            accept=["json"],
            no_ack=self.topology.no_ack,
            prefetch_count=self.topology.prefetch_count,
        )
        self._bound_channels = channels
        return [consumer]

    def on_consume_ready(self, connection: Connection, channel: Any, consumers: list[Consumer], **kwargs: Any) -> None:
        consuming = self._consuming = Consuming(connection=connection, channel=channel, consumer=consumers[0])
        self.connections += 1
        self._apply_rebind()  # channels changed while connecting
        if self.topology.start(consuming):
            self._revived()
        else:
            self._revival_pending = True

    def _revived(self) -> None:
        # Listeners first: whoever sees the node bound again must not find state from before the drop (a near
        # cache still holding values that changed while it was cut off).
        if self._listener is not None:
            self._listener.connection_revived(self.connections > 1)
        self.bound.set()

    def on_consume_end(self, connection: Connection, channel: Any) -> None:
        self.bound.clear()
        consuming = self._consuming
        if self.should_stop and consuming is not None:
            # Graceful stop: remove this instance's queue(s) and bindings now rather than at expiry (best effort:
            # stop() waits CLEANUP_TIMEOUT at most for this and the connection's close).
            for queue in consuming.consumer.queues or ():
                try:
                    queue.delete()
                except Exception:
                    logger.debug("deleting queue %s failed; leaving the rest to expire", queue.name, exc_info=True)
                    return

    def on_iteration(self) -> None:
        if self._rebind_requested.is_set():
            self._apply_rebind()
        if self._consuming is not None:
            self.topology.on_iteration(self._consuming)

    # --- subscriptions -----------------------------------------------------------------------------------
    def _apply_rebind(self) -> None:
        # Read the request count before the channels: a request counted here has its channel in wanted().
        with self._rebind_done:
            request = self._rebind_requests
            self._rebind_requested.clear()
        consuming = self._consuming
        if consuming is None:
            return
        wanted = self.wanted()
        added, removed = wanted - self._bound_channels, self._bound_channels - wanted
        applied = self.topology.rebind(consuming, added, removed, bound=self.bound.is_set())
        self._bound_channels = wanted
        if applied:
            self._rebind_finished(request)
        else:
            self._rebind_pending = request

    def _bindings_confirmed(self) -> None:
        if self._revival_pending:
            self._revival_pending = False
            self._revived()
        self._rebind_finished(self._rebind_pending)

    def _rebind_finished(self, request: int) -> None:
        with self._rebind_done:
            self._rebind_applied = max(self._rebind_applied, request)
            self._rebind_done.notify_all()

    def _on_message(self, message: Message) -> None:
        topology = self.topology
        try:
            data = message.decode()  # enforces accept=["json"]
            full_channel = message.delivery_info.get("exchange", "")  # the fanout exchange is the full channel
        except Exception:
            logger.exception("pub/sub instance %s: undecodable message dropped", self.instance_id)
            topology.settle(message)
            return
        try:
            if full_channel in topology.control_channels:
                if topology.on_control(data):
                    self._bindings_confirmed()
            elif full_channel in self._bound_channels and self._listener is not None:
                self._listener.deliver(full_channel, data)
        finally:
            topology.settle(message)
