from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from nocluster import admin_schedule, app  # noqa: F401 (importing admin_schedule registers the periodic job pages)
from nocluster.admin_actions import GuardedActionsAdmin
from nocluster.models import FailedMessage, InstalledPlugin, Node, OutboxMessage
from nocluster.nodes import node_state


@admin.register(InstalledPlugin)
class InstalledPluginAdmin(admin.ModelAdmin):
    list_display = ("name", "installed_at", "installed_by")
    readonly_fields = ("name", "installed_at", "installed_by")

    def has_add_permission(self, request: object) -> bool:
        return False

    def has_delete_permission(self, request: object, obj: object = None) -> bool:
        return False  # deleting a row would run that plugin's install() again on the next start


@admin.register(FailedMessage)
class FailedMessageAdmin(GuardedActionsAdmin):
    """Event queue messages whose last try failed; the re-queue action (change permission) publishes them again."""

    list_display = ("channel", "message_id", "tries", "node", "short_error", "created")
    list_filter = ("channel", "node")
    search_fields = ("channel", "message_id", "error")
    readonly_fields = [field.name for field in FailedMessage._meta.fields]
    actions = ["requeue"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[FailedMessage]:
        # Only this project's: re-queueing another project's record would publish it into our channels.
        return super().get_queryset(request).filter(app_name=app.name)

    @admin.display(description="error")
    def short_error(self, failed: FailedMessage) -> str:
        return failed.error.splitlines()[0][:120] if failed.error else ""

    @admin.action(description="Re-queue selected messages", permissions=["change"])
    def requeue(self, request: HttpRequest, queryset: QuerySet[FailedMessage]) -> None:
        done = 0
        for failed in queryset:
            try:
                app.event_queue.requeue(failed)
                done += 1
            except Exception as exc:
                self.message_user(request, f"{failed}: not re-queued: {exc}", messages.ERROR)
        if done:
            self.message_user(request, f"{done} message(s) re-queued", messages.SUCCESS)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    """The node registry, read-only: every node keeps its own row up to date."""

    list_display = ("instance_id", "state", "role", "host", "pid", "last_heartbeat", "started_at")
    list_filter = ("role", "host")
    search_fields = ("instance_id", "host")
    readonly_fields = [field.name for field in Node._meta.fields]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Node]:
        return super().get_queryset(request).filter(app_name=app.name)

    @admin.display(description="state")
    def state(self, node: Node) -> str:
        return node_state(node, timezone.now(), app.node_registry.settings.gone_after)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False  # every node keeps its own row; the registry removes the dead ones


@admin.register(OutboxMessage)
class OutboxMessageAdmin(admin.ModelAdmin):
    """Messages committed but not yet relayed to their broker (read-only: every node's relay sends them)."""

    list_display = ("kind", "channel", "message_id", "age", "attempts", "next_attempt", "short_error")
    list_filter = ("kind", "channel")
    search_fields = ("channel", "message_id", "last_error")
    readonly_fields = [field.name for field in OutboxMessage._meta.fields]

    def get_queryset(self, request: HttpRequest) -> QuerySet[OutboxMessage]:
        return super().get_queryset(request).filter(app_name=app.name)

    @admin.display(description="age (s)", ordering="created")
    def age(self, row: OutboxMessage) -> str:
        return f"{(timezone.now() - row.created).total_seconds():.1f}"

    @admin.display(description="last error")
    def short_error(self, row: OutboxMessage) -> str:
        return row.last_error.splitlines()[0][:120] if row.last_error else ""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False  # deleting a row would lose a committed message
