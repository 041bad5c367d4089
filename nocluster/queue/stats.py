"""What a queue channel looks like now: :class:`ChannelStats` (``EventQueue.channel_stats``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChannelStats:
    """One channel of the event queue, as its backend sees it now; None where the backend cannot tell.

    Attributes:
      depth: messages waiting (not running).
      oldest_age: seconds the oldest waiting message has waited (from its first publish on the memory and Celery
        on Redis backends, from the write of its row on the database one; docs/metrics.md).
      consumers: consumers of the channel's queue (RabbitMQ: consumer connections; in-process backends: this
        process's worker threads).
    """

    depth: int | None
    oldest_age: float | None = None
    consumers: int | None = None
