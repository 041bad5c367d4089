"""System checks: a wrong ``NOCLUSTER`` backend path fails ``manage.py check`` with its key; the deployment checks
(``check --deploy``) flag an event-queue Redis that would lose messages, rate limits that hold per process only,
and the project's development secret key."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.checks import Error, Warning
from django.utils.module_loading import import_string

from nocluster.conf import get_config

if TYPE_CHECKING:
    from nocluster.queue import EventQueue

SECTIONS = ("PUBSUB", "EVENT_QUEUE", "LOCKS", "RATE_LIMITS")


def check_nocluster_settings(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    config = get_config()
    errors: list[Error] = []
    name = config.get("NAME")
    if not isinstance(name, str) or not name or any(c in name for c in " :."):
        errors.append(
            Error(
                f'NOCLUSTER["NAME"] = {name!r} must be a non-empty str without spaces, ":" or "."', id="nocluster.E001"
            )
        )
    for section in SECTIONS:
        entry = config.get(section)
        if not isinstance(entry, dict) or "BACKEND" not in entry:
            errors.append(Error(f'NOCLUSTER["{section}"] must be a dict with a "BACKEND"', id="nocluster.E002"))
            continue
        try:
            import_string(entry["BACKEND"])
        except ImportError as exc:
            errors.append(Error(f'NOCLUSTER["{section}"]["BACKEND"] cannot be imported: {exc}', id="nocluster.E003"))
    return errors


@lru_cache(maxsize=8)
def durability_check(queue: EventQueue) -> Callable[..., list[Warning]]:
    """The ``check --deploy`` check of ``queue``: a broker configuration that could lose queued messages (it asks
    the broker; registered by the app config once the application is built)."""

    def check_event_queue_durability(app_configs: Any = None, **kwargs: Any) -> list[Warning]:
        try:
            found = queue.backend.durability_warnings()
        except Exception as exc:
            found = [f"the event queue's broker could not be asked: {type(exc).__name__}: {exc}"]
        return [Warning(text, id="nocluster.W001") for text in found]

    return check_event_queue_durability


@lru_cache(maxsize=8)
def rate_limit_check(queue: EventQueue) -> Callable[..., list[Warning]]:
    """The ``check --deploy`` check of ``queue``: channels with a ``rate_limit`` while the rate limiter is
    process-local and the queue is consumed by several processes (any backend but the memory one)."""

    def check_rate_limits_are_cluster_wide(app_configs: Any = None, **kwargs: Any) -> list[Warning]:
        limited = [channel for channel in queue.channels() if queue.subscription(channel).rate_limit]
        if not limited or queue.rate_limiter.cluster_wide or type(queue.backend).__name__ == "MemoryQueueBackend":
            return []
        return [
            Warning(
                f"the rate limits of event queue channels {', '.join(limited)} hold per process, not for the cluster: "
                'NOCLUSTER["RATE_LIMITS"] is the process-local limiter',
                hint="set NOCLUSTER_RATE_LIMIT_URL (or REDIS_URL) to a Redis every node shares",
                id="nocluster.W002",
            )
        ]

    return check_rate_limits_are_cluster_wide


def check_secret_key(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """``SECRET_KEY`` is still the project's committed development key (``settings.DEVELOPMENT_SECRET_KEY``)."""
    development_key = getattr(settings, "DEVELOPMENT_SECRET_KEY", None)
    if not development_key or development_key != settings.SECRET_KEY:
        return []
    return [
        Error(
            "SECRET_KEY is the development key committed with the project: anyone can forge sessions and "
            "password-reset links with it",
            hint="set DJANGO_SECRET_KEY to a long random value, e.g. python -c "
            "'import secrets; print(secrets.token_urlsafe(50))'",
            id="nocluster.E004",
        )
    ]
