"""The tasks API: register a task type, submit a task, report progress from inside it, cancel it from any node.

A task type is a function ``fn(params, task)`` registered by a plugin in its ``load()``::

    from tasks import api as tasks

    def export(params, task):
        for i, row in enumerate(rows):
            task.signal.throw_if_aborted()     # cancelled on any node, or timed out
            ...
            task.progress(100 * (i + 1) / len(rows))
        return {"rows": len(rows)}           # the result summary (JSON)

    class ExportPlugin(Plugin):
        def load(self):
            tasks.register(self, "export", export, concurrency=2)

    task = tasks.submit("export_plugin", "export", {"table": "users"}, title="Export users")
    tasks.cancel(task.pk)                      # from any node

It runs through ``app.event_queue`` on channel ``tasks.{plugin}.{name}``. A cancel goes to every node over
pub/sub on ``{plugin}.task.cancel`` (as NocoBase does); the node running the task fires its abort signal.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from nocluster.envelope import JSON
from nocluster.plugin import Plugin, PluginHost
from nocluster.queue.message import Context
from nocluster.queue.signal import CANCELLED, TIMEOUT, AbortSignal
from tasks.logs import TaskLog, capturing, format_line
from tasks.models import Task

if TYPE_CHECKING:
    from nocluster.queue.message import Message

logger = logging.getLogger("tasks")

CHANNEL_PREFIX = "tasks."
TaskFunction = Callable[[Any, "TaskContext"], JSON]


def task_channel(plugin: str, name: str) -> str:
    """The event queue channel of a task type."""
    return f"{CHANNEL_PREFIX}{plugin}.{name}"


def cancel_channel(plugin: str) -> str:
    """The pub/sub channel carrying cancel requests for ``plugin``'s tasks."""
    return f"{plugin}.task.cancel"


class TaskContext:
    """The second argument of a task function: ``task_id``, ``signal``, ``retried``, :meth:`progress`, :meth:`log`.

    What ``fn`` logs while it runs (through any logger, in its own thread) is kept with the task and shown on its
    admin page, bounded: see :mod:`tasks.logs`.
    """

    def __init__(self, task_id: int, context: Context, log: TaskLog | None = None) -> None:
        self.task_id = task_id
        self.context = context
        self._log = log

    @property
    def signal(self) -> AbortSignal:
        return self.context.signal

    @property
    def retried(self) -> int:
        return self.context.retried

    def progress(self, percent: float) -> None:
        """Record progress, 0 to 100 (clamped), visible in the admin at once."""
        value = max(0, min(100, round(percent)))
        Task.objects.filter(pk=self.task_id, status=Task.Status.RUNNING).update(progress=value)
        if self._log is not None:
            self._log.flush()  # the lines logged so far show up with the progress

    def log(self, message: str, *args: object, level: int = logging.INFO) -> None:
        """Keep the line ``message % args`` with the task (whatever the loggers' levels), and log it to the
        ``tasks`` logger with this task's id."""
        logger.log(level, message, *args, extra={"task_id": self.task_id, "task_log_kept": True})
        if self._log is not None:
            text = message % args if args else message
            self._log.add(format_line(time.time(), logging.getLevelName(level), "task", text))


class _Registry:
    """The task types registered with one Application, and its cancel subscriptions."""

    def __init__(self, app: PluginHost) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.types: dict[str, TaskFunction] = {}
        self.cancel_plugins: set[str] = set()


_registries: weakref.WeakKeyDictionary[PluginHost, _Registry] = weakref.WeakKeyDictionary()


def _registry(app: PluginHost | None) -> _Registry:
    if app is None:
        from nocluster import app as default_app

        app = default_app
    registry = _registries.get(app)
    if registry is None:
        registry = _registries.setdefault(app, _Registry(app))
    return registry


def register(
    plugin: Plugin | str, name: str, fn: TaskFunction, concurrency: int = 1, app: PluginHost | None = None
) -> str:
    """Register task type ``name`` of ``plugin`` (call it in the plugin's ``load()``); returns its channel.

    Parameters:
      fn: ``fn(params, task)`` with ``task`` a :class:`TaskContext`; returns a JSON result summary.
      concurrency: at most this many tasks of this type at once per node.
    """
    plugin_name = plugin if isinstance(plugin, str) else plugin.name
    registry = _registry(app if app is not None or isinstance(plugin, str) else plugin.app)
    channel = task_channel(plugin_name, name)
    with registry.lock:
        registry.types[channel] = fn
        subscribe_cancel = plugin_name not in registry.cancel_plugins
        registry.cancel_plugins.add(plugin_name)
    registry.app.event_queue.subscribe(channel, _runner(registry, channel), concurrency=concurrency)
    if subscribe_cancel:
        registry.app.pub_sub_manager.subscribe(cancel_channel(plugin_name), _cancel_handler(registry))
    return channel


