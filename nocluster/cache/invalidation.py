"""Near-cache invalidations between nodes, over pub/sub channel ``"cache.invalidate"``.

One channel for every near cache of the project; a node subscribes once, when it creates its first near cache.
Wire format (the pub/sub message)::

    {"seq": n, "source": instance_id, "cache": name, "keys": [key, ...]}   # keys set or deleted
    {"seq": n, "source": instance_id, "cache": name, "keys": null}         # the cache was reset

Sent with ``skip_self=True`` (the writer's own tier already holds what it wrote) right after the store write,
inside ``atomic()`` too: cache writes do not wait for a commit, so neither does their invalidation.

Lost messages are the danger: a node that missed one would serve the old value until its ttl. So, as for the
sync messages (:mod:`nocluster.sync.sequence`, whose counters this reuses), ``seq`` is numbered per sending
instance and a receiver that sees a gap clears every local tier of the node; a reconnect of the node's pub/sub
consumer clears them too; and while the consumer is not connected (not started, broker down, subscription not
bound yet) :meth:`CacheInvalidations.listening` is False and the near caches bypass their local tier, after
clearing it the first time they notice.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from nocluster.envelope import JSON, wire_field, wire_id, wire_object
from nocluster.errors import MalformedMessage

if TYPE_CHECKING:
    from nocluster.cache.local import LocalTier
    from nocluster.identity import NodeIdentity
    from nocluster.pubsub.manager import PubSubManager
    from nocluster.sync.sequence import GapDetector, SequenceCounter

logger = logging.getLogger("nocluster.cache")

CHANNEL = "cache.invalidate"


class CacheInvalidations:
    """This node's near-cache invalidations: sends its own, applies the others'.

    Parameters:
      identity: this node (its instance id is the ``source`` of what it sends).
      pubsub: the pub/sub manager the invalidations travel on.
    """

    def __init__(self, identity: NodeIdentity, pubsub: PubSubManager) -> None:
        self.identity = identity
        self.pubsub = pubsub
        self._lock = threading.Lock()
        # Held from taking a sequence number to handing the message to the broker, as the sync messages do:
        # seq N+1 on the wire before seq N would look like a gap and clear every tier for nothing.
        self._send_lock = threading.Lock()
        self._tiers: dict[str, LocalTier] = {}
        self._sequences, self._gaps = _sequence_tools()
        self._subscribed = False
        self._was_listening = False
        self.clears = 0  # how many times every tier was cleared (reconnects, gaps, disconnects): for tests and logs
        pubsub.on_reconnect(self._on_reconnect)

    def register(self, name: str, tier: LocalTier) -> None:
        """Apply invalidations of cache ``name`` to ``tier`` (subscribes the node on the first call)."""
        with self._lock:
            self._tiers[name] = tier
            first = not self._subscribed
        if first:
            # Returns once the subscription is bound when the consumer runs (else it is bound at start).
            self.pubsub.subscribe(CHANNEL, self._receive)
            self._subscribed = True

    def listening(self) -> bool:
        """True while this node receives invalidations: pub/sub started, connected and subscribed.

        The first call that finds it not listening after it was clears every tier: what arrives while the
        consumer is away is lost (Redis pub/sub) or late (RabbitMQ), so nothing in the tiers can be trusted.
        """
        pubsub = self.pubsub
        up = self._subscribed and pubsub.connected
        if up != self._was_listening:
            self._was_listening = up
            if not up:
                self._clear_all("pub/sub not connected")
        return up

    def publish(self, name: str, keys: list[str] | None) -> None:
        """Tell the other nodes that ``keys`` of cache ``name`` changed (None: the whole cache was reset).

        Raises:
          PublishError: pub/sub could not take it (the store was written: the others keep their old value until
            they see the gap at this node's next invalidation, reconnect, or the value's ttl passes).
        """
        with self._send_lock:
            message: dict[str, JSON] = {
                "seq": self._sequences.next(CHANNEL),
                "source": self.identity.instance_id,
                "cache": name,
                "keys": list(keys) if keys is not None else None,
            }
            self.pubsub.publish(CHANNEL, message, skip_self=True)

    def after_fork(self) -> None:
        """In a forked child (a new node, not yet listening): forget the parent's numbers and values."""
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._sequences, self._gaps = _sequence_tools()
        self._was_listening = False
        self._clear_all("fork")

    # --- internals -----------------------------------------------------------------------------------
    def _receive(self, data: Any) -> None:
        try:
            fields = wire_object(data, "cache invalidation")
            seq = wire_field(fields, "seq", int, "cache invalidation")
            source = wire_id(fields, "source", "cache invalidation")
            name = wire_field(fields, "cache", str, "cache invalidation")
            keys = fields.get("keys")
            if keys is not None and not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
                raise MalformedMessage("cache invalidation: field 'keys' must be a list of str or null")
        except MalformedMessage as exc:
            logger.error("cache invalidation dropped on instance %s: %s", self.identity.instance_id, exc)
            return
        missed = self._gaps.observe(CHANNEL, source, seq)
        if missed:
            logger.warning(
                "cache invalidations: %d missed from %s by instance %s; clearing every local tier",
                missed, source, self.identity.instance_id,
            )  # fmt: skip
            self._clear_all("gap")
        # A repeated message (RabbitMQ redelivers after a dropped connection) is applied again: that is harmless.
        with self._lock:
            tier = self._tiers.get(name)
        if tier is None:
            return
        if keys is None:
            tier.clear()
        else:
            tier.invalidate(keys)

    def _on_reconnect(self) -> None:
        self._gaps.reset()
        self._clear_all("reconnect")

    def _clear_all(self, reason: str) -> None:
        with self._lock:
            tiers = list(self._tiers.values())
            self.clears += 1
        for tier in tiers:
            tier.clear()
        if tiers:
            logger.info("near caches of instance %s cleared (%s)", self.identity.instance_id, reason)


def _sequence_tools() -> tuple[SequenceCounter, GapDetector]:
    """A sequence counter and a gap detector, the sync messages' own (not imported at load time: components do
    not load each other's modules, see tests/core/test_architecture.py; these two are plain data structures)."""
    from nocluster.sync.sequence import GapDetector, SequenceCounter

    return SequenceCounter(), GapDetector()
