"""What runs in the Celery worker for :class:`~nocluster.queue.backends.celery.CeleryQueueBackend`: the one task,
the queue selection when the worker starts (its ``--channels`` option), the settling of tries that never came
back, a consumer that reconnects to its broker quickly, and on Redis the restore of gone workers' messages
(:mod:`.gone_workers`).

Each is bound to its backend (no lookup of a global application): :func:`install` registers the task on the
backend's own Celery app and connects the signal handlers, which ignore every other Celery app of the process.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import click
from celery import Celery, Task, signals
from celery.exceptions import TimeLimitExceeded, WorkerLostError
from celery.worker.consumer import Consumer

from nocluster.db import close_this_thread_connections
from nocluster.errors import MalformedMessage, NoclusterError
from nocluster.queue.backends.celery_app import HELD_PER_PROCESS, PREFETCH_PER_PROCESS
from nocluster.queue.backends.celery_pause import PausedChannelsWatcher
from nocluster.queue.backends.gone_workers import GoneWorkers
from nocluster.queue.message import Message
from nocluster.queue.parking import ParkingRelease

if TYPE_CHECKING:
    from kombu import Queue

    from nocluster.queue.backend import QueueListener

logger = logging.getLogger("nocluster.queue.celery")

TASK_NAME = "nocluster.queue.deliver"
# The exit status of a worker whose configuration is wrong (sysexits.h).
EX_CONFIG = 78
# Seconds between the worker's attempts to reach its broker again: the first after RECONNECT_STEP, each later one
# RECONNECT_STEP longer, at most RECONNECT_MAX apart (Celery leaves kombu's 2 s, +2 s, at most 30 s).
RECONNECT_STEP = 0.2
RECONNECT_MAX = 1.0
# The worker option naming the channels it consumes (``celery -A nocluster.celery worker --channels=a,b``).
CHANNELS_OPTION = click.Option(
    ["--channels"],
    default=None,
    help="Comma-separated event queue channels (without the app prefix) this worker consumes; default: "
    "NOCLUSTER_WORKER_CHANNELS, or every subscribed channel. A channel nothing subscribed stops the worker.",
)


class QuickReconnectConsumer(Consumer):
    """Celery's worker consumer, retrying its broker connection every second at most instead of kombu's default
    2, 4, 6... up to 30 s, so a worker is back to work about a second after its broker is (Celery has no setting
    for these intervals: it calls ``Connection.ensure_connection`` with kombu's defaults)."""

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(
            conn.ensure_connection, interval_start=RECONNECT_STEP, interval_step=RECONNECT_STEP,
            interval_max=RECONNECT_MAX,
        )  # fmt: skip
        try:
            return super().ensure_connected(conn)
        finally:
            del conn.ensure_connection  # the instance attribute only: the method shows through again


class WorkerBackend(Protocol):
    """What the worker side uses of :class:`~nocluster.queue.backends.celery.CeleryQueueBackend`."""

    manager: QueueListener
    max_deliveries: int
    gone_workers: GoneWorkers | None
    pause_refresh: float

    def track_deliveries(self) -> GoneWorkers | None:
        """Before the worker connects (Redis only): keep its deliveries apart; its beat and restore of gone ones."""
        ...

    def queues(self) -> list[Queue]:
        """The Celery queues of the subscribed channels this node consumes."""
        ...

    def consume(self, channels: object) -> list[Queue]:
        """Consume ``channels`` (the ``--channels`` option, or None) and return their queues."""
        ...

    def run(self, task: Task, message: Message) -> None:
        """Run one delivery of ``message`` in this worker process and settle it."""
        ...


def install(backend: WorkerBackend, celery_app: Celery) -> None:
    """Register the delivery task of ``backend`` on ``celery_app`` and connect its worker signal handlers."""

    def deliver(task: Task, data: dict[str, Any]) -> None:
        try:
            message = Message.from_wire(data)
        except MalformedMessage as exc:
            logger.error("queue: dropped a malformed message (task %s): %s", task.request.id, exc)
            return
        backend.run(task, message)

    # shared=False: a shared task would be added to every Celery app of the process, each calling the first
    # backend's function. max_retries: how often Celery runs a message again whose pool process was lost
    # (SIGKILL, OOM, os._exit) before it is recorded failed, so it runs max_deliveries times in all.
    celery_app.task(
        name=TASK_NAME, bind=True, shared=False, ignore_result=True, max_retries=backend.max_deliveries - 1,
        default_retry_delay=1, typing=False,
    )(deliver)  # fmt: skip
    celery_app.user_options["worker"].add(CHANNELS_OPTION)
    uid = f"nocluster.queue.{id(backend)}"
    # The queues this worker consumes when nothing is paused (filled when it starts, read by the pause watcher).
    selected: set[str] = set()
    signals.celeryd_after_setup.connect(
        _consume(backend, celery_app, selected), weak=False, dispatch_uid=f"{uid}.consume"
    )
    signals.task_failure.connect(_settle_lost(backend, celery_app), weak=False, dispatch_uid=f"{uid}.lost")
    signals.worker_ready.connect(_watch_gone(backend, celery_app, True), weak=False, dispatch_uid=f"{uid}.ready")
    signals.worker_shutdown.connect(_watch_gone(backend, celery_app, False), weak=False, dispatch_uid=f"{uid}.down")
    release, unrelease = _release_parked(backend, celery_app)
    signals.worker_ready.connect(release, weak=False, dispatch_uid=f"{uid}.release")
    signals.worker_shutdown.connect(unrelease, weak=False, dispatch_uid=f"{uid}.unrelease")
    watch_paused, unwatch_paused = _watch_paused(backend, celery_app, selected)
    signals.worker_ready.connect(watch_paused, weak=False, dispatch_uid=f"{uid}.paused")
    signals.worker_shutdown.connect(unwatch_paused, weak=False, dispatch_uid=f"{uid}.unpaused")


def _consume(backend: WorkerBackend, celery_app: Celery, selected: set[str]) -> Any:
    def consume_subscribed_channels(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
        """Worker main process, once Django and the plugins are loaded: consume every subscribed channel its
        routing allows. A channel nothing subscribed stops the worker (exit status 78, EX_CONFIG)."""
        if instance is None or instance.app is not celery_app:
            return
        try:
            queues = backend.consume((getattr(instance, "options", None) or {}).get("channels"))
        except NoclusterError as exc:
            logger.critical("worker %s cannot start: %s", sender, exc)
            # SystemExit passes through Celery's signal dispatch (which logs and swallows an Exception) and makes
            # the worker stop with this status.
            raise SystemExit(EX_CONFIG) from exc
        selected.update(queue.name for queue in queues)
        # A paused channel's queue is not consumed from the start (the pause watcher adds it on resume).
        paused = paused_queue_names(backend)
        close_this_thread_connections()  # the pool forks from this thread: no child may share its connection
        queues = [queue for queue in queues if queue.name not in paused]
        for queue in queues:
            celery_app.amqp.queues.select_add(queue)
        # Celery fetches countdown (ETA) messages beyond the prefetch window, raising its prefetch count for each
        # up to worker_eta_task_limit, a cap on the whole count: prefetch + countdowns, so the visibility timeout
        # covers every held message (read by the consumer when it starts, after this). A cap at the prefetch
        # itself would leave no room, and Celery would lower the count for each countdown for good.
        per_process = PREFETCH_PER_PROCESS + HELD_PER_PROCESS
        celery_app.conf.worker_eta_task_limit = per_process * int(instance.concurrency or 1)
        backend.track_deliveries()
        logger.info("worker %s consumes event queue channels: %s", sender, ", ".join(q.name for q in queues) or "-")

    return consume_subscribed_channels


def _watch_gone(backend: WorkerBackend, celery_app: Celery, start: bool) -> Any:
    def start_or_stop(sender: Any = None, **kwargs: Any) -> None:
        """Worker main process: once ready, beat and restore gone workers' messages; stop when it has stopped."""
        gone = backend.gone_workers
        if gone is None or getattr(sender, "app", None) is not celery_app:
            return
        gone.start() if start else gone.stop()

    return start_or_stop


class _Thread(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


def _main_process_thread(celery_app: Celery, make: Callable[[Any], _Thread]) -> tuple[Any, Any]:
    """Handlers of ``worker_ready`` and ``worker_shutdown``: start ``make(consumer)`` in the worker's main process
    once it is ready, stop it when the worker stops."""
    threads: list[_Thread] = []

    def start(sender: Any = None, **kwargs: Any) -> None:
        if getattr(sender, "app", None) is not celery_app:
            return
        thread = make(sender)
        thread.start()
        threads.append(thread)

    def stop(sender: Any = None, **kwargs: Any) -> None:
        if getattr(sender, "app", None) is not celery_app:
            return
        while threads:
            threads.pop().stop()

    return start, stop


def _release_parked(backend: WorkerBackend, celery_app: Celery) -> tuple[Any, Any]:
    """Send parked messages to the broker as they come due (:mod:`nocluster.queue.parking`)."""
    return _main_process_thread(celery_app, lambda consumer: ParkingRelease(backend.manager.release_parked))


def paused_queue_names(backend: WorkerBackend) -> set[str]:
    """The broker queues of the paused channels; empty if the database cannot be read (the run gate still holds
    their messages back, and the watcher tries again)."""
    manager = backend.manager
    try:
        return {manager.full_channel(channel) for channel in manager.paused_channels(fresh=True)}
    except Exception:
        logger.exception("worker: could not read the paused channels")
        return set()


def _watch_paused(backend: WorkerBackend, celery_app: Celery, selected: set[str]) -> tuple[Any, Any]:
    """Stop consuming paused channels, and consume them again once resumed (:mod:`.celery_pause`)."""

    def paused_queues() -> set[str]:
        return {backend.manager.full_channel(channel) for channel in backend.manager.paused_channels(fresh=True)}

    def watcher(consumer: Any) -> PausedChannelsWatcher:
        def consuming(queue: str) -> bool | None:
            task_consumer = consumer.task_consumer  # a new one after each reconnect; None while reconnecting
            return None if task_consumer is None else bool(task_consumer.consuming_from(queue))

        return PausedChannelsWatcher(
            celery_app, consumer.hostname, set(selected), paused_queues, consuming, backend.pause_refresh
        )

    return _main_process_thread(celery_app, watcher)


def _settle_lost(backend: WorkerBackend, celery_app: Celery) -> Any:
    settled: list[str] = []

    def on_task_failure(
        sender: Any = None, task_id: str = "", exception: BaseException | None = None, **kwargs: Any
    ) -> None:
        """In the worker's main process: a try that never came back (hard time limit, pool process lost for
        good). The pool process could not settle it, so this does: retry with backoff, or a failed record."""
        if getattr(sender, "app", None) is not celery_app or getattr(sender, "name", None) != TASK_NAME:
            return
        if not isinstance(exception, (TimeLimitExceeded, WorkerLostError)) or task_id in settled:
            return  # Celery reports a hard time limit twice (on_timeout, then the job's error callback).
        settled.append(task_id)
        del settled[:-1000]
        args: Any = kwargs.get("args") or ()
        message = Message.from_wire(args[0])
        lost = isinstance(exception, WorkerLostError)
        reason = "its process was lost" if lost else "stopped after the grace period"
        node = f"{os.getpid()}@{socket.gethostname()}"
        try:
            backend.manager.fail_or_retry(message, f"{type(exception).__name__}: {exception} ({reason})", node)
        finally:
            close_this_thread_connections()  # a pool process forked later must not inherit it

    return on_task_failure
