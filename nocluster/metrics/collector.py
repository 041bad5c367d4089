"""The gauges read at scrape time: queue depth, oldest age and consumers per channel, the outbox backlog, nodes up.

They describe the cluster, not this process, so they are computed when scraped (a ``prometheus_client`` custom
collector) instead of being written to the multiprocess files. Each part that fails (a broker or the database
down) is logged and left out of that scrape; the rest is served.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nocluster.queue.stats import ChannelStats

logger = logging.getLogger("nocluster.metrics")


class QueueSource(Protocol):
    def all_channel_stats(self) -> dict[str, ChannelStats]: ...


class OutboxSource(Protocol):
    def backlog(self) -> dict[str, Any]: ...


class ClusterCollector(Collector):
    """Gauges of the event queue's channels, the outbox and the node registry.

    Parameters:
      queue: the event queue (:meth:`~nocluster.queue.EventQueue.all_channel_stats`: every subscribed channel).
      outbox: the outbox (``backlog()``).
      nodes: returns the registered nodes, each a dict with ``role`` and ``state`` (the node registry's ``nodes``).
    """

    def __init__(self, queue: QueueSource, outbox: OutboxSource, nodes: Callable[[], list[dict[str, Any]]]) -> None:
        self.queue = queue
        self.outbox = outbox
        self.nodes = nodes

    def collect(self) -> Iterator[Metric]:
        for part in (self._queue, self._outbox, self._nodes):
            try:
                found = list(part())
            except Exception as exc:
                logger.warning("metrics: %s left out of this scrape: %s: %s", part.__name__.strip("_"),
                               type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")  # fmt: skip
                continue
            yield from found

    def _queue(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "nocluster_queue_depth", "Event queue messages waiting (not running)", labels=["channel"]
        )
        age = GaugeMetricFamily(
            "nocluster_queue_oldest_age_seconds", "Seconds since the oldest waiting message was published",
            labels=["channel"],
        )  # fmt: skip
        consumers = GaugeMetricFamily(
            "nocluster_queue_consumers", "Consumers of the channel's queue (as the backend counts them)",
            labels=["channel"],
        )  # fmt: skip
        for channel, stats in self.queue.all_channel_stats().items():
            for family, value in ((depth, stats.depth), (age, stats.oldest_age), (consumers, stats.consumers)):
                if value is not None:
                    family.add_metric([channel], value)
        yield from (depth, age, consumers)

    def _outbox(self) -> Iterator[Metric]:
        backlog = self.outbox.backlog()
        yield GaugeMetricFamily("nocluster_outbox_backlog", "Outbox rows not yet relayed", value=backlog["pending"])
        age = GaugeMetricFamily(
            "nocluster_outbox_oldest_age_seconds", "Seconds since the oldest outbox row was written"
        )
        if backlog["oldest_seconds"] is not None:
            age.add_metric([], backlog["oldest_seconds"])
        yield age

    def _nodes(self) -> Iterator[Metric]:
        up = Counter(str(node["role"]) for node in self.nodes() if node["state"] == "up")
        family = GaugeMetricFamily("nocluster_nodes_up", "Nodes up in the node registry, by role", labels=["role"])
        for role, count in sorted(up.items()):
            family.add_metric([role], count)
        yield family
