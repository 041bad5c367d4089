"""Admin for tasks: status, progress, node, tries, error and times; filters, search and a cancel action."""

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
    readonly_fields = [field.name for field in Task._meta.fields]
    actions = ["cancel_tasks"]
    date_hierarchy = "created"

    @admin.display(description="progress", ordering="progress")
    def progress_bar(self, task: Task) -> str:
        return format_html(
            '<progress value="{}" max="100" title="{}%"></progress> {}%', task.progress, task.progress, task.progress
        )

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
