"""``app.event_queue``: queued, retryable work on any node (SPEC.md, "Event queue").

The manager owns the policy: the ``{app.name}.`` prefix, the JSON check, refusing unknown channels, publishing
on commit, running a message with its abort signal, retries with backoff and the failed-message record. The
backend only carries messages (see :mod:`nocluster.queue.backend`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS, connections

from nocluster import tracing
from nocluster.durations import count, seconds
from nocluster.envelope import ensure_json, validate_channel
from nocluster.errors import NoclusterError, PublishError, QueueStopped, UnknownChannel
from nocluster.identity import NodeIdentity
from nocluster.lifecycle import Component
from nocluster.metrics.recorders import QueueMetrics
from nocluster.queue import failures
from nocluster.queue.backend import QueueBackend
from nocluster.queue.control import UNIQUE_KEY_LENGTH, QueueControl
from nocluster.queue.ledger import DedupeLedger
from nocluster.queue.message import Message, Process, Subscription
from nocluster.queue.parking import ParkedMessages
from nocluster.queue.rates import RateLimit, RateLimiter
from nocluster.queue.rates.backends.local import LocalRateLimiter
from nocluster.queue.rates.gate import take_slot
from nocluster.queue.routing import Routing, channel_list
from nocluster.queue.runner import Outcome, run_message
from nocluster.queue.signal import CANCELLED, AbortSignal
from nocluster.queue.stats import ChannelStats

if TYPE_CHECKING:
    from nocluster.models import FailedMessage, OutboxMessage
    from nocluster.outbox import Outbox

logger = logging.getLogger("nocluster.queue")


# The most retries a message may ask for.
MAX_RETRIES = 1000
# Messages of publish_many() per call to the backend (one Redis pipeline).
BATCH_SIZE = 500
# Seconds a unique key is held at most by default (a lost message frees it then).
UNIQUE_TTL = 3600.0
# Seconds before a message of a paused channel that a consumer took anyway is offered again.
PAUSE_RECHECK = 1.0
# Where a node's channels come from when its worker command does not say (NOCLUSTER_WORKER_CHANNELS).
CHANNELS_SETTING = 'NOCLUSTER["EVENT_QUEUE"]["CHANNELS"] (NOCLUSTER_WORKER_CHANNELS)'


class EventQueue(Component):
    """Publish work on a channel; a node subscribed to it runs ``process(payload, context)``.

    Parameters:
      identity: the node (its ``name`` prefixes channels; its instance id names it in logs and records).
      backend: a :class:`~nocluster.queue.backend.QueueBackend`.
      outbox: where messages published inside a transaction wait for its commit.
      control: the cluster-wide paused channels, cancels and unique keys (default: in the default database).
      parking: where a message waits out a delay longer than the backend's ``park_after`` (default: a table
        of the default database).
      rate_limiter: holds the channels' ``rate_limit`` (default: a process-local one).
      channels: the channels this node consumes (None: every subscribed one); checked when it starts.
      metrics: records published, run, retried, deferred and failed messages (default: nothing recorded).
    """

    def __init__(
        self,
        identity: NodeIdentity,
        backend: QueueBackend,
        outbox: Outbox,
        *,
        control: QueueControl | None = None,
        parking: ParkedMessages | None = None,
        rate_limiter: RateLimiter | None = None,
        channels: Sequence[str] | None = None,
        metrics: QueueMetrics | None = None,
    ) -> None:
        self.identity = identity
        self.metrics = metrics if metrics is not None else QueueMetrics()
        self.outbox = outbox
        self.rate_limiter = rate_limiter if rate_limiter is not None else LocalRateLimiter()
        self._routing = Routing(channel_list(channels, CHANNELS_SETTING), CHANNELS_SETTING)
        self.ledger = DedupeLedger(identity.name)
        self.control = control or QueueControl(identity.name)
        self.parking = parking or ParkedMessages(identity.name)
        self._stopped = False
        self.backend = backend
        self._subscriptions: dict[str, Subscription] = {}
        self._running: dict[str, AbortSignal] = {}
        self._lock = threading.Lock()
        backend.attach(self)

    # --- channels -------------------------------------------------------------------------------------
    def full_channel(self, channel: str) -> str:
        """The channel on the wire: ``"{app.name}.{channel}"``."""
        return f"{self.identity.name}.{channel}"

    def subscribe(
        self,
        channel: str,
        process: Process,
        concurrency: int = 1,
        idle: Callable[[], bool] | None = None,
        rate_limit: str | None = None,
    ) -> None:
        """Run ``process(payload, context)`` for messages of ``channel`` on this node's consumers.

        Parameters:
          channel: the channel name (letters, digits, ``_ . : -``), without the app prefix.
          process: called with the JSON payload and a :class:`~nocluster.queue.message.Context`.
          concurrency: at most this many ``process`` calls of this channel at once on one node (>= 1).
          idle: asked before this node takes a message; False leaves it queued (no retry is counted).
          rate_limit: ``"N/s"``, ``"N/m"`` or ``"N/h"``: at most N runs of the channel per second, minute or hour
            across every node using the same rate limiter (``NOCLUSTER["RATE_LIMITS"]``), spread evenly. A message
            over the limit waits (a near slot in place, a far one put aside), never spending a retry.

        Every process of the project registers the same subscriptions; only consumer processes run them.
        Subscribing a channel again replaces its process.
        """
        validate_channel(channel)
        count(concurrency, f"channel {channel!r}: concurrency", least=1, most=1000)
        if not callable(process) or (idle is not None and not callable(idle)):
            raise TypeError(f"channel {channel!r}: process and idle must be callable")
        limit = None if rate_limit is None else RateLimit.parse(rate_limit, f"channel {channel!r}: rate_limit")
        subscription = Subscription(channel, process, concurrency, idle, limit)
        with self._lock:
            self._subscriptions[channel] = subscription
        self.backend.register(self.full_channel(channel), subscription)

    def subscription(self, channel: str) -> Subscription:
        """The subscription of ``channel``; raises :class:`~nocluster.errors.UnknownChannel` if there is none."""
        try:
            return self._subscriptions[channel]
        except KeyError:
            raise UnknownChannel(
                f"event queue channel {channel!r} of app {self.identity.name!r} has no subscriber in this project "
                f"(subscribe it in a plugin's load(); known: {sorted(self._subscriptions)})"
            ) from None

    def channels(self) -> list[str]:
        """The subscribed channels (without prefix)."""
        return sorted(self._subscriptions)

    def route(self, channels: object, source: str) -> None:
        """Consume only ``channels`` on this node (``"a,b"`` or a list; None or empty keeps the routing it has);
        ``source`` names where they came from in errors (a worker option). Checked at once against the
        subscriptions: raises :class:`~nocluster.errors.UnknownChannel` (or ``InvalidChannel``) naming it."""
        routed = channel_list(channels, source)
        routing = self._routing if routed is None else Routing(routed, source)
        routing.check(self.channels())
        self._routing = routing

    def consumes(self, channel: str) -> bool:
        """Whether this node's routing lets it consume ``channel`` (without prefix)."""
        return self._routing.consumes(channel)

    def consumed_channels(self) -> list[str]:
        """The subscribed channels this process takes messages of: none in a process that does not consume (a web
        node on the Celery backend, a node not started), else those its routing allows."""
        if not self.backend.consuming():
            return []
        return [channel for channel in self.channels() if self.consumes(channel)]

    def depths(self) -> dict[str, int | None]:
        """Messages waiting per subscribed channel (None where the backend cannot tell)."""
        return {channel: self.backend.depth(self.full_channel(channel)) for channel in self.channels()}

    def channel_stats(self, channel: str) -> ChannelStats:
        """Depth, age of the oldest waiting message and consumers of ``channel`` now (None where the backend cannot
        tell: docs/metrics.md). Raises :class:`~nocluster.errors.UnknownChannel` for a channel nothing subscribed."""
        self.subscription(channel)
        return self.backend.channel_stats(self.full_channel(channel))

    def all_channel_stats(self) -> dict[str, ChannelStats]:
        """:meth:`channel_stats` of every subscribed channel, read together (on Celery over one broker connection,
        on Redis in one round trip). Raises if the backend cannot be reached."""
        full = {channel: self.full_channel(channel) for channel in self.channels()}
        stats = self.backend.all_channel_stats(list(full.values()))
        return {channel: stats[full_channel] for channel, full_channel in full.items()}

    # --- publishing ---------------------------------------------------------------------------------------
    def publish(
        self,
        channel: str,
        payload: Any,
        timeout: float = 15.0,
        max_retries: int = 0,
        using: str | None = None,
        *,
        delay: float | None = None,
        eta: datetime | None = None,
        unique_key: str | None = None,
        unique_ttl: float = UNIQUE_TTL,
    ) -> str:
        """Queue ``payload`` for ``channel``; return the message id.

        Parameters:
          payload: a JSON value (else ``TypeError`` naming the channel).
          timeout: seconds after which ``context.signal`` fires; the try then counts as failed.
          max_retries: further tries after a failure, with exponential backoff.
          using: the database alias of the caller's transaction: inside ``atomic()`` the message is written to
            the outbox in that transaction and relayed after the commit (by any node, until the broker took
            it), never after a rollback; outside one it goes out at once.
          delay: seconds from now before it may run; or ``eta``, an aware datetime (not both). It runs no
            earlier; a delay longer than the backend holds a message is carried in several shorter hops.
          unique_key: while a message published with this key is queued, delayed or running, publishing with
            the key again queues nothing and returns that message's id. The key frees when the message ends
            (done, failed for good, cancelled) or ``unique_ttl`` seconds after the publish, whichever is first.
            Kept in the default database, in the caller's transaction there (refused inside a transaction
            on another alias).

        Raises:
          UnknownChannel: nothing subscribed to ``channel``.
          TypeError: ``payload`` is not JSON, or ``timeout``/``max_retries`` is not a number (``bool`` included).
          ValueError: ``timeout`` or ``max_retries`` are out of range.
          PublishError: the broker refused the message or cannot be reached (outside a transaction).
          QueueStopped: this node's event queue was stopped.
        """
        self.subscription(channel)
        ensure_json(channel, payload)
        message = Message(
            channel, payload, *self._checked_limits(channel, timeout, max_retries),
            not_before=not_before(channel, delay, eta), unique_key=checked_unique_key(channel, unique_key),
            trace=tracing.carrier(),
        )  # fmt: skip
        if self._stopped:
            raise QueueStopped(
                f"queue channel {channel!r}: the event queue of node {self.identity.short_id} is stopped"
            )
        alias = using or DEFAULT_DB_ALIAS
        in_transaction = connections[alias].in_atomic_block
        ttl = seconds(unique_ttl, f"channel {channel!r}: unique_ttl")
        if message.unique_key:
            holder = self._claim(message, alias, in_transaction, ttl)
            if holder is not None:
                return holder
        try:
            if in_transaction and self.backend.database != alias:
                # In the caller's transaction: the outbox row commits or rolls back with the caller's data.
                message.relayed = True
                self.outbox.add(alias, "queue", channel, message.id, message.to_wire(), memo=message)
            else:
                # Outside a transaction, or a backend whose queue is a table of this very database.
                self._send(self.full_channel(channel), message)
                self.metrics.published(channel)
        except BaseException:
            if message.unique_key and not connections[DEFAULT_DB_ALIAS].in_atomic_block:
                self.control.release_unique(message.unique_key, message.id)
            raise
        return message.id

    def _claim(self, message: Message, alias: str, in_transaction: bool, ttl: float) -> str | None:
        """Hold ``message.unique_key`` for ``message``; None if it does now, else the id of the holder."""
        if in_transaction and alias != DEFAULT_DB_ALIAS:
            raise ValueError(
                f"queue channel {message.channel!r}: unique_key needs the {DEFAULT_DB_ALIAS!r} database, and this "
                f"publish is inside a transaction on {alias!r} (the key could not commit or roll back with it)"
            )
        holder = self.control.claim_unique(message.unique_key, message.id, ttl)
        if holder is not None:
            logger.debug("%s: unique key %r is held by %s; nothing queued", self.full_channel(message.channel),
                         message.unique_key, holder)  # fmt: skip
        return holder

    def publish_many(
        self,
        channel: str,
        payloads: Iterable[Any],
        timeout: float = 15.0,
        max_retries: int = 0,
        using: str | None = None,
    ) -> list[str]:
        """Queue one message per payload for ``channel``, in order, in fewer round trips than as many
        :meth:`publish` calls (on Redis one pipeline per ``BATCH_SIZE`` messages); return their ids.

        Each message is its own, as if published alone: its own id, tries, timeout and failed record. Inside
        ``atomic()`` they go to the outbox in the caller's transaction, as with :meth:`publish`. Every payload is
        checked before anything is sent: a bad one raises ``TypeError`` naming the channel and its index, and
        nothing is queued. If the broker fails midway (``PublishError``), the messages before the failure may
        have been queued.
        """
        self.subscription(channel)
        seconds_, retries = self._checked_limits(channel, timeout, max_retries)
        trace = tracing.carrier()
        messages = [Message(channel, self._checked_payload(channel, index, payload), seconds_, retries, trace=trace)
                    for index, payload in enumerate(payloads)]  # fmt: skip
        if self._stopped:
            raise QueueStopped(
                f"queue channel {channel!r}: the event queue of node {self.identity.short_id} is stopped"
            )
        alias = using or DEFAULT_DB_ALIAS
        if connections[alias].in_atomic_block and self.backend.database != alias:
            for message in messages:
                message.relayed = True
                self.outbox.add(alias, "queue", channel, message.id, message.to_wire(), memo=message)
            return [message.id for message in messages]
        self._send_many(channel, messages)
        self.metrics.published(channel, len(messages))
        return [message.id for message in messages]

    def _send_many(self, channel: str, messages: list[Message]) -> None:
        """Queue ``messages`` of ``channel`` now, ``BATCH_SIZE`` per call to the backend; raises ``PublishError``."""
        full_channel = self.full_channel(channel)
        for start in range(0, len(messages), BATCH_SIZE):
            batch = messages[start : start + BATCH_SIZE]
            try:
                self.backend.publish_many(full_channel, batch)
            except NoclusterError:
                raise
            except Exception as exc:
                raise PublishError(
                    f"queue channel {channel!r}: messages {start} to {start + len(batch) - 1} of the batch may not "
                    f"be queued (those before were): {type(exc).__name__}: {exc}"
                ) from exc

    @staticmethod
    def _checked_payload(channel: str, index: int, payload: Any) -> Any:
        try:
            return ensure_json(channel, payload)
        except TypeError as exc:
            raise TypeError(f"{exc} (payload {index} of the batch; nothing was queued)") from None

    def relay(self, row: OutboxMessage) -> None:
        """The outbox's sender of ``"queue"`` rows: queue the message the row holds (a new send id per send)."""
        message = dataclasses.replace(sent_form(row), send_id=uuid.uuid4().hex)
        self._send(self.full_channel(message.channel), message)
        self.metrics.published(message.channel)

    def relay_many(self, rows: Sequence[OutboxMessage]) -> None:
        """The outbox's batch sender: consecutive ``"queue"`` rows of one channel, in one batch when every one of
        them is due now (else one by one, so a delayed one is parked or sent with its countdown)."""
        messages = [dataclasses.replace(sent_form(row), send_id=uuid.uuid4().hex) for row in rows]
        now = time.time()
        if any(message.not_before > now for message in messages):
            for message in messages:
                self._send(self.full_channel(message.channel), message)
                self.metrics.published(message.channel)
            return
        self._send_many(messages[0].channel, messages)
        self.metrics.published(messages[0].channel, len(messages))

    def _checked_limits(self, channel: str, timeout: object, max_retries: object) -> tuple[float, int]:
        seconds_ = seconds(timeout, f"channel {channel!r}: timeout")
        problem = self.backend.check_timeout(seconds_)
        if problem:
            raise ValueError(f"channel {channel!r}: {problem}")
        return seconds_, count(max_retries, f"channel {channel!r}: max_retries", most=MAX_RETRIES)

    def send_later(self, full_channel: str, message: Message, delay: float) -> None:
        """Queue ``message`` again to run ``delay`` seconds from now (or at its ``not_before``, if later), parked in
        the database if that is further off than the backend's ``park_after``. Raises ``PublishError``."""
        self._send(full_channel, message, delay)

    def _send(self, full_channel: str, message: Message, delay: float = 0.0) -> None:
        delay = max(delay, message.not_before - time.time())
        if self.backend.park_after is not None and delay > self.backend.park_after and self._park(message, delay):
            return
        if self.backend.longest_delay is not None:
            delay = min(delay, self.backend.longest_delay)  # the rest in another hop (see execute)
        try:
            self.backend.publish(full_channel, message, delay=delay)
        except NoclusterError:
            raise
        except Exception as exc:
            raise PublishError(
                f"queue channel {message.channel!r}: message {message.id} not queued: {type(exc).__name__}: {exc}"
            ) from exc

    def _park(self, message: Message, delay: float) -> bool:
        try:
            self.parking.park(message, delay)
            return True
        except Exception as exc:
            logger.warning(
                "%s %s: could not park it for %.1f s (%s: %s); sent with a countdown instead",
                self.full_channel(message.channel), message.id, delay, type(exc).__name__,
                str(exc).splitlines()[0][:200], extra={"channel": message.channel, "message_id": message.id},
            )  # fmt: skip
            return False

    def release_parked(self) -> int:
        """Send the parked messages due within :data:`~nocluster.queue.parking.LEAD` seconds to the broker, with
        the rest of their delay; return how many (the release thread of a Celery worker calls this)."""
        return self.parking.release_due(
            lambda message, left: self._send(self.full_channel(message.channel), message, left)
        )

    # --- running (called by backends) ------------------------------------------------------------------------
    def deliver(self, message: Message, node: str, grace: float | None = None) -> Outcome:
        """Run ``message`` on this node and settle it: done, retried later, or recorded as failed.

        Parameters:
          node: who runs it (instance id or worker name), for logs and the failed record.
          grace: if set, work still running ``grace`` seconds after its timeout is stopped in its thread.
        """
        subscription = self.subscription(message.channel)
        outcome = self.execute(subscription, message, grace)
        self.settle(message, outcome, node)
        return outcome

    def execute(self, subscription: Subscription, message: Message, grace: float | None = None) -> Outcome:
        """Run ``process`` once with a fresh abort signal, registered for :meth:`cancel` while it runs.

        Before that, in order: a cancelled message is dropped (``"cancelled"``); one whose ``not_before`` is
        still ahead, or whose channel is paused, is queued again for later (``"deferred"``, no retry counted);
        a second copy of a relayed message that already ran is not run (``"duplicate"``).
        Raises :class:`~nocluster.errors.PublishError` if a deferred message could not be queued again.
        """
        held_back, second_copy = self._held_back(message)
        if held_back is not None:
            return held_back
        if second_copy is None:
            second_copy = self.ledger.is_second_copy(message)
        if second_copy:
            logger.warning(
                "%s %s: a second copy of a relayed message that already ran; dropped",
                self.full_channel(message.channel), message.id,
                extra={"channel": message.channel, "message_id": message.id},
            )  # fmt: skip
            return Outcome("duplicate")
        signal = AbortSignal()
        with self._lock:
            self._running[message.id] = signal
        try:
            outcome = run_message(subscription, message, signal, grace)
        finally:
            with self._lock:
                if self._running.get(message.id) is signal:
                    del self._running[message.id]
        self.metrics.ran(message.channel, outcome.duration)
        return outcome

    def _held_back(self, message: Message) -> tuple[Outcome | None, bool | None]:
        """The run gate: ``(outcome, second copy)``, the outcome None if ``message`` may run. Whether it is a
        second copy is read in the same query where the database can (else None: not read yet)."""
        full_channel = self.full_channel(message.channel)
        if message.not_before > time.time():
            self._send(full_channel, message)  # the rest of its delay
            self.metrics.deferred(message.channel)
            return Outcome("deferred"), None
        second_copy: bool | None = None
        try:
            claim = self.ledger.claim_sql(message)
            cancelled, paused, columns = self.control.run_gate(message.id, message.channel, claim)
            if claim is not None:
                second_copy = self.ledger.judge(message, bool(columns[0]), columns[1])
        except Exception as exc:
            # The database is down: work that does not need it goes on. The pause last read applies; a cancel
            # cannot be read and is not honoured (at least once wins over a cancel made during the outage).
            cancelled, paused = False, self.control.is_paused(message.channel)
            logger.warning("%s %s: cannot read whether it was cancelled (%s: %s); running it",
                           full_channel, message.id, type(exc).__name__, str(exc).splitlines()[0][:200],
                           extra={"channel": message.channel, "message_id": message.id})  # fmt: skip
        if cancelled:
            logger.info("%s %s: cancelled before it ran; dropped", full_channel, message.id,
                        extra={"channel": message.channel, "message_id": message.id})  # fmt: skip
            return Outcome("cancelled", "cancelled before it ran"), second_copy
        if paused:
            self._send(full_channel, message, delay=PAUSE_RECHECK)
            self.metrics.deferred(message.channel)
            return Outcome("deferred"), second_copy
        return None, second_copy

    def settle(self, message: Message, outcome: Outcome, node: str) -> None:
        """After a try: nothing to do, a retry with backoff, or a failed record (never a silent drop).

        A message that ended (done, cancelled) frees its unique key; a deferred or duplicate one does not.
        """
        if outcome.status == "failed":
            self.fail_or_retry(message, outcome.error, node)
            return
        if message.unique_key and outcome.status in ("done", "cancelled"):
            self.control.release_unique(message.unique_key, message.id)
        logger.debug("%s %s on %s: %s", self.full_channel(message.channel), message.id, node, outcome.status)

    def fail_or_retry(self, message: Message, error: str, node: str) -> None:
        """Publish the next try of ``message`` after its backoff, or record it as failed if none is left."""
        full_channel = self.full_channel(message.channel)
        if message.retried < message.max_retries:
            delay = self.backend.retry_delay(message.retried)
            logger.warning(
                "%s %s failed on %s (try %d of %d), retrying in %.1f s: %s",
                full_channel, message.id, node, message.retried + 1, message.max_retries + 1, delay,
                error.splitlines()[0] if error else "",
            )  # fmt: skip
            try:
                self._send(full_channel, message.next_try(), delay=delay)
                self.metrics.retried(message.channel)
                return
            except Exception as exc:
                error = f"{error}\n(retry could not be published: {type(exc).__name__}: {exc})"
        self.fail(message, error, node)

    def fail(self, message: Message, error: str, node: str) -> None:
        """Record ``message`` as failed with ``error`` (no retry); raise if the record cannot be written."""
        # The whole error the first time; its first line when settling again after the record could not be written.
        shown = error if not message.settle_attempts else error.splitlines()[0] if error else ""
        logger.error(
            "%s.%s %s failed on %s after %d tries: %s",
            self.identity.name, message.channel, message.id, node, message.retried + 1, shown,
            extra={"channel": message.channel, "message_id": message.id},
        )  # fmt: skip
        failures.record(self.identity.name, message, error, node)
        self.metrics.failed(message.channel)
        if message.unique_key:
            self.control.release_unique(message.unique_key, message.id)

    def rate_key(self, channel: str) -> str:
        """The rate limiter's key of ``channel``: ``"{app.name}:rate:{channel}"``."""
        return f"{self.identity.name}:rate:{channel}"

    def rate_slot(self, subscription: Subscription, message: Message, hold: float, longest_defer: float) -> float:
        """Before running ``message``: 0.0 once it may run (after waiting in place up to ``hold`` seconds for a
        booked slot of the channel's ``rate_limit``), else the seconds (at most ``longest_defer``) for which the
        backend puts it aside: published again with that delay, no retry counted (:mod:`.rates.gate`).

        A message that :meth:`execute` holds back anyway (not due yet, its channel paused) takes no slot.
        """
        if subscription.rate_limit is None:
            return 0.0
        if message.not_before > time.time() or self.control.is_paused(message.channel):
            return 0.0
        delay = take_slot(
            self.rate_limiter, self.rate_key(subscription.channel), subscription.rate_limit, hold=hold,
            longest_defer=longest_defer, what=f"{self.full_channel(message.channel)} {message.id}",
        )  # fmt: skip
        if delay:
            self.metrics.deferred(message.channel)  # the backend puts it aside for that long
        return delay

    # --- cancellation and pause ----------------------------------------------------------------------------------
    def cancel(self, message_id: str) -> bool:
        """Cancel message ``message_id`` for good: stored, so a queued or delayed copy is dropped before it runs,
        on any node, also after every node restarted; it frees the message's unique key. If the message runs in
        this process, its abort signal fires (True then).

        A try running on another node is stopped by :meth:`abort` there (``tasks`` sends that over pub/sub).
        """
        self.control.store_cancel(message_id)
        if self.backend.park_after is not None:
            self.parking.discard(message_id)
        return self.abort(message_id)

    def abort(self, message_id: str, reason: str = CANCELLED) -> bool:
        """Fire the abort signal of message ``message_id`` if it runs in this process; True if it did.

        Nothing is stored: a later delivery runs (use :meth:`cancel` for that).
        """
        with self._lock:
            signal = self._running.get(message_id)
        return bool(signal and signal.abort(reason))

    def pause(self, channel: str, by: str = "") -> None:
        """Pause ``channel`` on every node, persistently: its messages stay queued (none is lost or counted as
        a retry) until :meth:`resume`. Takes effect on every consumer within ``control.refresh`` seconds; tries
        already running finish. ``by`` is recorded (who paused it)."""
        self.subscription(channel)
        self.control.set_paused(channel, True, by)
        logger.warning("%s paused by %s", self.full_channel(channel), by or "?", extra={"channel": channel})

    def resume(self, channel: str, by: str = "") -> None:
        """Resume a paused ``channel``: its queued messages run again (within ``control.refresh`` seconds)."""
        self.subscription(channel)
        self.control.set_paused(channel, False, by)
        logger.warning("%s resumed by %s", self.full_channel(channel), by or "?", extra={"channel": channel})

    def is_paused(self, channel: str) -> bool:
        """Whether ``channel`` is paused (as this process read it at most ``control.refresh`` seconds ago)."""
        return self.control.is_paused(channel)

    def paused_channels(self, fresh: bool = False) -> list[str]:
        """The paused channels that are subscribed here (``fresh``: read the database now)."""
        return sorted(set(self.control.paused_channels(fresh)) & set(self._subscriptions))

    def running(self) -> list[str]:
        """Ids of the messages running in this process now."""
        with self._lock:
            return list(self._running)

    def requeue(self, failed: FailedMessage) -> str:
        """Publish the failed record ``failed`` again as a new message (same channel, payload, timeout,
        max_retries) and delete the record; return the new message id. The publish comes first: if it raises,
        the record stays."""
        message_id = self.publish(
            failed.channel, failed.payload, timeout=failed.timeout, max_retries=failed.max_retries
        )
        failed.delete()
        logger.info("failed message %s of %s re-queued as %s", failed.message_id, failed.channel, message_id)
        return message_id

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until nothing of this app is queued, delayed, held or running (``timeout`` seconds); True if so.

        For tests and tools (see :meth:`QueueBackend.drain`); parked messages count as delayed, and messages this
        process committed count until its outbox relay sent them.
        """
        deadline = time.monotonic() + timeout
        if not self.outbox.wait_handed_off(timeout):
            return False
        if self.backend.park_after is not None:
            while self.parking.count():
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
        return self.backend.drain(max(deadline - time.monotonic(), 0.0))

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start this process's consumers (in-process backends: worker threads; celery: nothing, workers consume)."""
        self._stopped = False
        self._routing.check(self.channels())
        self.backend.start()

    def stop(self) -> None:
        """Stop taking messages and wait for those in flight (see the backend); publishing then raises
        :class:`~nocluster.errors.QueueStopped` until the next :meth:`start`."""
        self._stopped = True
        self.backend.stop()

    def close(self) -> None:
        self.rate_limiter.close()

    def after_fork(self) -> None:
        # A lock held by a parent thread at fork time would never be released in the child: replace it.
        self._lock = threading.Lock()
        self._running = {}
        self.control.forget_paused()
        self.backend.after_fork()
        self.rate_limiter.after_fork()


