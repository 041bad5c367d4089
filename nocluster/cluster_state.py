"""What the admin's Cluster page shows, gathered in one place: one JSON-ready dict per section.

The page (:func:`nocluster.admin_views.cluster_view`) renders it, and its JSON endpoint (``cluster_state_view``)
returns the same dict, which the page's script polls. Every section reads the cluster, not this process: the node
registry and the task, failed-message and outbox tables in the database, the lock backend, the event queue's
broker. A section that cannot be read says why in its ``error`` instead of failing the page.

Sections (all times in seconds, all ages measured on this node's clock):

- ``nodes``: each registered node of this app: instance id, role, state (up / stopped / gone), host, pid and
  heartbeat age;
- ``backends``: each component's backend class and whether its server answers a ping now (each ping runs in its
  own thread and gets :data:`PING_TIMEOUT` seconds; ``error`` says which failed and why);
- ``channels``: per subscribed event-queue channel: depth, oldest age, running now, failed, paused, consumers;
- ``tasks``: the running tasks with their progress (at most :data:`MAX_ROWS`);
- ``locks``: the locks held with holder, token, time left and how many wait (at most :data:`MAX_ROWS`);
- ``outbox``: committed messages not yet relayed to their broker, and the age of the oldest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import connections
from django.db.models import Count
from django.utils import timezone

from nocluster.models import FailedMessage
from nocluster.queue.stats import ChannelStats

if TYPE_CHECKING:
    from nocluster import Application

# Seconds each backend gets to answer its ping; the pings run at once, so the page waits this long at most.
PING_TIMEOUT = 1.0
# Rows shown at most in the tasks and locks sections (the admin lists have them all).
MAX_ROWS = 50

Section = dict[str, Any]


def cluster_state(app: Application) -> dict[str, Any]:
    """Every section of the Cluster page for ``app``'s cluster, JSON-ready (see the module docstring)."""
    now = timezone.now()
    return {
        "app": app.name,
        "instance_id": app.instance_id,
        "generated_at": now.isoformat(),
        "nodes": _section(lambda: nodes(app, now)),
        "backends": _section(lambda: backends(app)),
        "channels": _section(lambda: channels(app)),
        "tasks": _section(lambda: running_tasks(now)),
        "locks": _section(lambda: locks(app)),
        "outbox": _section(lambda: {"backlog": app.outbox.backlog()}),
    }


def _section(read: Callable[[], dict[str, Any] | list[dict[str, Any]]]) -> Section:
    """``{"rows": [...], "error": None}`` (or the dict ``read`` returned, with ``error``), or the error it raised."""
    try:
        found = read()
    except Exception as exc:
        return {"rows": [], "error": _describe(exc)}
    return {**found, "error": None} if isinstance(found, dict) else {"rows": found, "error": None}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


# --- nodes ------------------------------------------------------------------------------------------------------
def nodes(app: Application, now: datetime) -> list[dict[str, Any]]:
    """The node registry of ``app``'s name, newest first, with the seconds since each node's last heartbeat."""
    return [
        {
            "instance_id": node["instance_id"],
            "role": node["role"],
            "state": node["state"],
            "host": node["host"],
            "pid": node["pid"],
            "heartbeat_age": (now - datetime.fromisoformat(node["last_heartbeat"])).total_seconds(),
        }
        for node in app.node_registry.nodes()
    ]


# --- backends ---------------------------------------------------------------------------------------------------
def backends(app: Application) -> list[dict[str, Any]]:
    """Each component's backend and whether it answered a ping within :data:`PING_TIMEOUT` seconds."""
    checks = backend_checks(app)
    answers = ping_all({name: check for name, (_, check) in checks.items()}, PING_TIMEOUT)
    return [{"name": name, "backend": backend, **answers[name]} for name, (backend, _) in checks.items()]


def backend_checks(app: Application) -> dict[str, tuple[str, Callable[[], object]]]:
    """Per component: its backend's name and a check that asks its server, through the component's own API. The
    components are built here, in the calling thread, not by two probe threads at once."""
    names = app.backend_names()
    cache, lock_manager = app.cache, app.lock_manager
    return {
        "database": (str(settings.DATABASES["default"]["ENGINE"]), _ping_database),
        "cache": (names["cache"], lambda: cache.get("cluster-probe")),
        "pubsub": (names["pubsub"], app.pub_sub_manager.backend.ping),
        "event_queue": (names["event_queue"], app.event_queue.backend.ping),
        "locks": (names["locks"], lambda: lock_manager.get_lock("cluster-probe")),
    }


def _ping_database() -> None:
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT 1")


