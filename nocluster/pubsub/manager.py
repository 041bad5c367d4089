"""``app.pub_sub_manager``: cross-instance broadcast with ``skip_self``, ``only_self`` and debounce.

Policy lives here, the wire in the backend (:mod:`nocluster.pubsub.backend`): the manager prefixes channels with
``app.name``, wraps messages in an :class:`~nocluster.envelope.Envelope`, refuses non-JSON payloads, keeps the
subscription table, filters the publisher's own messages, debounces, and isolates callbacks that raise. What a
message from the wire can make raise is caught per message: a malformed envelope is logged and dropped, and the
consumer goes on.

:meth:`PubSubManager.drain` waits until what was published has been delivered (marker messages, see
:mod:`nocluster.pubsub.markers`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nocluster import tracing
from nocluster.db import close_old_connections
from nocluster.durations import count, seconds
from nocluster.envelope import JSON, Envelope, canonical, dumps, ensure_json, validate_channel
from nocluster.errors import MalformedMessage, PublishError
from nocluster.identity import NodeIdentity
from nocluster.lifecycle import Component
from nocluster.metrics.recorders import PubSubMetrics
from nocluster.pubsub import markers
from nocluster.pubsub.backend import PubSubBackend
from nocluster.pubsub.debounce import Debouncer
from nocluster.recent import RECENT_IDS, RecentIds

logger = logging.getLogger("nocluster.pubsub")

Callback = Callable[[Any], Any]
# The largest message publish() sends, in bytes of its envelope on the wire (NOCLUSTER["PUBSUB"]["MAX_MESSAGE_BYTES"]).
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024


@dataclass
class Subscription:
    callback: Callback
    debounce: float = 0.0


class PubSubManager(Component):
    """Publish to and subscribe on channels shared by every instance of ``app.name``.

    Parameters:
      identity: the node (its ``name`` prefixes channels, its ``instance_id`` marks envelopes).
      backend: a :class:`~nocluster.pubsub.backend.PubSubBackend` built from ``NOCLUSTER["PUBSUB"]``.
      debouncer: runs debounced callbacks (shared with the sync messages); opened and stopped with this manager.
      max_message_bytes: the largest envelope publish() sends (1 MiB); a larger message raises ``ValueError``.
      metrics: records messages published, received and dropped as malformed (default: nothing recorded).
    """

    def __init__(
        self,
        identity: NodeIdentity,
        backend: PubSubBackend,
        debouncer: Debouncer,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        metrics: PubSubMetrics | None = None,
    ) -> None:
        self.identity = identity
        self.metrics = metrics if metrics is not None else PubSubMetrics()
        self.backend = backend
        self.debouncer = debouncer
        self.max_message_bytes = count(
            max_message_bytes, 'NOCLUSTER["PUBSUB"]["MAX_MESSAGE_BYTES"]', least=1024, most=512 * 1024 * 1024
        )
        self._lock = threading.RLock()
        # Held across a subscription table change and the backend call it implies, so a subscribe racing an
        # unsubscribe of the same channel cannot leave a subscriber the backend no longer delivers to. Not
        # _lock: deliver() takes that one, and the backend may wait for its consumer thread.
        self._bind_lock = threading.RLock()
        self._subscriptions: dict[str, dict[Callback, Subscription]] = {}
        self._reconnect_listeners: list[Callable[[], None]] = []
        self._recent = RecentIds(RECENT_IDS)
        # Ids this instance published, to notice an envelope that claims this instance's id without coming from it.
        self._published = RecentIds(RECENT_IDS)
        self._published_lock = threading.Lock()
        self.markers = markers.MarkerBox()
        self.started = False
        backend.attach(self, identity.name)

    # --- names ---------------------------------------------------------------------------------------
    def full_channel(self, channel: str) -> str:
        """The wire name of ``channel``: ``"{app.name}.{channel}"``."""
        return f"{self.identity.name}.{validate_channel(channel)}"

    def _short(self, full_channel: str) -> str | None:
        prefix = f"{self.identity.name}."
        return full_channel[len(prefix) :] if full_channel.startswith(prefix) else None

    # --- public API ----------------------------------------------------------------------------------
    def subscribe(self, channel: str, callback: Callback, debounce: float = 0) -> None:
        """Call ``callback(message)`` for every message published on ``channel`` by any instance.

        Subscribing the same callback twice keeps one subscription (the later ``debounce`` wins). Allowed before
        :meth:`start`: the subscription is bound when the node's consumer starts.

        Parameters:
          channel: channel name, without the app prefix.
          callback: runs in the node's consumer thread (in the debounce thread when ``debounce > 0``).
          debounce: seconds; messages of equal content within this window make one call (trailing edge).
        """
        full = self.full_channel(channel)
        if not callable(callback):
            raise TypeError(f"channel {channel!r}: callback {callback!r} is not callable")
        delay = seconds(debounce, f"channel {channel!r}: debounce", allow_zero=True)
        with self._bind_lock:
            with self._lock:
                callbacks = self._subscriptions.setdefault(channel, {})
                first = not callbacks
                callbacks[callback] = Subscription(callback, delay)
            if first:
                self.backend.subscribe(full)

    def unsubscribe(self, channel: str, callback: Callback) -> None:
        """Stop calling ``callback`` for ``channel`` (no error if it was not subscribed)."""
        full = self.full_channel(channel)
        with self._bind_lock:
            with self._lock:
                callbacks = self._subscriptions.get(channel, {})
                callbacks.pop(callback, None)
                last = not callbacks and channel in self._subscriptions
                if last:
                    del self._subscriptions[channel]
            if last:
                self.backend.unsubscribe(full)

    def subscriptions(self, channel: str) -> list[Subscription]:
        with self._lock:
            return list(self._subscriptions.get(channel, {}).values())

    def publish(
        self,
        channel: str,
        message: JSON,
        skip_self: bool = True,
        only_self: bool = False,
        *,
        origin: str = "",
        trace: dict[str, str] | None = None,
    ) -> str:
        """Send ``message`` to every instance subscribed to ``channel``; returns the message id.

        Parameters:
          skip_self: the publishing instance does not receive it.
          only_self: only the publishing instance receives it, without the broker; its callbacks run in the
            calling thread before this returns (debounced ones later, in the debounce thread).
          origin: for the outbox relay: the instance id of the node that published it first (``skip_self``
            spares that node); default this node.
          trace: for the outbox relay: the trace context of the first publish; default the current one.

        Returns after the broker accepted the message.

        Raises:
          TypeError: ``message`` is not JSON, or a flag is not a bool (the message names the channel).
          ValueError: the message is larger than ``max_message_bytes`` on the wire (1 MiB by default).
          InvalidChannel: the channel name is empty or malformed.
          PublishError: the broker could not be reached.
        """
        full = self.full_channel(channel)
        ensure_json(channel, message)
        for flag, value in (("skip_self", skip_self), ("only_self", only_self)):
            if not isinstance(value, bool):
                raise TypeError(f"channel {channel!r}: {flag} must be a bool, got {value!r}")
        publisher = origin or self.identity.instance_id
        carried = tracing.carrier() if trace is None else trace
        envelope = Envelope(publisher, message, skip_self=skip_self, only_self=only_self, trace=carried)
        if only_self:
            self.metrics.published(channel)
            self._dispatch(channel, envelope)
            return envelope.id
        body = dumps(envelope.to_wire())
        self._check_size(channel, body)
        if publisher == self.identity.instance_id:
            with self._published_lock:
                self._published.seen(envelope.id)
        try:
            self.backend.publish(full, body)
        except PublishError:
            raise
        except Exception as exc:
            raise PublishError(f"channel {channel!r}: publish failed: {type(exc).__name__}: {exc}") from exc
        self.metrics.published(channel)
        return envelope.id

    def _check_own_id(self, channel: str, envelope: Envelope) -> None:
        """Log an envelope that claims to come from this instance but was not published here. The broker trusts
        whoever can publish to it; this only makes an impostor, or a misconfigured copy of a node, visible. (Another
        node's outbox relay may also send a row of this node's that this node was too slow to send: rare, and
        named in the log line.)"""
        with self._published_lock:
            ours = self._published.contains(envelope.id)
        if not ours:
            logger.warning(
                "channel %r: message %s claims to come from this instance (%s) but was not published here "
                "(an impostor, or another node's outbox relaying a message of this one)",
                channel, envelope.id, self.identity.instance_id, extra={"channel": channel},
            )  # fmt: skip

    def _check_size(self, channel: str, body: str) -> None:
        if len(body) * 4 <= self.max_message_bytes:  # a character is at most 4 bytes in UTF-8
            return
        size = len(body.encode("utf-8"))
        if size > self.max_message_bytes:
            raise ValueError(
                f"channel {channel!r}: the message is {size} bytes on the wire, more than the "
                f'{self.max_message_bytes} that NOCLUSTER["PUBSUB"]["MAX_MESSAGE_BYTES"] allows'
            )

    @property
    def connected(self) -> bool:
        """True while this node's consumer is started, connected and bound (it receives what is published)."""
        return self.started and self.backend.connected

    def on_reconnect(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` each time the backend reconnects (not on the first connect): messages may have
        been missed while it was away."""
        with self._lock:
            if listener not in self._reconnect_listeners:
                self._reconnect_listeners.append(listener)

    # --- waiting for what was published ----------------------------------------------------------------
    def drain(self, timeout: float = 10.0, peers: Iterable[PubSubManager] = ()) -> bool:
        """Wait until messages published so far by this node and by ``peers`` reached every one of them, and no
        debounced call is pending or running (``timeout`` seconds in all); True if that happened.

        Only started managers take part (a stopped one receives nothing). For tests and tools: a test asserts
        that something did *not* arrive after this returns, instead of sleeping (see :mod:`.markers`).
        """
        return markers.drain([manager for manager in (self, *peers) if manager.started], timeout)

    def debounced_idle(self) -> bool:
        """True when no debounced call is pending or running."""
        return self.debouncer.idle()

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start this node's consumer (idempotent); every subscription made so far is bound."""
        with self._lock:
            if self.started:
                return
            self.started = True
        self.debouncer.open()
        self.backend.connect(self.identity.instance_id)

    def stop(self) -> None:
        """Stop the consumer, drop pending debounced calls and join the threads."""
        with self._lock:
            if not self.started:
                return
            self.started = False
        try:
            self.backend.close()
        finally:
            self.debouncer.stop()

    def after_fork(self) -> None:
        """In a forked child: the consumer thread is gone; :meth:`start` builds a new one with the new id."""
        # Another thread may have held a lock at fork(): the child's copy would stay locked for ever.
        self._lock = threading.RLock()
        self._bind_lock = threading.RLock()
        self.started = False
        self.backend.after_fork()
        self.debouncer.after_fork()
        self.metrics.after_fork()

    # --- called by the backend -----------------------------------------------------------------------
    def deliver(self, full_channel: str, data: JSON) -> None:
        """Dispatch one decoded envelope (the backend's consumer thread). Never raises: a malformed envelope is
        logged once and dropped, any other error is logged with the channel."""
        channel = self._short(full_channel)
        if channel is None:
            return
        try:
            envelope = Envelope.from_wire(data)
            if envelope.publisher_id == self.identity.instance_id:
                self._check_own_id(channel, envelope)
                if envelope.skip_self:
                    return
            if self._recent.seen(envelope.id):
                # RabbitMQ delivers again what was unacknowledged when a connection dropped.
                logger.debug("channel %r: duplicate %s dropped on %s", channel, envelope.id, self.identity.instance_id)
                return
            self.metrics.received(channel)
            self._dispatch(channel, envelope)
        except MalformedMessage as exc:
            self.metrics.dropped_malformed(channel)
            logger.error(
                "channel %r: dropped a malformed envelope on instance %s: %s",
                channel, self.identity.instance_id, exc, extra={"channel": channel},
            )  # fmt: skip
        except Exception:
            logger.exception(
                "channel %r: delivery failed on instance %s", channel, self.identity.instance_id,
                extra={"channel": channel},
            )  # fmt: skip

    def connection_revived(self, reconnected: bool) -> None:
        if not reconnected:
            return
        logger.warning("pub/sub of instance %s reconnected: subscriptions re-bound", self.identity.instance_id)
        with self._lock:
            listeners = list(self._reconnect_listeners)
        for listener in listeners:
            try:
                listener()
            except Exception:
                logger.exception("reconnect listener %r failed on instance %s", listener, self.identity.instance_id)

    # --- internals -----------------------------------------------------------------------------------
    def _dispatch(self, channel: str, envelope: Envelope) -> None:
        for subscription in self.subscriptions(channel):
            if subscription.debounce > 0:
                key = (channel, subscription.callback, canonical(envelope.message))
                self.debouncer.push(key, subscription.debounce, self._caller(channel, subscription, envelope))
            else:
                self._call(channel, subscription.callback, envelope)

    def _caller(self, channel: str, subscription: Subscription, envelope: Envelope) -> Callable[[], None]:
        def call() -> None:
            # The subscription may have gone while the call was pending.
            if subscription.callback in {s.callback for s in self.subscriptions(channel)}:
                self._call(channel, subscription.callback, envelope)

        return call

    def _call(self, channel: str, callback: Callback, envelope: Envelope) -> None:
        # As Django does around a request: a callback in this long-lived thread gets a usable database
        # connection, and does not keep one open past CONN_MAX_AGE.
        close_old_connections()
        try:
            with tracing.consumer_span(f"receive {channel}", envelope.trace, span_attributes(channel, envelope)):
                callback(envelope.message)
        except Exception:
            logger.exception(
                "pub/sub callback %r raised on channel %r, message %s, instance %s",
                callback, channel, envelope.id, self.identity.instance_id,
                extra={"channel": channel, "message_id": envelope.id},
            )  # fmt: skip
        finally:
            close_old_connections()


def span_attributes(channel: str, envelope: Envelope) -> dict[str, str]:
    """The attributes of a callback's span (OpenTelemetry's messaging conventions)."""
    return {
        "messaging.system": "nocluster",
        "messaging.operation.type": "receive",
        "messaging.destination.name": channel,
        "messaging.message.id": envelope.id,
    }
