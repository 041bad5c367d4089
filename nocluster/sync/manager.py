"""``app.sync_message_manager``: tell the other instances that a plugin's state changed, after the commit.

A sync message means "reload this", not "apply this delta": it travels on pub/sub channel ``"sync.{channel}"``
with ``skip_self=True`` (the sender already has the new state), is sent only once the database transaction
commits (``transaction.on_commit(..., robust=True)``; never after a rollback; at once outside a transaction),
and is debounced on the receiving side (``NOCLUSTER["SYNC"]["DEBOUNCE"]`` seconds, default 1).

Wire format (the pub/sub message): ``{"seq": n, "source": instance_id, "message": <the caller's JSON>}``.
Receivers check ``seq`` per publisher (:mod:`nocluster.sync.sequence`); a gap, or a reconnect of this node's
pub/sub consumer, makes every affected subscriber resync (``Plugin.resync()``, or the callback called with
the resync marker).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from django.db import transaction

from nocluster.db import close_old_connections
from nocluster.envelope import JSON, canonical, ensure_json, validate_channel
from nocluster.sync.sequence import GapDetector, SequenceCounter, resync_marker

if TYPE_CHECKING:
    from nocluster.app import Application
    from nocluster.plugin import Plugin
    from nocluster.pubsub.manager import PubSubManager

logger = logging.getLogger("nocluster.sync")

Callback = Callable[[Any], Any]


@dataclass
class SyncSubscription:
    callback: Callback
    debounce: float
    resync: Callable[[str], Any] | None = None


class SyncMessageManager:
    """Sync messages between the instances of ``app.name``, on top of ``app.pub_sub_manager``."""

    def __init__(self, app: Application) -> None:
        self.app = app
        self.debounce = float(app.config.get("SYNC", {}).get("DEBOUNCE", 1.0))
        self._lock = threading.RLock()
        # Held from taking a sequence number to handing the message to the broker: two threads of this node
        # must not put seq N+1 on the wire before seq N (the receivers would see a gap and resync for nothing).
        self._send_lock = threading.Lock()
        self._subscriptions: dict[str, dict[Callback, SyncSubscription]] = {}
        self._receivers: dict[str, Callback] = {}
        self._sequences = SequenceCounter()
        self._gaps = GapDetector()
        self._hooked = False

    @property
    def pubsub(self) -> PubSubManager:
        pubsub = self.app.pub_sub_manager
        if not self._hooked:
            pubsub.on_reconnect(self._on_reconnect)
            self._hooked = True
        return pubsub

    # --- public API ----------------------------------------------------------------------------------
    def publish(self, channel: str, message: JSON, using: str | None = None) -> None:
        """Send ``message`` to the other instances' ``channel`` subscribers after the current transaction commits.

        Parameters:
          using: the database alias whose transaction gates the message (default database when None).

        Raises (at once, not at commit):
          TypeError: ``message`` is not JSON (names the channel). InvalidChannel: bad channel name.
        """
        validate_channel(channel)
        ensure_json(f"sync.{channel}", message)
        transaction.on_commit(partial(self._send, channel, message), using=using, robust=True)

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
        delay = self.debounce if debounce is None else float(debounce)
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

    def register_plugin(self, plugin: Plugin) -> None:
        """Subscribe ``plugin.handle_sync_message`` on the plugin's channel, with ``plugin.resync`` (plugin runner).

        The debounce is the plugin's ``sync_debounce`` (seconds) when it sets one, else the setting's.
        """
        self.subscribe(
            plugin.name,
            plugin.handle_sync_message,  # type: ignore[attr-defined]
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
                self.pubsub.debouncer.push(
                    key, subscription.debounce, partial(self._resync_one, name, subscription, reason)
                )

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

    def _send(self, channel: str, message: JSON) -> None:
        # The number is taken even if the publish fails: receivers then see a gap at the next one and resync.
        try:
            with self._send_lock:
                payload = {"seq": self._sequences.next(channel), "source": self.app.instance_id, "message": message}
                self.pubsub.publish(f"sync.{channel}", payload, skip_self=True)
        except Exception:
            logger.exception("sync channel %r: message not sent by instance %s", channel, self.app.instance_id)
            raise

    def _receive(self, channel: str, payload: Any) -> None:
        if not isinstance(payload, dict) or not isinstance(payload.get("seq"), int) or "message" not in payload:
            logger.error(
                "sync channel %r: dropped a message without seq/message on instance %s", channel, self.app.instance_id
            )
            return
        missed = self._gaps.observe(channel, str(payload.get("source")), payload["seq"])
        if missed:
            logger.warning(
                "sync channel %r: %d message(s) from %s missed by instance %s; resyncing",
                channel,
                missed,
                payload.get("source"),
                self.app.instance_id,
            )
            self.resync(channel, reason="gap")
        message = payload["message"]
        message_id = f"{payload.get('source')}#{payload['seq']}"
        for subscription in self._subscriptions_of(channel):
            call = partial(self._call_subscribed, channel, subscription.callback, message, message_id)
            if subscription.debounce > 0:
                key = ("sync", channel, subscription.callback, canonical(message))
                self.pubsub.debouncer.push(key, subscription.debounce, call)
            else:
                call()

    def _on_reconnect(self) -> None:
        self._gaps.reset()
        self.resync(reason="reconnect")

    def _resync_one(self, channel: str, subscription: SyncSubscription, reason: str) -> None:
        if not self._subscribed(channel, subscription.callback):
            return
        logger.info("sync channel %r: resync (%s) on instance %s", channel, reason, self.app.instance_id)
        if subscription.resync is not None:
            self._call(channel, lambda _: subscription.resync(reason), None, f"resync:{reason}")  # type: ignore[misc]
        else:
            self._call(channel, subscription.callback, resync_marker(reason), f"resync:{reason}")

    def _subscribed(self, channel: str, callback: Callback) -> bool:
        with self._lock:
            return callback in self._subscriptions.get(channel, {})

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
                "sync callback %r raised on channel %r, instance %s", callback, channel, self.app.instance_id
            )
        finally:
            close_old_connections()
