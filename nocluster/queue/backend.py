"""The event queue backend interface: the wire only. Policy (prefix, JSON check, retries, failures) is the manager's.

A backend carries :class:`~nocluster.queue.message.Message` objects to the consumers of a channel and, when
a node takes one, calls back into its :class:`QueueListener` (the manager), which runs it and decides what
happens next (done, retry through :meth:`QueueBackend.publish` with a delay, or a failed record).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

from nocluster.identity import NodeIdentity
from nocluster.metrics.recorders import QueueMetrics
from nocluster.queue.message import Message, Subscription
from nocluster.queue.runner import Outcome
from nocluster.queue.stats import ChannelStats


class QueueListener(Protocol):
    """What a backend calls back into: the :class:`~nocluster.queue.manager.EventQueue` that owns it."""

    identity: NodeIdentity
    metrics: QueueMetrics

    def full_channel(self, channel: str) -> str:
        """``"{app.name}.{channel}"``."""
        ...

    def channels(self) -> list[str]:
        """The subscribed channels (without prefix)."""
        ...

    def subscription(self, channel: str) -> Subscription:
        """The subscription of ``channel``; raises ``UnknownChannel`` if there is none."""
        ...

    def deliver(self, message: Message, node: str, grace: float | None = None) -> Outcome:
        """Run ``message`` here and settle it (done, retry, failed record)."""
        ...

    def consumes(self, channel: str) -> bool:
        """Whether this node's routing lets it consume ``channel`` (without prefix)."""
        ...

    def route(self, channels: object, source: str) -> None:
        """Consume only ``channels`` (None: keep the routing); raises naming ``source`` for an unknown one."""
        ...

    def consumed_channels(self) -> list[str]:
        """The subscribed channels this process takes messages of."""
        ...

    def rate_slot(self, subscription: Subscription, message: Message, hold: float, longest_defer: float) -> float:
        """0.0 once ``message`` may run under its channel's rate limit, else seconds to put it aside for."""
        ...

    def execute(self, subscription: Subscription, message: Message, grace: float | None = None) -> Outcome:
        """Run ``message`` once, without settling it."""
        ...

    def send_later(self, full_channel: str, message: Message, delay: float) -> None:
        """Queue ``message`` again, to run ``delay`` seconds from now (parked if the backend says so)."""
        ...

    def release_parked(self) -> int:
        """Send the parked messages that are due soon; return how many."""
        ...

    def settle(self, message: Message, outcome: Outcome, node: str) -> None:
        """After a try: nothing, a retry with backoff, or a failed record."""
        ...

    def fail_or_retry(self, message: Message, error: str, node: str) -> None:
        """Publish the next try of ``message`` after its backoff, or record it as failed."""
        ...

    def fail(self, message: Message, error: str, node: str) -> None:
        """Record ``message`` as failed (no retry)."""
        ...

    def is_paused(self, channel: str) -> bool:
        """Whether ``channel`` is paused cluster-wide (read at most a second ago)."""
        ...

    def paused_channels(self, fresh: bool = False) -> list[str]:
        """The paused subscribed channels (``fresh``: read now)."""
        ...


