from __future__ import annotations

from django.apps import AppConfig


class TasksConfig(AppConfig):
    """User-visible asynchronous tasks; marks a task failed when the queue records its message as failed."""

    name = "tasks"
    verbose_name = "Tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from nocluster.queue.failures import message_failed
        from tasks.api import mark_failed_message

        message_failed.connect(mark_failed_message, dispatch_uid="tasks.mark_failed_message")
