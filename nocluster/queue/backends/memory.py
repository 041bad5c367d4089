"""MemoryQueueBackend: the event queue in this process, on named worker threads. For tests and one-process tools.

Limits, by design: messages live in this process's memory only. They are lost when the process exits or
crashes, and another process never sees them (each node runs what it publishes). The embedded default is the
database backend (:mod:`nocluster.queue.backends.database`); in a cluster use the celery backend.
``drain(timeout)`` waits until everything queued has run, for tests.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field

from django.db import connections

from nocluster.db import close_old_connections
from nocluster.durations import seconds
from nocluster.queue.backend import QueueBackend
from nocluster.queue.message import Message, Subscription
from nocluster.queue.stats import ChannelStats

logger = logging.getLogger("nocluster.queue.memory")


@dataclass
class _Channel:
    full_name: str
    subscription: Subscription
    ready: list[tuple[float, int, Message]] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    in_flight: int = 0


class MemoryQueueBackend(QueueBackend):
    """In-process queue: per channel a heap of messages (by due time) and ``concurrency`` worker threads.

    Options (seconds):
      poll_interval: how often a worker asks ``idle()`` again while it says False.
      grace: work still running this long after its timeout is stopped in its thread (see ``runner``).
      retry_backoff, retry_backoff_max: retry delays, ``min(retry_backoff * 2**n, retry_backoff_max)``.
      stop_timeout: how long ``stop()`` waits for each worker thread to finish its message.
    """

    def __init__(
        self,
        *,
        poll_interval: float = 0.1,
        grace: float = 5.0,
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        option = "MemoryQueueBackend option"
        self.poll_interval = seconds(poll_interval, f"{option} poll_interval")
        self.grace = seconds(grace, f"{option} grace")
        self.retry_backoff = seconds(retry_backoff, f"{option} retry_backoff", allow_zero=True)
        self.retry_backoff_max = seconds(retry_backoff_max, f"{option} retry_backoff_max", allow_zero=True)
        self.stop_timeout = seconds(stop_timeout, f"{option} stop_timeout")
        self._reset()

    def _reset(self) -> None:
        self._channels: dict[str, _Channel] = {}
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._started = False
        self._stopping = False

    # --- the contract -----------------------------------------------------------------------------------
    def register(self, full_channel: str, subscription: Subscription) -> None:
        with self._cond:
            channel = self._channels.get(full_channel)
            if channel is not None:
                # Subscribed again (maybe with another concurrency): more threads if it grew; if it shrank,
                # _take keeps the extra ones waiting.
                channel.subscription = subscription
                if self._started:
                    self._spawn(channel)
                return
            channel = self._channels[full_channel] = _Channel(full_channel, subscription)
            if self._started:
                self._spawn(channel)

    def publish(self, full_channel: str, message: Message, delay: float = 0.0) -> None:
        # A copy through JSON, as a broker would make: neither the publisher's later changes to its payload
        # nor one try's changes reach the next try or the failed record.
        message = Message.from_wire(json.loads(json.dumps(message.to_wire())))
        with self._cond:
            channel = self._channels[full_channel]
            heapq.heappush(channel.ready, (time.monotonic() + max(delay, 0.0), next(self._seq), message))
            self._cond.notify_all()

    def start(self) -> None:
        with self._cond:
            if self._started:
                return
            self._started = True
            self._stopping = False
            for channel in self._channels.values():
                self._spawn(channel)

    def stop(self) -> None:
        """Stop the workers once their current message is done (queued messages stay in memory, unrun)."""
        with self._cond:
            if not self._started:
                return
            self._stopping = True
            self._cond.notify_all()
            threads = [thread for channel in self._channels.values() for thread in channel.threads]
        for thread in threads:
            thread.join(self.stop_timeout)
            if thread.is_alive():
                logger.error("queue worker %s did not stop within %s s", thread.name, self.stop_timeout)
        with self._cond:
            for channel in self._channels.values():
                channel.threads = [thread for thread in channel.threads if thread.is_alive()]
            self._started = False
            left = {name: len(channel.ready) for name, channel in self._channels.items() if channel.ready}
        if left:
            logger.warning("memory queue stopped with messages not run (lost at exit): %s", left)

    def after_fork(self) -> None:
        # The parent's threads are gone and its queued messages are the parent's to run.
        subscriptions = {name: channel.subscription for name, channel in self._channels.items()}
        self._reset()
        for name, subscription in subscriptions.items():
            self._channels[name] = _Channel(name, subscription)

    def consuming(self) -> bool:
        return self._started

    # --- for tests ------------------------------------------------------------------------------------
    def drain(self, timeout: float = 10.0) -> bool:
        """Wait up to ``timeout`` seconds until no message is queued or running; True if that happened."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(channel.ready or channel.in_flight for channel in self._channels.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.1))
            return True

    def depth(self, full_channel: str) -> int:
        """Messages waiting on ``full_channel`` (not running)."""
        with self._cond:
            return len(self._channels[full_channel].ready)

    def channel_stats(self, full_channel: str) -> ChannelStats:
        """Waiting messages (delayed ones included), the oldest one's age since its first publish, and this
        process's worker threads of the channel."""
        with self._cond:
            channel = self._channels[full_channel]
            first = min((message.published_at for _, _, message in channel.ready), default=None)
            threads = sum(1 for thread in channel.threads if thread.is_alive())
            depth = len(channel.ready)
        return ChannelStats(depth, None if first is None else max(time.time() - first, 0.0), threads)

    # --- workers ----------------------------------------------------------------------------------------
    def _spawn(self, channel: _Channel) -> None:
        if not self.manager.consumes(channel.subscription.channel):
            return  # routed elsewhere (NOCLUSTER_WORKER_CHANNELS)
        alive = [thread for thread in channel.threads if thread.is_alive()]
        for index in range(len(alive), channel.subscription.concurrency):
            thread = threading.Thread(
                target=self._work, args=(channel,), name=f"queue-{channel.full_name}-{index}", daemon=True
            )
            alive.append(thread)
            thread.start()
        channel.threads = alive

    def _work(self, channel: _Channel) -> None:
        try:
            while True:
                message = self._take(channel)
                if message is None:
                    return
                if self._rate_limited(channel, message):
                    continue
                try:
                    self.manager.deliver(message, node=self.manager.identity.instance_id, grace=self.grace)
                except Exception:
                    logger.exception("queue %s: message %s could not be settled", channel.full_name, message.id)
                finally:
                    close_old_connections()
                    with self._cond:
                        channel.in_flight -= 1
                        self._cond.notify_all()
        finally:
            connections.close_all()

    def _take(self, channel: _Channel) -> Message | None:
        """The next due message once this node is idle for the channel; None when stopping."""
        while True:
            with self._cond:
                if self._stopping:
                    return None
                now = time.monotonic()
                if not channel.ready or channel.ready[0][0] > now:
                    wait = channel.ready[0][0] - now if channel.ready else self.poll_interval * 10
                    self._cond.wait(min(max(wait, 0.001), 1.0))
                    continue
            if not self._is_idle(channel):
                with self._cond:
                    self._cond.wait(self.poll_interval)
                continue
            with self._cond:
                due = channel.ready and channel.ready[0][0] <= time.monotonic() and not self._stopping
                if due and channel.in_flight < channel.subscription.concurrency:
                    channel.in_flight += 1
                    return heapq.heappop(channel.ready)[2]
                if due:
                    self._cond.wait(self.poll_interval)

    def _rate_limited(self, channel: _Channel, message: Message) -> bool:
        """Wait for the channel's rate limit; put ``message`` back, due later, when its slot is far (True)."""
        delay = self.manager.rate_slot(channel.subscription, message, self.rate_hold, self.longest_defer)
        if not delay:
            return False
        with self._cond:
            heapq.heappush(channel.ready, (time.monotonic() + delay, next(self._seq), message))
            channel.in_flight -= 1
            self._cond.notify_all()
        return True

    def _is_idle(self, channel: _Channel) -> bool:
        """``idle()`` of the subscription; a paused channel is never idle (its messages stay queued)."""
        if self.manager.is_paused(channel.subscription.channel):
            return False
        try:
            return channel.subscription.is_idle()
        except Exception:
            logger.exception("queue %s: idle() raised; treating this node as busy", channel.full_name)
            return False
