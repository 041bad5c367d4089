"""Admin for tasks: status, progress, node, tries, error, times and log; filters, search and a cancel action."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from nocluster.admin_actions import GuardedActionsAdmin
from tasks import api
from tasks.models import Task


@admin.register(Task)
class TaskAdmin(GuardedActionsAdmin):
    list_display = (
        "title",
        "plugin",
        "status",
        "progress_bar",
        "node_short",
        "tries",
        "created",
        "started",
        "finished",
    )
    list_filter = ("status", "plugin", "node")
    search_fields = ("title", "plugin", "channel", "error", "message_id")
    # The log is shown as one preformatted block (``log_lines``), not as a form field.
    exclude = ("log",)
    readonly_fields = [*(field.name for field in Task._meta.fields if field.name != "log"), "log_lines"]
    actions = ["cancel_tasks"]
    date_hierarchy = "created"

    @admin.display(description="progress", ordering="progress")
    def progress_bar(self, task: Task) -> str:
        return format_html(
            '<progress value="{}" max="100" title="{}%"></progress> {}%', task.progress, task.progress, task.progress
        )

    @admin.display(description="log")
    def log_lines(self, task: Task) -> str:
        # What the task logged, on whichever node it ran (tasks.logs): its last lines, oldest first.
        if not task.log:
            return "(nothing logged)"
        dropped = f"({task.log_dropped} earlier line(s) not kept)\n" if task.log_dropped else ""
        return format_html('<pre class="task-log" style="white-space: pre-wrap">{}{}</pre>', dropped, task.log)

    @admin.display(description="node", ordering="node")
    def node_short(self, task: Task) -> str:
        # The first 8 characters, as the logs print them; the whole id on hover and on the task's page.
        return format_html('<span title="{}">{}</span>', task.node, task.node[:8])

    @admin.action(description="Cancel selected tasks (on whichever node runs them)", permissions=["change"])
    def cancel_tasks(self, request: HttpRequest, queryset: QuerySet[Task]) -> None:
        cancelled = 0
        for task in queryset:
            if not task.done:
                api.cancel(task.pk)
                cancelled += 1
        self.message_user(request, f"{cancelled} task(s) cancelled", messages.SUCCESS)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