def ping_all(checks: dict[str, Callable[[], object]], timeout: float) -> dict[str, dict[str, Any]]:
    """Run every check at once, each in its own daemon thread, and wait ``timeout`` seconds for them in all.

    Returns per name ``{"ok": bool, "error": str | None, "seconds": float | None}``: a check that raised gives its
    error, one still running after ``timeout`` gives "no answer within ... s" (its thread is left to finish: a
    daemon, so a server that never answers cannot hold this process at exit).
    """
    results: dict[str, dict[str, Any]] = {}
    threads = {name: _ping_thread(name, check, results) for name, check in checks.items()}
    deadline = time.monotonic() + timeout
    for thread in threads.values():
        thread.join(max(0.0, deadline - time.monotonic()))
    return {
        name: dict(results.get(name) or {"ok": False, "error": f"no answer within {timeout} s", "seconds": None})
        for name in checks
    }


def _ping_thread(name: str, check: Callable[[], object], results: dict[str, dict[str, Any]]) -> threading.Thread:
    def run() -> None:
        started = time.monotonic()
        try:
            check()
            error = None
        except Exception as exc:
            error = _describe(exc)
        seconds = time.monotonic() - started
        connections.close_all()  # this thread's own connections (a database ping opens one): none left open
        results[name] = {"ok": error is None, "error": error, "seconds": seconds}

    thread = threading.Thread(target=run, name=f"nocluster-ping-{name}", daemon=True)
    thread.start()
    return thread


# --- channels ---------------------------------------------------------------------------------------------------
def channels(app: Application) -> list[dict[str, Any]]:
    """Per subscribed channel: depth, oldest age, running now, failed, paused and consumers (None: unknown).

    Depth, oldest age and consumers are the backend's (``EventQueue.channel_stats``; what each backend can tell is
    in docs/metrics.md). ``running`` counts the running tasks (:mod:`tasks`) of a task channel, on every node; it
    is None on other channels, whose runs no table records.
    """
    queue = app.event_queue
    paused = set(queue.paused_channels(fresh=True))
    failed = _count_by_channel(FailedMessage.objects.filter(app_name=app.name))
    running = _running_tasks_by_channel()
    stats_of = all_channel_stats(app)
    rows = []
    for channel in queue.channels():
        stats = stats_of.get(channel, ChannelStats(None))
        rows.append(
            {
                "name": channel,
                "depth": stats.depth,
                "oldest_age": stats.oldest_age,
                "running": running.get(channel, 0) if channel.startswith(TASK_CHANNEL_PREFIX) else None,
                "failed": failed.get(channel, 0),
                "paused": channel in paused,
                "consumers": stats.consumers,
            }
        )
    return rows


TASK_CHANNEL_PREFIX = "tasks."  # tasks.api.CHANNEL_PREFIX (not imported: nocluster does not depend on tasks)


def all_channel_stats(app: Application) -> dict[str, ChannelStats]:
    """Every channel's depth, oldest age and consumers, read together; none when the backend cannot be reached
    or any channel's read fails (they share one connection: every channel's figures are then shown unknown)."""
    try:
        return app.event_queue.all_channel_stats()
    except Exception:
        return {}


def _count_by_channel(rows: Any) -> dict[str, int]:
    return {row["channel"]: row["n"] for row in rows.values("channel").annotate(n=Count("id")).order_by()}


def _running_tasks_by_channel() -> dict[str, int]:
    from tasks.models import Task  # the tasks app is optional for nocluster; the page shows it when installed

    return _count_by_channel(Task.objects.filter(status=Task.Status.RUNNING))


# --- running tasks ----------------------------------------------------------------------------------------------
def running_tasks(now: datetime) -> list[dict[str, Any]]:
    """The running tasks, longest running first: id, title, plugin, channel, progress (0-100), node, seconds run."""
    from tasks.models import Task

    rows = Task.objects.filter(status=Task.Status.RUNNING).order_by("started", "pk")[:MAX_ROWS]
    return [
        {
            "id": task.pk,
            "title": task.title,
            "plugin": task.plugin,
            "channel": task.channel,
            "progress": task.progress,
            "node": task.node,
            "running_for": None if task.started is None else (now - task.started).total_seconds(),
        }
        for task in rows
    ]


# --- locks ------------------------------------------------------------------------------------------------------
def locks(app: Application) -> list[dict[str, Any]]:
    """The locks held (at most :data:`MAX_ROWS`, by key): holder instance, token, seconds left, waiters."""
    return [
        {
            "key": info.key,
            "holder": info.instance_id,
            "token": info.token,
            "time_left": info.time_left,
            "waiting": info.waiting,
        }
        for info in app.lock_manager.list_locks("*")[:MAX_ROWS]
    ]
