"""User-visible asynchronous tasks (NocoBase's async-task-manager), run through the event queue."""

from __future__ import annotations

from django.core.validators import MaxValueValidator
from django.db import models


class Task(models.Model):
    """One submitted task: what it is, where it runs, how far it got, and how it ended."""

    class Status(models.TextChoices):
        QUEUED = "queued", "queued"
        RUNNING = "running", "running"
        SUCCEEDED = "succeeded", "succeeded"
        FAILED = "failed", "failed"
        CANCELLED = "cancelled", "cancelled"

    title = models.CharField(max_length=200)
    plugin = models.CharField(max_length=100, db_index=True, help_text="plugin that owns the task type")
    channel = models.CharField(max_length=200, help_text="event queue channel that runs it")
    params = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    progress = models.PositiveSmallIntegerField(default=0, validators=[MaxValueValidator(100)], help_text="0-100")
    node = models.CharField(max_length=64, blank=True, db_index=True, help_text="instance id of the running node")
    tries = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    result = models.JSONField(null=True, blank=True, help_text="result summary (JSON)")
    message_id = models.CharField(max_length=32, blank=True, db_index=True, help_text="event queue message id")
    log = models.TextField(blank=True, help_text="what the task logged, its last lines (see tasks.logs)")
    log_dropped = models.PositiveIntegerField(default=0, help_text="older log lines let go to keep the bounds")
    created = models.DateTimeField(auto_now_add=True, db_index=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)

    FINAL = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.title} ({self.status}, {self.progress}%)"

    @property
    def done(self) -> bool:
        return self.status in self.FINAL
