"""``app.sync_message_manager``: tell the other instances that a plugin's state changed, after the commit.

A sync message means "reload this", not "apply this delta": it travels on pub/sub channel ``"sync.{channel}"``
with ``skip_self=True`` (the sender already has the new state), and is debounced on the receiving side
(``NOCLUSTER["SYNC"]["DEBOUNCE"]`` seconds, default 1). Inside ``atomic()`` it is written to the outbox in the
caller's transaction and sent after the commit, by any node, once pub/sub takes it (never after a rollback; a
failing ``on_commit`` callback cannot lose it); outside a transaction it is sent at once.

Wire format (the pub/sub message): ``{"seq": n, "source": instance_id, "message": <the caller's JSON>, "id"}``.
``seq`` is numbered per sending instance when the message goes on the wire. Receivers check it per source
(:mod:`nocluster.sync.sequence`); a gap, or a reconnect of this node's pub/sub consumer, makes every affected
subscriber resync (``Plugin.resync()``, or the callback called with the resync marker). A repeated ``(source,
seq)`` or ``id`` (an outbox row sent twice) is dropped.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from django.db import DEFAULT_DB_ALIAS, connections

from nocluster import tracing
from nocluster.db import close_old_connections
from nocluster.durations import optional_seconds, seconds
from nocluster.envelope import (
    JSON,
    canonical,
    ensure_json,
    validate_channel,
    wire_field,
    wire_id,
    wire_json,
    wire_object,
)
from nocluster.errors import MalformedMessage
from nocluster.identity import NodeIdentity
from nocluster.lifecycle import Component
from nocluster.metrics.recorders import SyncMetrics
from nocluster.recent import RECENT_IDS, RecentIds
from nocluster.sync.sequence import GapDetector, SequenceCounter, resync_marker

if TYPE_CHECKING:
    from nocluster.models import OutboxMessage
    from nocluster.outbox import Outbox
    from nocluster.pubsub.debounce import Debouncer
    from nocluster.pubsub.manager import PubSubManager

logger = logging.getLogger("nocluster.sync")

Callback = Callable[[Any], Any]


@dataclass
class SyncSubscription:
    callback: Callback
    debounce: float
    resync: Callable[[str], Any] | None = None


@dataclass(frozen=True)
class SyncPayload:
    """A sync message as it travels in the pub/sub message: ``{"seq", "source", "message"}``."""

    seq: int
    source: str
    message: JSON
    id: str = ""

    def to_wire(self) -> dict[str, JSON]:
        return {"seq": self.seq, "source": self.source, "message": self.message, "id": self.id}

    @classmethod
    def from_wire(cls, data: object) -> SyncPayload:
        """Parse what arrived on a sync channel; raises :class:`~nocluster.errors.MalformedMessage`."""
        what = "sync message"
        fields = wire_object(data, what)
        seq = wire_field(fields, "seq", int, what)
        if seq < 1:
            raise MalformedMessage(f"{what}: field 'seq' must be >= 1, got {seq}")
        message_id = wire_id(fields, "id", what) if "id" in fields else ""
        return cls(seq, wire_id(fields, "source", what), wire_json(fields, "message", what), message_id)


class SyncPlugin(Protocol):
    """What :meth:`SyncMessageManager.register_plugin` needs of a plugin."""

    name: str
    sync_debounce: float | None

    def handle_sync_message(self, message: Any) -> None: ...

    def resync(self, reason: str) -> None: ...


class SyncMessageManager(Component):
    """Sync messages between the instances of ``app.name``, on top of the pub/sub manager.

    Parameters:
      identity: this node (its instance id is the ``source`` of what it sends).
      pubsub: the pub/sub manager the messages travel on.
      debouncer: where debounced calls wait (the pub/sub manager's, started and stopped with it).
      debounce: default seconds over which equal messages make one call (``NOCLUSTER["SYNC"]["DEBOUNCE"]``).
      outbox: where messages published inside a transaction wait for its commit.
      metrics: records gaps and resyncs (default: nothing recorded).
    """

    def __init__(
        self, identity: NodeIdentity, pubsub: PubSubManager, debouncer: Debouncer, debounce: float, outbox: Outbox,
        metrics: SyncMetrics | None = None,
    ) -> None:  # fmt: skip
        self.identity = identity
        self.metrics = metrics if metrics is not None else SyncMetrics()
        self.pubsub = pubsub
        self.outbox = outbox
        self.debouncer = debouncer
        self.debounce = seconds(debounce, 'NOCLUSTER["SYNC"]["DEBOUNCE"]', allow_zero=True)
        pubsub.on_reconnect(self._on_reconnect)
        self._lock = threading.RLock()
        # Held from taking a sequence number to handing the message to the broker: two threads of this node
        # must not put seq N+1 on the wire before seq N (the receivers would see a gap and resync for nothing).
        self._send_lock = threading.Lock()
        self._subscriptions: dict[str, dict[Callback, SyncSubscription]] = {}
        self._receivers: dict[str, Callback] = {}
        self._sequences = SequenceCounter()
        self._gaps = GapDetector()
        self._recent = RecentIds(RECENT_IDS)

    # --- public API ----------------------------------------------------------------------------------
    def publish(self, channel: str, message: JSON, using: str | None = None) -> None:
        """Send ``message`` to the other instances' ``channel`` subscribers after the current transaction commits.

        Parameters:
          using: the database alias whose transaction gates the message (default database when None).

        Raises (at once, not at commit):
          TypeError: ``message`` is not JSON (names the channel). InvalidChannel: bad channel name.
          PublishError: outside a transaction, pub/sub could not take it.
        """
        validate_channel(channel)
        ensure_json(f"sync.{channel}", message)
        alias = using or DEFAULT_DB_ALIAS
        message_id = uuid.uuid4().hex
        if connections[alias].in_atomic_block:
            body: dict[str, JSON] = {"message": message}
            trace = tracing.carrier()
            if trace:
                body["trace"] = dict(trace)
            self.outbox.add(alias, "sync", channel, message_id, body)
        else:
            self._send(channel, message, message_id)

    def subscribe(
        self,
        channel: str,
        callback: Callback,
        debounce: float | None = None,
        resync: Callable[[str], Any] | None = None,
    ) -> None:
        """Call ``callback(message)`` for sync messages of ``channel`` from other instances.

        Parameters:
          debounce: seconds (default: ``NOCLUSTER["SYNC"]["DEBOUNCE"]``); equal messages within it make one call.
          resync: called with a reason when this node may have missed messages (a gap or a reconnect); when
            None, ``callback`` gets the resync marker (:func:`nocluster.sync.sequence.resync_marker`) instead.
        """
        validate_channel(channel)
        given = optional_seconds(debounce, f"sync channel {channel!r}: debounce", allow_zero=True)
        delay = self.debounce if given is None else given
        with self._lock:
            self._subscriptions.setdefault(channel, {})[callback] = SyncSubscription(callback, delay, resync)
            receiver = self._receivers.get(channel)
            if receiver is None:
                receiver = self._receivers[channel] = partial(self._receive, channel)
        self.pubsub.subscribe(f"sync.{channel}", receiver)

    def unsubscribe(self, channel: str, callback: Callback) -> None:
        """Stop calling ``callback`` for ``channel``."""
        with self._lock:
            callbacks = self._subscriptions.get(channel, {})
            callbacks.pop(callback, None)
            receiver = self._receivers.pop(channel, None) if not callbacks else None
            if not callbacks:
                self._subscriptions.pop(channel, None)
        if receiver is not None:
            self.pubsub.unsubscribe(f"sync.{channel}", receiver)

    def register_plugin(self, plugin: SyncPlugin) -> None:
        """Subscribe ``plugin.handle_sync_message`` on the plugin's channel, with ``plugin.resync`` (plugin runner).

        The debounce is the plugin's ``sync_debounce`` (seconds) when it sets one, else the setting's.
        """
        self.subscribe(
            plugin.name,
            plugin.handle_sync_message,
            debounce=plugin.sync_debounce,
            resync=plugin.resync,
        )

    def resync(self, channel: str | None = None, reason: str = "requested") -> None:
        """Make the subscribers of ``channel`` (every channel when None) reload their state (debounced)."""
        with self._lock:
            channels = [channel] if channel is not None else list(self._subscriptions)
        for name in channels:
            for subscription in self._subscriptions_of(name):
                key = ("sync-resync", name, subscription.callback)
                self.debouncer.push(key, subscription.debounce, partial(self._resync_one, name, subscription, reason))

    def after_fork(self) -> None:
        """In a forked child (a new instance): number its messages afresh and forget what the parent saw."""
        self._lock = threading.RLock()
        self._send_lock = threading.Lock()
        self._sequences = SequenceCounter()
        self._gaps = GapDetector()

    # --- internals -----------------------------------------------------------------------------------
    def _subscriptions_of(self, channel: str) -> list[SyncSubscription]:
        with self._lock:
            return list(self._subscriptions.get(channel, {}).values())

    def relay(self, row: OutboxMessage) -> None:
        """The outbox's sender of ``"sync"`` rows (the publishing node is spared, whoever relays)."""
        trace = tracing.from_wire(row.body.get("trace"))
        self._send(row.channel, row.body["message"], row.message_id, origin=row.origin, trace=trace)

    def _send(
        self, channel: str, message: JSON, message_id: str, origin: str = "", trace: dict[str, str] | None = None
    ) -> None:
        # The number is taken even if the publish fails: receivers then see a gap at the next one and resync.
        try:
            with self._send_lock:
                payload = SyncPayload(self._sequences.next(channel), self.identity.instance_id, message, message_id)
                self.pubsub.publish(f"sync.{channel}", payload.to_wire(), skip_self=True, origin=origin, trace=trace)
        except Exception:
            logger.warning("sync channel %r: message not sent by instance %s", channel, self.identity.instance_id)
            raise

    def _receive(self, channel: str, data: Any) -> None:
        try:
            payload = SyncPayload.from_wire(data)
        except MalformedMessage as exc:
            logger.error("sync channel %r: dropped on instance %s: %s", channel, self.identity.instance_id, exc)
            return
        if self._gaps.repeated(channel, payload.source, payload.seq) or (payload.id and self._recent.seen(payload.id)):
            logger.info("sync channel %r: repeated message %s dropped", channel, payload.id or payload.seq)
            return
        missed = self._gaps.observe(channel, payload.source, payload.seq)
        if missed:
            logger.warning(
                "sync channel %r: %d message(s) from %s missed by instance %s; resyncing",
                channel, missed, payload.source, self.identity.instance_id,
            )  # fmt: skip
            self.metrics.gap(channel)
            self.resync(channel, reason="gap")
        message = payload.message
        message_id = f"{payload.source}#{payload.seq}"
        for subscription in self._subscriptions_of(channel):
            if subscription.debounce > 0:
                # Called later, in the debounce thread: in the trace of the message that arrived.
                call = partial(
                    self._call_traced, tracing.current(), channel, subscription.callback, message, message_id
                )
                key = ("sync", channel, subscription.callback, canonical(message))
                self.debouncer.push(key, subscription.debounce, call)
            else:
                self._call_subscribed(channel, subscription.callback, message, message_id)

    def _on_reconnect(self) -> None:
        self._gaps.reset()
        self.resync(reason="reconnect")

    def _resync_one(self, channel: str, subscription: SyncSubscription, reason: str) -> None:
        if not self._subscribed(channel, subscription.callback):
            return
        logger.info("sync channel %r: resync (%s) on instance %s", channel, reason, self.identity.instance_id)
        self.metrics.resync(channel, reason)
        resync = subscription.resync
        if resync is not None:
            self._call(channel, lambda _: resync(reason), None, f"resync:{reason}")
        else:
            self._call(channel, subscription.callback, resync_marker(reason), f"resync:{reason}")

    def _subscribed(self, channel: str, callback: Callback) -> bool:
        with self._lock:
            return callback in self._subscriptions.get(channel, {})

    def _call_traced(self, saved: Any, channel: str, callback: Callback, message: Any, message_id: str) -> None:
        with tracing.attached(saved):
            self._call_subscribed(channel, callback, message, message_id)

    def _call_subscribed(self, channel: str, callback: Callback, message: Any, message_id: str) -> None:
        # A debounced call may fire after its callback was unsubscribed: it must not run then.
        if self._subscribed(channel, callback):
            self._call(channel, callback, message, message_id)

    def _call(self, channel: str, callback: Callback, message: Any, message_id: str) -> None:
        # Callbacks run on long-lived threads: give them a usable database connection, then let it go.
        close_old_connections()
        try:
            callback(message)
        except Exception:
            logger.exception(
                "sync callback %r raised on channel %r, instance %s", callback, channel, self.identity.instance_id
            )
        finally:
            close_old_connections()