class QueueBackend(ABC):
    """Base class of event queue backends.

    Attributes (seconds):
      max_timeout: the longest message timeout this backend accepts (None: no limit).
      database: the database alias holding the queue, for a backend whose queue is a table (else None).
      grace: how long work that ignores its abort signal may go on before the backend stops it.
      retry_backoff, retry_backoff_max: the delay before try n+1 is ``min(retry_backoff * 2**n, retry_backoff_max)``.
      longest_delay: the longest delay one publish may carry (None: no limit); the manager carries a longer one
        in several hops.
      park_after: a message to be sent later than this is kept in the database meanwhile, not in the backend
        (:mod:`nocluster.queue.parking`); None: the backend keeps delayed messages itself.
      rate_hold: how long a node waits in place for a booked slot of a channel's rate limit.
      longest_defer: the longest a message over its rate limit is put aside for before it asks again.
      publish_waits: ``publish`` returns only once the broker confirmed the message (a round trip, and a disk
        write for a durable one): the outbox then sends from its relay thread, not the committing one.
    """

    max_timeout: float | None = None
    # The database alias whose table holds the queue (None: a broker or memory). Publishing inside a transaction
    # on that alias is transactional already, so the manager skips the outbox.
    database: str | None = None
    grace: float = 5.0
    retry_backoff: float = 1.0
    retry_backoff_max: float = 60.0
    longest_delay: float | None = None
    park_after: float | None = None
    rate_hold: float = 1.0
    longest_defer: float = 60.0
    publish_waits: bool = False

    manager: QueueListener

    def attach(self, manager: QueueListener) -> None:
        """Called once by the manager that owns this backend."""
        self.manager = manager

    @abstractmethod
    def register(self, full_channel: str, subscription: Subscription) -> None:
        """Consume ``full_channel`` (``"{app.name}.{channel}"``) for ``subscription`` once started."""

    @abstractmethod
    def publish(self, full_channel: str, message: Message, delay: float = 0.0) -> None:
        """Queue ``message`` on ``full_channel``, to be taken no sooner than ``delay`` seconds from now.

        Returns after the message is queued (for a broker: accepted by it).
        """

    def publish_many(self, full_channel: str, messages: Sequence[Message]) -> None:
        """Queue ``messages`` on ``full_channel``, in order; returns after every one is queued.

        The default publishes one after another; a broker backend sends them in fewer round trips. If it raises,
        any prefix of the messages may have been queued.
        """
        for message in messages:
            self.publish(full_channel, message)

    @abstractmethod
    def drain(self, timeout: float = 10.0) -> bool:
        """Wait up to ``timeout`` seconds until no message of this app is queued, delayed, held or running
        anywhere; True if that happened.

        For tests and tools: once it returns True, nothing published before can still run (a retry is queued
        before its try is acknowledged), so a test can assert that something did *not* happen.
        """

    def start(self) -> None:  # noqa: B027 (an optional hook: a no-op by default)
        """Start this process's consumers (no-op for backends whose consumers run elsewhere)."""

    def stop(self) -> None:  # noqa: B027 (an optional hook: a no-op by default)
        """Stop taking messages, finish or hand back what is in flight, close connections."""

    def after_fork(self) -> None:  # noqa: B027 (an optional hook: a no-op by default)
        """In a forked child: forget threads and connections inherited from the parent."""

    def consuming(self) -> bool:
        """Whether this process takes messages (in-process backends once started; Celery: a worker's processes)."""
        return False

    def depth(self, full_channel: str) -> int | None:
        """Messages waiting on ``full_channel`` (not running), or None when the backend cannot tell."""
        return None

    def channel_stats(self, full_channel: str) -> ChannelStats:
        """Depth, age of the oldest waiting message and consumers of ``full_channel`` (None where unknown).

        The default knows the depth only (:meth:`depth`); a backend that can tell more overrides this.
        """
        return ChannelStats(self.depth(full_channel))

    def all_channel_stats(self, full_channels: Sequence[str]) -> dict[str, ChannelStats]:
        """:meth:`channel_stats` of each of ``full_channels``, read together where the backend can (a scrape or the
        Cluster page asks for every channel at once). Raises if the backend cannot be reached."""
        return {full_channel: self.channel_stats(full_channel) for full_channel in full_channels}

    def ping(self) -> None:  # noqa: B027 (in-process backends have no server to reach)
        """Raise if this backend's server cannot be reached (for ``manage.py cluster``)."""

    def durability_warnings(self) -> list[str]:
        """What in the server's configuration could lose queued messages (for ``manage.py cluster`` and
        ``check --deploy``); empty when nothing is known to."""
        return []

    def retry_delay(self, retried: int) -> float:
        """Seconds to wait before the try after try number ``retried`` (0 = the first try) failed."""
        return float(min(self.retry_backoff * (2**retried), self.retry_backoff_max))

    def check_timeout(self, timeout: float) -> str | None:
        """Return why ``timeout`` (seconds) cannot be used with this backend, or None if it can."""
        if self.max_timeout is not None and timeout > self.max_timeout:
            return f"timeout {timeout} s exceeds the longest this queue allows ({self.max_timeout} s)"
        return None
