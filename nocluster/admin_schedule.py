"""Admin pages of the periodic jobs: each job with its last and next run and last outcome; run now, enable, disable.

The actions need the change permission on scheduled jobs (a view-only staff user sees neither them nor gets them
run by posting, see :class:`~nocluster.admin_actions.GuardedActionsAdmin`). The rows themselves are read-only:
the nodes keep the declared fields up to date, and deleting a row would lose the job's place in its schedule.
"""

from __future__ import annotations

from collections.abc import Callable

from django.contrib import admin, messages
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from nocluster import app
from nocluster.admin_actions import GuardedActionsAdmin
from nocluster.models import ScheduledJob, ScheduleRun


def _latest_run(field: str) -> Subquery:
    runs = ScheduleRun.objects.filter(app_name=OuterRef("app_name"), job=OuterRef("name"))
    return Subquery(runs.order_by("-claimed_at", "-id").values(field)[:1])


@admin.register(ScheduledJob)
class ScheduledJobAdmin(GuardedActionsAdmin):
    """The periodic jobs of this project, as the nodes recorded them."""

    list_display = ("name", "schedule", "channel", "misfire", "enabled", "last_run", "next_run", "last_outcome", "runs")
    list_filter = ("enabled", "channel")
    search_fields = ("name", "channel")
    readonly_fields = [field.name for field in ScheduledJob._meta.fields]
    actions = ["run_now", "enable_jobs", "disable_jobs"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ScheduledJob]:
        rows = super().get_queryset(request).filter(app_name=app.name)
        return rows.annotate(latest_claimed=_latest_run("claimed_at"), latest_outcome=_latest_run("outcome"))

    @admin.display(description="last run", ordering="latest_claimed")
    def last_run(self, job: ScheduledJob) -> object:
        return getattr(job, "latest_claimed", None) or "-"

    @admin.display(description="last outcome")
    def last_outcome(self, job: ScheduledJob) -> str:
        return getattr(job, "latest_outcome", None) or "-"

    @admin.display(description="runs")
    def runs(self, job: ScheduledJob) -> str:
        url = reverse("admin:nocluster_schedulerun_changelist")
        return format_html('<a href="{}?job={}">runs</a>', url, job.name)

    @admin.action(description="Run selected jobs now", permissions=["change"])
    def run_now(self, request: HttpRequest, queryset: QuerySet[ScheduledJob]) -> None:
        self._each(request, queryset, "run now", app.scheduler.run_now)

    @admin.action(description="Enable selected jobs (from their next slot)", permissions=["change"])
    def enable_jobs(self, request: HttpRequest, queryset: QuerySet[ScheduledJob]) -> None:
        self._each(request, queryset, "enabled", app.scheduler.enable)

    @admin.action(description="Disable selected jobs", permissions=["change"])
    def disable_jobs(self, request: HttpRequest, queryset: QuerySet[ScheduledJob]) -> None:
        self._each(request, queryset, "disabled", app.scheduler.disable)

    def _each(
        self, request: HttpRequest, queryset: QuerySet[ScheduledJob], done: str, action: Callable[[str], object]
    ) -> None:
        app.load_plugins()  # the jobs are declared by the plugins
        count = 0
        for job in queryset:
            try:
                action(job.name)
                count += 1
            except Exception as exc:
                self.message_user(request, f"{job.name}: not {done}: {exc}", messages.ERROR)
        if count:
            self.message_user(request, f"{count} job(s) {done}", messages.SUCCESS)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False  # the row holds the job's place in its schedule (its latest slot)


@admin.register(ScheduleRun)
class ScheduleRunAdmin(admin.ModelAdmin):
    """The runs of the periodic jobs (one per claimed slot, and the runs by hand), newest first; read-only."""

    list_display = ("job", "slot", "kind", "missed", "outcome", "claimed_at", "finished_at", "short_node", "message_id")
    list_filter = ("job", "kind", "outcome")
    search_fields = ("job", "message_id", "node")
    readonly_fields = [field.name for field in ScheduleRun._meta.fields]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ScheduleRun]:
        return super().get_queryset(request).filter(app_name=app.name)

    @admin.display(description="node", ordering="node")
    def short_node(self, run: ScheduleRun) -> str:
        return format_html('<span title="{}">{}</span>', run.node, run.node[:8])

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False  # a run's row is the claim of its slot: deleting it could let the slot run again