def sent_form(row: OutboxMessage) -> Message:
    """The message an outbox row holds: the one it was written from, in the process that wrote it, else decoded."""
    return row.memo if isinstance(row.memo, Message) else Message.from_wire(row.body)


def not_before(channel: str, delay: object, eta: object) -> float:
    """The Unix time a message published now with ``delay`` seconds or at ``eta`` may run (0.0: at once)."""
    if delay is not None and eta is not None:
        raise TypeError(f"channel {channel!r}: pass delay or eta, not both")
    if eta is not None:
        if not isinstance(eta, datetime):
            raise TypeError(f"channel {channel!r}: eta must be a datetime, got {type(eta).__name__}")
        if eta.tzinfo is None or eta.utcoffset() is None:
            raise ValueError(f"channel {channel!r}: eta must be an aware datetime (django.utils.timezone.now())")
        return max(eta.timestamp(), time.time())
    if delay is None:
        return 0.0
    wait = seconds(delay, f"channel {channel!r}: delay", allow_zero=True)
    return time.time() + wait if wait else 0.0


def checked_unique_key(channel: str, unique_key: object) -> str:
    if unique_key is None:
        return ""
    if not isinstance(unique_key, str) or not unique_key or len(unique_key) > UNIQUE_KEY_LENGTH:
        raise TypeError(
            f"channel {channel!r}: unique_key must be a non-empty str of at most {UNIQUE_KEY_LENGTH} characters, "
            f"got {unique_key!r:.80}"
        )
    return unique_key
