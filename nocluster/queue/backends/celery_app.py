"""The Celery app of :class:`~nocluster.queue.backends.celery.CeleryQueueBackend`: every setting that decides
whether work is lost or run twice, written once.

Celery's defaults lose or repeat work (notes/python-stack.md §1), so these are forced over any ``CELERY_*``
Django setting: JSON only, no result backend, late ack, reject and retry when a pool process is lost, prefetch 2,
publisher confirms on RabbitMQ, long-running tasks cancelled when the broker connection is lost, and on Redis a
``visibility_timeout`` derived from the queue's limits, so a killed worker's message comes back long before
Celery's hour and no message still running or waiting is handed out twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import Celery
from django.conf import settings

from nocluster.durations import seconds
from nocluster.queue.backends.redis_transport import one_client_transport

# Seconds added to the longest possible life of an unacked message before Redis hands it out again.
VISIBILITY_MARGIN = 10.0
# Messages a worker fetches ahead per pool process (worker_prefetch_multiplier): with 2, the next message is
# already in the worker when a process frees, instead of a broker round trip after each ack (+4 to +7 % on Redis,
# +9 % on RabbitMQ in benchmarks/event_queue.py, 2026-12-03). Bounded, so how long a message can stay unacked is too.
PREFETCH_PER_PROCESS = 2
# Countdown (ETA) messages a worker may hold per pool process beyond its prefetch (a retry or a deferral waiting
# out its delay; worker_eta_task_limit). Capped for the same reason.
HELD_PER_PROCESS = 2
# Tasks after which Celery's Django fixup closes the database connections anyway (every 2 x this many).
DB_REUSE_MAX = 1_000_000


@dataclass(frozen=True)
class QueueLimits:
    """The event queue's limits, in seconds (the backend's OPTIONS).

    Attributes:
      max_timeout: the longest ``publish(timeout=...)``.
      grace: work ignoring its abort signal gets a soft time limit at timeout + grace and is killed at
        timeout + 2 x grace.
      retry_backoff, retry_backoff_max: the delay before try n+1 is ``min(retry_backoff * 2**n, retry_backoff_max)``.
      defer_delay: how soon a message left by a busy or non-idle node is offered again.
    """

    max_timeout: float = 300.0
    grace: float = 5.0
    retry_backoff: float = 1.0
    retry_backoff_max: float = 60.0
    defer_delay: float = 0.5

    @classmethod
    def checked(cls, **values: object) -> QueueLimits:
        """Build from OPTIONS, each a number of seconds (a bad one raises naming the option)."""
        option = "CeleryQueueBackend option"
        return cls(
            max_timeout=seconds(values["max_timeout"], f"{option} max_timeout"),
            grace=seconds(values["grace"], f"{option} grace"),
            retry_backoff=seconds(values["retry_backoff"], f"{option} retry_backoff", allow_zero=True),
            retry_backoff_max=seconds(values["retry_backoff_max"], f"{option} retry_backoff_max", allow_zero=True),
            defer_delay=seconds(values["defer_delay"], f"{option} defer_delay", allow_zero=True),
        )


def longest_delay(limits: QueueLimits) -> float:
    """The longest countdown one message is sent with (a retry, a deferral, a hop of a longer delay)."""
    return max(limits.retry_backoff_max, limits.defer_delay, 1.0)


def visibility_timeout(limits: QueueLimits) -> float:
    """Seconds a message may stay unacked on Redis before the broker hands it out again.

    A held message waits out its retry/defer delay, then queues behind the other messages the worker holds: per
    pool process at most ``PREFETCH_PER_PROCESS`` fetched ahead and ``HELD_PER_PROCESS`` countdown messages come
    due, so at most that many runs each, and then runs itself; a run lasts at most timeout + 2 x grace (the hard
    limit). So: longest delay + (PREFETCH_PER_PROCESS + HELD_PER_PROCESS + 1) longest runs + a margin.
    """
    longest_run = limits.max_timeout + 2 * limits.grace
    runs = PREFETCH_PER_PROCESS + HELD_PER_PROCESS + 1
    return longest_delay(limits) + runs * longest_run + VISIBILITY_MARGIN


def is_redis(broker_url: str) -> bool:
    return broker_url.startswith(("redis://", "rediss://", "redis+socket://"))


def transport_options(broker_url: str, app_name: str, limits: QueueLimits) -> dict[str, Any]:
    if is_redis(broker_url):
        timeout = visibility_timeout(limits)
        return {
            "visibility_timeout": timeout,
            # Look for messages of dead workers often enough that they come back about `timeout` after
            # their delivery, not `interval x throttle` (100 s by default) later.
            "unacked_restore_interval": max(1.0, min(10.0, timeout / 10)),
            "unacked_restore_throttle": 1,
            # Every key (queues, the unacked hash) under this project's name: projects sharing one Redis
            # do not restore each other's messages with their own visibility timeouts.
            "global_keyprefix": f"{app_name}:",
        }
    if broker_url.startswith(("amqp://", "amqps://", "pyamqp://")):
        return {"confirm_publish": True}
    return {}


def build_celery_app(broker_url: str, app_name: str, limits: QueueLimits, extra: dict[str, Any]) -> Celery:
    """A Celery app for the event queue of project ``app_name`` on ``broker_url``.

    ``extra`` are more transport options (the backend's ``transport_options``), under the forced ones.
    """
    celery_app = Celery("nocluster", set_as_current=False)
    celery_app.config_from_object("django.conf:settings", namespace="CELERY")
    celery_app.conf.update(
        broker_url=broker_url,
        broker_transport_options={
            **getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}),
            **extra,
            **transport_options(broker_url, app_name, limits),
        },
        broker_connection_retry_on_startup=True,
        # On Redis, each channel sends through one kept redis-py client (a worker's acks, a publisher's sends).
        broker_transport=one_client_transport(broker_url),
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_retry_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=PREFETCH_PER_PROCESS,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # Keep the project's LOGGING (NOCLUSTER_LOG_FORMAT=json works in workers too).
        worker_hijack_root_logger=False,
        # Celery's Django fixup closes every database connection before and after each task unless this is set,
        # so a message that touches the database (a task row, a failed record, the relay ledger) would pay a new
        # connection each time. The runner already does what Django does around a request
        # (close_old_connections: CONN_MAX_AGE and unusable connections), so Celery's closing is turned off.
        CELERY_DB_REUSE_MAX=DB_REUSE_MAX,
        task_default_queue=f"{app_name}.celery",
        # Remote control (``celery -A nocluster.celery inspect/control``) and events on the project's own exchanges:
        # Celery's defaults (``celery.pidbox``, ``celeryev``) are shared by every project on the vhost, so a
        # ``control shutdown`` or a ``revoke`` of one project would reach the workers of all. A colon after the
        # name, not a dot: channel exchanges are ``{app_name}.{channel}``, and a channel named "events" must not
        # meet Celery's event exchange (another exchange type under one name).
        control_exchange=f"{app_name}:control",
        event_exchange=f"{app_name}:events",
        event_queue_prefix=f"{app_name}:events",
        # Reconnects to the broker every second at most, instead of Celery's 2, 4, 6... up to 30 s.
        worker_consumer="nocluster.queue.backends.celery_worker:QuickReconnectConsumer",
    )
    return celery_app
