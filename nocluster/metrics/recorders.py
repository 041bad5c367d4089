"""What the managers call to record metrics: one recorder per component.

Each base class records nothing: it is what a manager gets when metrics are off, so an instrumented path then
costs one call of an empty method (no label lookup, no lock). The ``Prometheus...`` subclasses record; they keep
each labelled child in a dict, so a hot path does one dict lookup and one increment, never a registry lookup.
"""

from __future__ import annotations

from typing import Any

from nocluster.identity import NodeIdentity
from nocluster.metrics.families import Families


class Children(dict[Any, Any]):
    """The labelled children of one metric, made on first use: ``children[label]`` or ``children[(a, b)]``."""

    def __init__(self, metric: Any) -> None:
        super().__init__()
        self.metric = metric

    def __missing__(self, key: Any) -> Any:
        child = self[key] = self.metric.labels(*key) if isinstance(key, tuple) else self.metric.labels(key)
        return child


class QueueMetrics:
    """The event queue's metrics, per channel (as the plugin named it, without the app prefix). Records nothing."""

    def published(self, channel: str, count: int = 1) -> None:
        """``count`` messages of ``channel`` went to the backend."""

    def ran(self, channel: str, duration: float) -> None:
        """One try of ``channel`` ran ``process`` for ``duration`` seconds."""

    def retried(self, channel: str) -> None:
        """A retry of ``channel`` was published."""

    def deferred(self, channel: str) -> None:
        """A message of ``channel`` was put back for later without counting a try."""

    def failed(self, channel: str) -> None:
        """A message of ``channel`` was recorded as failed."""


class PrometheusQueueMetrics(QueueMetrics):
    def __init__(self, families: Families) -> None:
        self._published = Children(families.queue_published)
        self._run = Children(families.queue_run)
        self._run_seconds = Children(families.queue_run_seconds)
        self._retried = Children(families.queue_retried)
        self._deferred = Children(families.queue_deferred)
        self._failed = Children(families.queue_failed)

    def published(self, channel: str, count: int = 1) -> None:
        self._published[channel].inc(count)

    def ran(self, channel: str, duration: float) -> None:
        self._run[channel].inc()
        self._run_seconds[channel].observe(duration)

    def retried(self, channel: str) -> None:
        self._retried[channel].inc()

    def deferred(self, channel: str) -> None:
        self._deferred[channel].inc()

    def failed(self, channel: str) -> None:
        self._failed[channel].inc()


class PubSubMetrics:
    """Pub/sub messages of this node, per channel. Records nothing."""

    def published(self, channel: str) -> None:
        """This node published a message on ``channel`` (to the broker, or to itself with ``only_self``)."""

    def received(self, channel: str) -> None:
        """This node received a message on ``channel`` and dispatched it to its subscribers."""

    def dropped_malformed(self, channel: str) -> None:
        """This node dropped a malformed envelope that came on ``channel``."""

    def after_fork(self) -> None:
        """In a forked child, a new node: its counts carry its own ``node`` label."""


class PrometheusPubSubMetrics(PubSubMetrics):
    """Labels each count with ``node``, the short instance id of this process (as logs show it)."""

    def __init__(self, families: Families, identity: NodeIdentity) -> None:
        self._families = families
        self._identity = identity
        self.after_fork()

    def after_fork(self) -> None:
        self._published = Children(self._families.pubsub_published)
        self._received = Children(self._families.pubsub_received)
        self._dropped = Children(self._families.pubsub_dropped_malformed)

    def published(self, channel: str) -> None:
        self._published[(channel, self._identity.short_id)].inc()

    def received(self, channel: str) -> None:
        self._received[(channel, self._identity.short_id)].inc()

    def dropped_malformed(self, channel: str) -> None:
        self._dropped[(channel, self._identity.short_id)].inc()


class SyncMetrics:
    """Sync message gaps and resyncs, per sync channel. Records nothing."""

    def gap(self, channel: str) -> None:
        """This node saw a gap in the sequence numbers of ``channel`` (it missed messages)."""

    def resync(self, channel: str, reason: str) -> None:
        """A subscriber of ``channel`` is made to resync (``reason``: gap, reconnect, requested)."""


class PrometheusSyncMetrics(SyncMetrics):
    def __init__(self, families: Families) -> None:
        self._gaps = Children(families.sync_gaps)
        self._resyncs = Children(families.sync_resyncs)

    def gap(self, channel: str) -> None:
        self._gaps[channel].inc()

    def resync(self, channel: str, reason: str) -> None:
        self._resyncs[(channel, reason)].inc()


class LockMetrics:
    """Lock acquisitions, wait and hold times, force releases (no key label: keys are unbounded). Records nothing."""

    def acquired(self, waited: float) -> None:
        """A lock was acquired after ``waited`` seconds."""

    def timed_out(self, waited: float) -> None:
        """An acquisition gave up after ``waited`` seconds."""

    def held(self, duration: float) -> None:
        """A lock was released after ``duration`` seconds held."""

    def force_released(self) -> None:
        """An operator force-released a lock."""


class PrometheusLockMetrics(LockMetrics):
    def __init__(self, families: Families) -> None:
        acquisitions = families.lock_acquisitions
        self._acquired, self._timed_out = acquisitions.labels("acquired"), acquisitions.labels("timeout")
        self._wait, self._hold = families.lock_wait_seconds, families.lock_hold_seconds
        self._force = families.lock_force_releases

    def acquired(self, waited: float) -> None:
        self._acquired.inc()
        self._wait.observe(waited)

    def timed_out(self, waited: float) -> None:
        self._timed_out.inc()

    def held(self, duration: float) -> None:
        self._hold.observe(duration)

    def force_released(self) -> None:
        self._force.inc()
