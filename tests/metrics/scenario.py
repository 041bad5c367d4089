"""The channels of the metrics test, registered by every process of its project (web node and Celery worker).

``mt.ok`` succeeds, ``mt.fail`` always raises (so a message published with ``max_retries=1`` runs twice and is
then recorded as failed), ``mt.held`` is consumed by no worker (its messages wait: queue depth), and the pub/sub
channel ``mt.news`` counts nothing itself (the metrics do).
"""

from __future__ import annotations

from typing import Any

from nocluster.app import Application

OK, FAIL, HELD, NEWS = "mt.ok", "mt.fail", "mt.held", "mt.news"
WORKER_CHANNELS = f"{OK},{FAIL}"


def succeed(payload: Any, context: Any) -> None:
    """Nothing to do: the try is done."""


def fail(payload: Any, context: Any) -> None:
    raise RuntimeError(f"mt.fail always fails (try {context.retried + 1})")


def ignore(message: Any) -> None:
    """A pub/sub subscriber: what it received shows in the metrics only."""


def register(app: Application) -> None:
    # A concurrency above the pool's size: no pool process ever finds the channel's slots full (no deferral).
    app.event_queue.subscribe(OK, succeed, concurrency=4)
    app.event_queue.subscribe(FAIL, fail, concurrency=4)
    app.event_queue.subscribe(HELD, succeed, concurrency=4)
    app.pub_sub_manager.subscribe(NEWS, ignore)
