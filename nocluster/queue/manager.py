"""``app.event_queue``: queued, retryable work on any node (SPEC.md, "Event queue").

The manager owns the policy: the ``{app.name}.`` prefix, the JSON check, refusing unknown channels, publishing
on commit, running a message with its abort signal, retries with backoff and the failed-message record. The
backend only carries messages (see :mod:`nocluster.queue.backend`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS, connections

from nocluster.durations import count, seconds
from nocluster.envelope import ensure_json, validate_channel
from nocluster.errors import NoclusterError, PublishError, QueueStopped, UnknownChannel
from nocluster.identity import NodeIdentity
from nocluster.lifecycle import Component
from nocluster.queue import failures
from nocluster.queue.backend import QueueBackend
from nocluster.queue.ledger import DedupeLedger
from nocluster.queue.message import Message, Process, Subscription
from nocluster.queue.runner import Outcome, run_message
from nocluster.queue.signal import CANCELLED, AbortSignal

if TYPE_CHECKING:
    from nocluster.models import FailedMessage, OutboxMessage
    from nocluster.outbox import Outbox

logger = logging.getLogger("nocluster.queue")


# The most retries a message may ask for.
MAX_RETRIES = 1000
# Messages of publish_many() per call to the backend (one Redis pipeline).
BATCH_SIZE = 500


class EventQueue(Component):
    """Publish work on a channel; a node subscribed to it runs ``process(payload, context)``.

    Parameters:
      identity: the node (its ``name`` prefixes channels; its instance id names it in logs and records).
      backend: a :class:`~nocluster.queue.backend.QueueBackend`.
      outbox: where messages published inside a transaction wait for its commit.
    """

    def __init__(self, identity: NodeIdentity, backend: QueueBackend, outbox: Outbox) -> None:
        self.identity = identity
        self.outbox = outbox
        self.ledger = DedupeLedger(identity.name)
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
        self, channel: str, process: Process, concurrency: int = 1, idle: Callable[[], bool] | None = None
    ) -> None:
        """Run ``process(payload, context)`` for messages of ``channel`` on this node's consumers.

        Parameters:
          channel: the channel name (letters, digits, ``_ . : -``), without the app prefix.
          process: called with the JSON payload and a :class:`~nocluster.queue.message.Context`.
          concurrency: at most this many ``process`` calls of this channel at once on one node (>= 1).
          idle: asked before this node takes a message; False leaves it queued (no retry is counted).

        Every process of the project registers the same subscriptions; only consumer processes run them.
        Subscribing a channel again replaces its process.
        """
        validate_channel(channel)
        count(concurrency, f"channel {channel!r}: concurrency", least=1, most=1000)
        if not callable(process) or (idle is not None and not callable(idle)):
            raise TypeError(f"channel {channel!r}: process and idle must be callable")
        subscription = Subscription(channel, process, concurrency, idle)
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

    def depths(self) -> dict[str, int | None]:
        """Messages waiting per subscribed channel (None where the backend cannot tell)."""
        return {channel: self.backend.depth(self.full_channel(channel)) for channel in self.channels()}

    # --- publishing ---------------------------------------------------------------------------------------
    def publish(
        self, channel: str, payload: Any, timeout: float = 15.0, max_retries: int = 0, using: str | None = None
    ) -> str:
        """Queue ``payload`` for ``channel``; return the message id.

        Parameters:
          payload: a JSON value (else ``TypeError`` naming the channel).
          timeout: seconds after which ``context.signal`` fires; the try then counts as failed.
          max_retries: further tries after a failure, with exponential backoff.
          using: the database alias of the caller's transaction: inside ``atomic()`` the message is written to
            the outbox in that transaction and relayed after the commit (by any node, until the broker took
            it), never after a rollback; outside one it goes out at once.

        Raises:
          UnknownChannel: nothing subscribed to ``channel``.
          TypeError: ``payload`` is not JSON, or ``timeout``/``max_retries`` is not a number (``bool`` included).
          ValueError: ``timeout`` or ``max_retries`` are out of range.
          PublishError: the broker refused the message or cannot be reached (outside a transaction).
          QueueStopped: this node's event queue was stopped.
        """
        self.subscription(channel)
        ensure_json(channel, payload)
        message = Message(channel, payload, *self._checked_limits(channel, timeout, max_retries))
        if self._stopped:
            raise QueueStopped(
                f"queue channel {channel!r}: the event queue of node {self.identity.short_id} is stopped"
            )
        alias = using or DEFAULT_DB_ALIAS
        if connections[alias].in_atomic_block and self.backend.database != alias:
            # In the caller's transaction: the outbox row commits or rolls back with the caller's data.
            message.relayed = True
            self.outbox.add(alias, "queue", channel, message.id, message.to_wire())
        else:
            # Outside a transaction, or a backend whose queue is a table of this very database.
            self._send(self.full_channel(channel), message)
        return message.id

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
        messages = [Message(channel, self._checked_payload(channel, index, payload), seconds_, retries)
                    for index, payload in enumerate(payloads)]  # fmt: skip
        if self._stopped:
            raise QueueStopped(
                f"queue channel {channel!r}: the event queue of node {self.identity.short_id} is stopped"
            )
        alias = using or DEFAULT_DB_ALIAS
        if connections[alias].in_atomic_block and self.backend.database != alias:
            for message in messages:
                message.relayed = True
                self.outbox.add(alias, "queue", channel, message.id, message.to_wire())
            return [message.id for message in messages]
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
        return [message.id for message in messages]

    @staticmethod
    def _checked_payload(channel: str, index: int, payload: Any) -> Any:
        try:
            return ensure_json(channel, payload)
        except TypeError as exc:
            raise TypeError(f"{exc} (payload {index} of the batch; nothing was queued)") from None

    def relay(self, row: OutboxMessage) -> None:
        """The outbox's sender of ``"queue"`` rows: queue the message the row holds (a new send id per send)."""
        message = dataclasses.replace(Message.from_wire(row.body), send_id=uuid.uuid4().hex)
        self._send(self.full_channel(message.channel), message)

    def _checked_limits(self, channel: str, timeout: object, max_retries: object) -> tuple[float, int]:
        seconds_ = seconds(timeout, f"channel {channel!r}: timeout")
        problem = self.backend.check_timeout(seconds_)
        if problem:
            raise ValueError(f"channel {channel!r}: {problem}")
        return seconds_, count(max_retries, f"channel {channel!r}: max_retries", most=MAX_RETRIES)

    def _send(self, full_channel: str, message: Message, delay: float = 0.0) -> None:
        try:
            self.backend.publish(full_channel, message, delay=delay)
        except NoclusterError:
            raise
        except Exception as exc:
            raise PublishError(
                f"queue channel {message.channel!r}: message {message.id} not queued: {type(exc).__name__}: {exc}"
            ) from exc

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

        A second copy of a relayed message that already ran is not run (``"duplicate"``).
        """
        if self.ledger.is_second_copy(message):
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
            return run_message(subscription, message, signal, grace)
        finally:
            with self._lock:
                if self._running.get(message.id) is signal:
                    del self._running[message.id]

    def settle(self, message: Message, outcome: Outcome, node: str) -> None:
        """After a try: nothing to do, a retry with backoff, or a failed record (never a silent drop)."""
        if outcome.status == "failed":
            self.fail_or_retry(message, outcome.error, node)
            return
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

    # --- cancellation ------------------------------------------------------------------------------------------
    def cancel(self, message_id: str, reason: str = CANCELLED) -> bool:
        """Fire the abort signal of message ``message_id`` if it runs in this process; True if it did.

        Cancellation from another node goes over pub/sub (see ``tasks``); each node calls this.
        """
        with self._lock:
            signal = self._running.get(message_id)
        return bool(signal and signal.abort(reason))

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

        For tests and tools (see :meth:`QueueBackend.drain`).
        """
        return self.backend.drain(timeout)

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start this process's consumers (in-process backends: worker threads; celery: nothing, workers consume)."""
        self._stopped = False
        self.backend.start()

    def stop(self) -> None:
        """Stop taking messages and wait for those in flight (see the backend); publishing then raises
        :class:`~nocluster.errors.QueueStopped` until the next :meth:`start`."""
        self._stopped = True
        self.backend.stop()

    def after_fork(self) -> None:
        # A lock held by a parent thread at fork time would never be released in the child: replace it.
        self._lock = threading.Lock()
        self._running = {}
        self.backend.after_fork()
