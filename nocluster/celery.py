"""The project's one Celery app: ``celery -A nocluster.celery worker`` on each node.

Celery's defaults lose or repeat work (notes/python-stack.md §1), so these settings are forced over any
``CELERY_*`` setting: JSON only, no result backend, late ack, reject and retry when a pool process is lost,
prefetch 1, publisher confirms on RabbitMQ, long-running tasks cancelled when the broker connection is lost,
and on Redis a ``visibility_timeout`` derived from the longest timeout the event queue allows, so a killed
worker's message comes back in seconds, not after an hour, and no message still running is delivered twice.

Event queue limits, in seconds, from the Django setting of the same name, else the environment, else the
default: ``NOCLUSTER_QUEUE_MAX_TIMEOUT`` (300; longest ``publish(timeout=...)``), ``NOCLUSTER_QUEUE_GRACE`` (5;
work ignoring its abort signal gets a soft time limit at timeout + grace and is killed at timeout + 2 x grace),
``NOCLUSTER_QUEUE_RETRY_BACKOFF`` (1) and ``NOCLUSTER_QUEUE_RETRY_BACKOFF_MAX`` (60), and
``NOCLUSTER_QUEUE_DEFER_DELAY`` (0.5; how soon a message left by a busy or non-idle node is offered again).

Worker processes: the main process sets Django up (Celery's Django fixup) and so loads the plugins, which
register the queue subscriptions; it then consumes the queue of every subscribed channel. Each pool process
starts its own node (``app.start()``: pub/sub listener, so cancels reach it) after fork.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")

logger = logging.getLogger("nocluster.celery")

QUEUE_LIMITS = {
    "max_timeout": ("NOCLUSTER_QUEUE_MAX_TIMEOUT", 300.0),
    "grace": ("NOCLUSTER_QUEUE_GRACE", 5.0),
    "retry_backoff": ("NOCLUSTER_QUEUE_RETRY_BACKOFF", 1.0),
    "retry_backoff_max": ("NOCLUSTER_QUEUE_RETRY_BACKOFF_MAX", 60.0),
    "defer_delay": ("NOCLUSTER_QUEUE_DEFER_DELAY", 0.5),
}
# Seconds added to the longest possible life of an unacked message before Redis hands it out again.
VISIBILITY_MARGIN = 10.0


def queue_limits() -> dict[str, float]:
    """The event queue limits in seconds (setting, else environment variable, else default)."""
    from django.conf import settings

    limits = {}
    for key, (name, default) in QUEUE_LIMITS.items():
        value = getattr(settings, name, None)
        if value in (None, ""):
            value = os.environ.get(name, "").strip() or default
        limits[key] = float(value)
    return limits


# Unacked messages a worker may hold per pool process: one running, one waiting (a prefetched message, or a
# retry/defer held until its countdown). Capped, so how long a message can stay unacked is bounded.
HELD_PER_PROCESS = 2


def visibility_timeout(limits: dict[str, float]) -> float:
    """Seconds a message may stay unacked on Redis before the broker hands it out again.

    A held message waits out its retry/defer delay, then queues behind at most the other held messages of the
    worker (``HELD_PER_PROCESS`` per pool process: at most one more run each), then runs itself; a run lasts at
    most timeout + 2 x grace (the hard limit). So: longest delay + 3 longest runs + a margin.
    """
    longest_delay = max(limits["retry_backoff_max"], limits["defer_delay"], 1.0)
    longest_run = limits["max_timeout"] + 2 * limits["grace"]
    return longest_delay + 3 * longest_run + VISIBILITY_MARGIN


def transport_options(broker_url: str, app_name: str, limits: dict[str, float]) -> dict[str, Any]:
    if broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
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


def create_app(*, broker_url: str, app_name: str, main: str = "nocluster") -> Celery:
    """A Celery app configured for the event queue of project ``app_name`` on ``broker_url``."""
    from django.conf import settings

    from nocluster.queue.backends.celery import register_tasks

    limits = queue_limits()
    celery_app = Celery(main)
    celery_app.config_from_object("django.conf:settings", namespace="CELERY")
    celery_app.conf.update(
        broker_url=broker_url,
        broker_transport_options={
            **getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}),
            **transport_options(broker_url, app_name, limits),
        },
        broker_connection_retry_on_startup=True,
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
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # Keep the project's LOGGING (NOCLUSTER_LOG_FORMAT=json works in workers too).
        worker_hijack_root_logger=False,
        task_default_queue=f"{app_name}.celery",
        **{f"nocluster_{key}": value for key, value in limits.items()},
    )
    register_tasks(celery_app)
    return celery_app


def _project_app() -> Celery:
    from django.conf import settings

    from nocluster.conf import get_config

    return create_app(broker_url=settings.CELERY_BROKER_URL, app_name=str(get_config()["NAME"]))


app = _project_app()


@signals.celeryd_after_setup.connect
def consume_subscribed_channels(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    """Worker main process, once Django and the plugins are loaded: consume every subscribed channel."""
    if instance is None or instance.app is not app:
        return
    from nocluster import app as node
    from nocluster.queue.backends.celery import CeleryQueueBackend

    backend = node.event_queue.backend
    if not isinstance(backend, CeleryQueueBackend):
        logger.warning(
            'worker %s: NOCLUSTER["EVENT_QUEUE"] is %s, not the celery backend (is BROKER_URL set?): '
            "it consumes no event queue channel",
            sender, type(backend).__name__,
        )  # fmt: skip
        return
    queues = backend.queues()
    for queue in queues:
        instance.app.amqp.queues.select_add(queue)
    # Celery fetches countdown (ETA) messages beyond the prefetch window; cap what the worker holds so the
    # visibility timeout above covers every held message (read by the consumer when it starts, after this).
    instance.app.conf.worker_eta_task_limit = HELD_PER_PROCESS * int(instance.concurrency or 1)
    logger.info("worker %s consumes event queue channels: %s", sender, ", ".join(q.name for q in queues) or "(none)")


@signals.worker_process_init.connect
def start_node(**kwargs: Any) -> None:
    """Each pool process is a node: start its consumers (pub/sub, so cancels reach it) after fork."""
    from nocluster import app as node

    node.start(role="worker")


@signals.worker_process_shutdown.connect
def stop_node(**kwargs: Any) -> None:
    from nocluster import app as node

    node.stop()
