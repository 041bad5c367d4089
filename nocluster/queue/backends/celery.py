"""CeleryQueueBackend: the event queue on Celery, RabbitMQ or Redis (``celery -A nocluster.celery worker``).

One shared task (``nocluster.queue.deliver``) carries every message as JSON; each channel is its own Celery
queue ``"{app.name}.{channel}"``, which workers consume for every subscribed channel. The reliability
settings (late ack, reject and retry on worker lost, prefetch 1, publisher confirms, the Redis visibility
timeout) are in :mod:`nocluster.celery`. Here:

- timeout: ``context.signal`` fires at the timeout (a timer in the pool process); the Celery soft time limit
  (timeout + grace) raises ``SoftTimeLimitExceeded`` in work that ignored it, and the hard limit
  (timeout + 2 x grace) kills the pool process. Either way the try counts as failed: retried or recorded.
- concurrency: a per-node file-lock semaphore (:mod:`nocluster.queue.slots`); a node whose slots are full, or
  whose ``idle()`` says False, publishes the message again after ``defer_delay`` seconds and acks this copy,
  without counting a retry.
- a pool process killed mid-task: Celery retries the message (``task_retry_on_worker_lost``) up to
  ``WORKER_LOST_RETRIES`` times, then it is recorded as failed; a whole worker killed: the broker redelivers
  (RabbitMQ at once, Redis after the visibility timeout).
"""

from __future__ import annotations

import logging
import os
import socket
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any

from celery import signals
from celery.exceptions import Reject, TimeLimitExceeded, WorkerLostError
from kombu import Exchange, Queue

from nocluster.errors import UnknownChannel
from nocluster.queue.backend import QueueBackend
from nocluster.queue.message import Message, Subscription
from nocluster.queue.slots import node_slot

if TYPE_CHECKING:
    from celery import Celery, Task

logger = logging.getLogger("nocluster.queue.celery")

TASK_NAME = "nocluster.queue.deliver"
LIMITS = ("max_timeout", "grace", "retry_backoff", "retry_backoff_max", "defer_delay")
WORKER_LOST_RETRIES = 3


class CeleryQueueBackend(QueueBackend):
    """Event queue on Celery. Limits (``max_timeout``, ``grace``, retry backoff) come from :mod:`nocluster.celery`.

    Options:
      broker_url: None (the default) uses the project's Celery app (``CELERY_BROKER_URL``); a URL builds a
        private Celery app with the same settings on that broker (tools, tests, a second broker).
    """

    def __init__(self, *, broker_url: str | None = None) -> None:
        self.broker_url = broker_url

    @cached_property
    def celery_app(self) -> Celery:
        from nocluster import celery as project

        celery_app = (
            project.app
            if self.broker_url is None
            else project.create_app(broker_url=self.broker_url, app_name=self.manager.identity.name)
        )
        celery_app.nocluster_backend = self  # type: ignore[attr-defined]
        return celery_app

    @cached_property
    def limits(self) -> dict[str, float]:
        """``max_timeout``, ``grace``, ``retry_backoff``, ``retry_backoff_max``, ``defer_delay`` (seconds)."""
        conf = self.celery_app.conf
        return {key: float(conf[f"nocluster_{key}"]) for key in LIMITS}

    @property
    def max_timeout(self) -> float:  # type: ignore[override]
        return self.limits["max_timeout"]

    @property
    def grace(self) -> float:  # type: ignore[override]
        return self.limits["grace"]

    @property
    def retry_backoff(self) -> float:  # type: ignore[override]
        return self.limits["retry_backoff"]

    @property
    def retry_backoff_max(self) -> float:  # type: ignore[override]
        return self.limits["retry_backoff_max"]

    @property
    def defer_delay(self) -> float:
        return self.limits["defer_delay"]

    @cached_property
    def task(self) -> Task:
        return self.celery_app.tasks[TASK_NAME]

    # --- the contract -------------------------------------------------------------------------------------
    def register(self, full_channel: str, subscription: Subscription) -> None:
        """Nothing to do here: workers consume every subscribed channel (``nocluster.celery``)."""

    def publish(self, full_channel: str, message: Message, delay: float = 0.0) -> None:
        grace = self.limits["grace"]
        self.task.apply_async(
            args=(message.to_wire(),),
            queue=celery_queue(full_channel),
            countdown=delay if delay > 0 else None,
            soft_time_limit=message.timeout + grace,
            time_limit=message.timeout + 2 * grace,
            # What logs and events show; also spares Celery a saferepr of the whole payload per publish.
            argsrepr=f"({message.channel!r}, id={message.id!r}, retried={message.retried})",
            kwargsrepr="{}",
        )

    def depth(self, full_channel: str) -> int:
        """Messages waiting in the channel's broker queue.

        Declares the queue as a worker would (durable, same arguments) and reads the count from the reply: a
        passive declare on kombu's Redis transport ignores ``global_keyprefix`` and reports every queue missing.
        """
        with self.celery_app.connection_for_read() as connection:
            declared = celery_queue(full_channel)(connection.default_channel).queue_declare()
            return int(declared.message_count)

    def drain(self, timeout: float = 10.0) -> bool:
        raise NotImplementedError("CeleryQueueBackend.drain: not written yet (issue 11, in progress)")

    def ping(self) -> None:
        with self.celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)

    def queues(self) -> list[Queue]:
        """The Celery queues of the subscribed channels (what a worker consumes)."""
        return [celery_queue(self.manager.full_channel(channel)) for channel in self.manager.channels()]

    # --- in the worker ----------------------------------------------------------------------------------------
    def run(self, task: Task, message: Message) -> None:
        """Run one delivery in a pool process: idle and concurrency gates, then the try, then settle it."""
        node = str(task.request.hostname or f"{os.getpid()}@{socket.gethostname()}")
        full_channel = self.manager.full_channel(message.channel)
        try:
            subscription = self.manager.subscription(message.channel)
        except UnknownChannel as exc:
            self.manager.fail_or_retry(message, f"{exc} (on node {node})", node)
            return
        if not self._idle(subscription, full_channel):
            self.defer(full_channel, message)
            return
        with node_slot(self.manager.identity.name, node, message.channel, subscription.concurrency) as slot:
            if slot is None:
                self.defer(full_channel, message)
                return
            outcome = self.manager.execute(subscription, message)
        try:
            self.manager.settle(message, outcome, node)
        except Exception as exc:
            # Neither the retry nor the failed record could be written: hand the message back to the broker
            # rather than ack it (it runs again: at least once, never dropped).
            raise Reject(exc, requeue=True) from exc

    def _idle(self, subscription: Subscription, full_channel: str) -> bool:
        try:
            return subscription.is_idle()
        except Exception:
            logger.exception("queue %s: idle() raised; treating this node as busy", full_channel)
            return False

    def defer(self, full_channel: str, message: Message) -> None:
        """Leave ``message`` for later or another node: publish it again after ``defer_delay`` s (no retry counted)."""
        try:
            self.publish(full_channel, message, delay=self.defer_delay)
        except Exception as exc:
            raise Reject(exc, requeue=True) from exc  # the broker keeps this copy instead