def submit(
    plugin: str,
    name: str,
    params: JSON = None,
    title: str = "",
    timeout: float = 15.0,
    max_retries: int = 0,
    app: PluginHost | None = None,
) -> Task:
    """Create a queued :class:`Task` and publish it; return the task.

    The task row and its message are written in one transaction (the caller's, if any): the message goes out
    through the outbox after the commit, and waits there while the broker is unreachable, so a committed task
    always runs and a rolled-back one never does. ``timeout`` (seconds) and ``max_retries`` are those of the
    event queue message.
    """
    registry = _registry(app)
    channel = task_channel(plugin, name)
    with transaction.atomic():
        task = Task.objects.create(title=title or f"{plugin}.{name}", plugin=plugin, channel=channel, params=params)
        task.message_id = registry.app.event_queue.publish(
            channel, {"task_id": task.pk, "params": params}, timeout=timeout, max_retries=max_retries
        )
        task.save(update_fields=["message_id"])
    return task


def cancel(task_id: int, app: PluginHost | None = None) -> Task:
    """Cancel a task from any node: a queued one will not run, a running one is aborted where it runs."""
    registry = _registry(app)
    task = Task.objects.get(pk=task_id)
    if task.done:
        return task
    fields: dict[str, Any] = {"status": Task.Status.CANCELLED}
    if task.status == Task.Status.QUEUED:
        fields["finished"] = timezone.now()
    Task.objects.filter(pk=task_id, status__in=[Task.Status.QUEUED, Task.Status.RUNNING]).update(**fields)
    request: dict[str, JSON] = {"task_id": task.pk, "message_id": task.message_id}
    registry.app.event_queue.cancel(task.message_id)
    registry.app.pub_sub_manager.publish(cancel_channel(task.plugin), request)
    logger.info("task %s (%s) cancel requested from node %s", task.pk, task.channel, registry.app.instance_id)
    task.refresh_from_db()
    return task


def _cancel_handler(registry: _Registry) -> Callable[[Any], None]:
    def on_cancel(request: Any) -> None:
        if registry.app.event_queue.abort(str(request.get("message_id", ""))):
            logger.info("task %s aborted on node %s", request.get("task_id"), registry.app.instance_id)

    return on_cancel


def _runner(registry: _Registry, channel: str) -> Callable[[Any, Context], None]:
    def run(payload: Any, context: Context) -> None:
        _run_task(registry, channel, payload, context)

    return run


def _run_task(registry: _Registry, channel: str, payload: Any, context: Context) -> None:
    task_id = payload["task_id"]
    node = registry.app.instance_id
    now = timezone.now()
    # A failed task runs again when an admin re-queues its failed message; a cancelled one never does.
    runnable = [Task.Status.QUEUED, Task.Status.RUNNING, Task.Status.FAILED]
    claimed = Task.objects.filter(pk=task_id, status__in=runnable).update(
        status=Task.Status.RUNNING,
        node=node,
        # A re-queued failed message has a new id: cancels must find the one running now.
        message_id=context.id,
        started=now,
        finished=None,
        tries=F("tries") + 1,
        error="",
    )
    if not claimed:
        logger.info("task %s was cancelled (or deleted) before it ran", task_id)
        return
    try:
        with capturing(TaskLog(task_id)) as log:
            log.add(format_line(time.time(), "INFO", "tasks", f"--- try {context.retried + 1} on node {node} ---"))
            result = registry.types[channel](payload.get("params"), TaskContext(task_id, context, log))
    except Exception as exc:
        _ended(task_id, context, f"{type(exc).__name__}: {exc}")
        raise
    if context.signal.reason == TIMEOUT:
        _ended(task_id, context, f"timed out after {context.timeout} s")
        return
    if not _ended(task_id, context, None):
        Task.objects.filter(pk=task_id, status=Task.Status.RUNNING).update(
            status=Task.Status.SUCCEEDED, progress=100, result=result, finished=timezone.now()
        )


def _ended(task_id: int, context: Context, error: str | None) -> bool:
    """Record how a try ended if it did not succeed; True if it was cancelled or failed."""
    now = timezone.now()
    if context.signal.reason == CANCELLED or Task.objects.filter(pk=task_id, status=Task.Status.CANCELLED).exists():
        Task.objects.filter(pk=task_id).update(status=Task.Status.CANCELLED, finished=now)
        return True
    if error is None:
        return False
    if context.last_try:
        fields = {"status": Task.Status.FAILED, "error": error, "finished": now}
    else:
        fields = {"status": Task.Status.QUEUED, "error": error}
    Task.objects.filter(pk=task_id, status=Task.Status.RUNNING).update(**fields)
    return True


def mark_failed_message(sender: Any = None, message: Message | None = None, error: str = "", **kwargs: Any) -> None:
    """``message_failed`` receiver: a task whose message failed for good (even killed) is failed."""
    if message is None or not message.channel.startswith(CHANNEL_PREFIX) or not isinstance(message.payload, dict):
        return
    task_id = message.payload.get("task_id")
    if not isinstance(task_id, int):
        return
    Task.objects.filter(pk=task_id, status__in=[Task.Status.QUEUED, Task.Status.RUNNING]).update(
        status=Task.Status.FAILED, error=error[:20000], finished=timezone.now()
    )
