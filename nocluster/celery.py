"""The Celery entry module, the one worker command on every node: ``celery -A nocluster.celery worker``.

It takes the Celery app that the event queue's backend owns (``NOCLUSTER["EVENT_QUEUE"]`` must be
:class:`~nocluster.queue.backends.celery.CeleryQueueBackend`, which ``BROKER_URL`` selects), so the worker runs
exactly what the nodes publish, with the same settings. The worker's main process sets Django up (Celery's
Django fixup), which loads the plugins and their queue subscriptions; the backend then has the worker consume
every subscribed channel. Each pool process is a node: it starts its own consumers after fork, so pub/sub
cancels reach it. With metrics on and ``NOCLUSTER_METRICS_PORT`` set, the main process serves every pool
process's metrics on that port (:mod:`nocluster.metrics.exporter`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals
from django.core.exceptions import ImproperlyConfigured

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")

from nocluster import app as node
from nocluster.db import forget_inherited_connections
from nocluster.metrics.exporter import Exporter
from nocluster.queue.backends.celery import CeleryQueueBackend


def _celery_app() -> Celery:
    backend = node.event_queue.backend
    if not isinstance(backend, CeleryQueueBackend):
        raise ImproperlyConfigured(
            f'celery -A nocluster.celery needs NOCLUSTER["EVENT_QUEUE"] to be the celery backend, but it is '
            f"{type(backend).__module__}.{type(backend).__name__}: set BROKER_URL (amqp://... or redis://...)"
        )
    return backend.celery_app


app = _celery_app()
logger = logging.getLogger("nocluster.metrics")


@signals.worker_process_init.connect
def start_node(**kwargs: Any) -> None:
    """Each pool process is a node: start its consumers (pub/sub, so cancels reach it) after fork."""
    forget_inherited_connections()  # before anything here touches the database
    node.start(role="worker")


@signals.worker_process_shutdown.connect
def stop_node(**kwargs: Any) -> None:
    try:
        node.stop()
    finally:
        node.metrics.process_exited(os.getpid())


exporters: list[Exporter] = []


@signals.worker_ready.connect
def start_exporter(**kwargs: Any) -> None:
    """The worker's main process, once its pool runs: serve the metrics on ``NOCLUSTER["METRICS"]["PORT"]``."""
    settings = node.metrics.settings
    if settings.enabled and settings.port is not None and not exporters:
        exporter = Exporter(settings, node.metrics_collector)
        try:
            exporter.start()
        except OSError as exc:  # the port is taken: the worker runs on, without its exporter
            logger.error("metrics exporter cannot listen on port %s (NOCLUSTER_METRICS_PORT): %s", settings.port, exc)
            return
        exporters.append(exporter)


@signals.worker_shutdown.connect
def stop_exporter(**kwargs: Any) -> None:
    while exporters:
        exporters.pop().stop()