@lru_cache(maxsize=1024)
def celery_queue(full_channel: str) -> Queue:
    """The durable queue of a channel, bound to a direct exchange of the same name (publisher and worker agree)."""
    return Queue(full_channel, Exchange(full_channel, type="direct"), routing_key=full_channel, durable=True)


def backend_for(celery_app: Celery) -> CeleryQueueBackend:
    """The backend that runs messages of ``celery_app``: its own, else the process-wide app's event queue."""
    backend = getattr(celery_app, "nocluster_backend", None)
    if backend is None:
        from nocluster import app

        backend = app.event_queue.backend
        if not isinstance(backend, CeleryQueueBackend):
            raise RuntimeError(
                f'a Celery worker got an event queue message but NOCLUSTER["EVENT_QUEUE"] is {type(backend).__name__}; '
                "set BROKER_URL so every node uses the celery backend"
            )
    return backend


def deliver(task: Task, data: dict[str, Any]) -> None:
    """The one Celery task: run the event queue message ``data`` (JSON) in this pool process."""
    backend_for(task.app).run(task, Message.from_wire(data))


def on_task_failure(
    sender: Any = None, task_id: str = "", exception: BaseException | None = None, **kwargs: Any
) -> None:
    """In the worker's main process: a try that never came back (hard time limit, pool process lost for good).

    The pool process could not settle it, so this does: retry with backoff, or record it as failed.
    """
    if getattr(sender, "name", None) != TASK_NAME or not isinstance(exception, (TimeLimitExceeded, WorkerLostError)):
        return
    if task_id in _settled:
        return  # Celery reports a hard time limit twice (on_timeout, then the job's error callback).
    _settled.append(task_id)
    del _settled[:-1000]
    args = kwargs.get("args") or ()
    message = Message.from_wire(args[0])
    backend = backend_for(sender.app)
    reason = "stopped after the grace period" if isinstance(exception, TimeLimitExceeded) else "its process was lost"
    node = f"{os.getpid()}@{socket.gethostname()}"
    backend.manager.fail_or_retry(message, f"{type(exception).__name__}: {exception} ({reason})", node)


_settled: list[str] = []


def register_tasks(celery_app: Celery) -> None:
    """Register the delivery task on ``celery_app`` (called by :func:`nocluster.celery.create_app`)."""
    celery_app.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        max_retries=WORKER_LOST_RETRIES,
        default_retry_delay=1,
        typing=False,
    )(deliver)
    signals.task_failure.connect(on_task_failure, weak=False, dispatch_uid="nocluster.queue.on_task_failure")
