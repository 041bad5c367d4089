"""Cluster-wide records of the core."""

from __future__ import annotations

from typing import Any

from django.db import models


class InstalledPlugin(models.Model):
    """A plugin whose ``install()`` ran in this cluster (the row is also the install lock)."""

    name = models.CharField(max_length=100, unique=True)
    installed_at = models.DateTimeField(null=True, blank=True)
    installed_by = models.CharField(max_length=32, blank=True, help_text="instance id of the installing node")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class FailedMessage(models.Model):
    """An event queue message whose last try failed: kept, never dropped, and re-queueable from the admin."""

    app_name = models.CharField(max_length=100, blank=True, help_text="app.name of the publishing project")
    channel = models.CharField(max_length=200, db_index=True, help_text="channel, without the app prefix")
    message_id = models.CharField(max_length=32, blank=True, db_index=True)
    payload = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    tries = models.PositiveIntegerField(default=1, help_text="tries made, the first one included")
    max_retries = models.PositiveIntegerField(default=0)
    timeout = models.FloatField(default=15.0, help_text="seconds")
    node = models.CharField(max_length=200, blank=True, help_text="node that made the last try")
    created = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.channel} {self.message_id} ({self.tries} tries)"


class Node(models.Model):
    """A node process (web or worker) of the cluster, as it registered itself; see :mod:`nocluster.nodes`."""

    instance_id = models.CharField(max_length=32, primary_key=True)
    app_name = models.CharField(max_length=100, db_index=True)
    role = models.CharField(max_length=20, help_text="web, worker or node")
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    plugins = models.JSONField(default=list)
    backends = models.JSONField(default=dict, help_text="component: backend class")
    channels = models.JSONField(default=list, blank=True, help_text="event queue channels this node consumes")
    started_at = models.DateTimeField()
    last_heartbeat = models.DateTimeField(db_index=True)
    stopped_at = models.DateTimeField(null=True, blank=True, help_text="set when the node stopped gracefully")

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.role} {self.instance_id[:8]} on {self.host} (pid {self.pid})"

    def as_dict(self) -> dict[str, object]:
        return {
            "instance_id": self.instance_id,
            "app_name": self.app_name,
            "role": self.role,
            "host": self.host,
            "pid": self.pid,
            "plugins": self.plugins,
            "backends": self.backends,
            "channels": self.channels,
            "started_at": self.started_at.isoformat(),
            "last_heartbeat": self.last_heartbeat.isoformat(),
            "stopped_at": self.stopped_at.isoformat() if self.stopped_at else None,
        }


class OutboxMessage(models.Model):
    """A message published inside a transaction, waiting to be relayed to its broker (:mod:`nocluster.outbox`).

    Written in the caller's transaction, on the caller's database, so it commits or rolls back with the caller's
    data; deleted once the broker accepted it.
    """

    app_name = models.CharField(max_length=100, help_text="app.name of the publishing project")
    kind = models.CharField(max_length=20, help_text="queue or sync")
    channel = models.CharField(max_length=200, help_text="channel, without the app prefix")
    message_id = models.CharField(max_length=64, blank=True)
    origin = models.CharField(max_length=32, blank=True, help_text="instance id of the publishing node")
    body = models.JSONField(help_text="what the relay sends")
    created = models.DateTimeField(auto_now_add=True)
    attempts = models.PositiveIntegerField(default=0, help_text="relay attempts that failed")
    next_attempt = models.DateTimeField(null=True, blank=True, help_text="not relayed before this time")
    last_error = models.TextField(blank=True)

    # Not a column: in the process that wrote the row, what its body was made from (its sender skips decoding it).
    memo: Any = None

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["app_name", "id"], name="nocluster_outbox_app_id")]

    def __str__(self) -> str:
        return f"{self.kind} {self.channel} {self.message_id}"


class QueuedMessage(models.Model):
    """An event queue message of the database backend (the embedded default): queued, leased while it runs."""

    app_name = models.CharField(max_length=100)
    channel = models.CharField(max_length=200, help_text="channel, without the app prefix")
    message_id = models.CharField(max_length=64)
    body = models.JSONField(help_text="the message as it travels (JSON)")
    due = models.DateTimeField(help_text="not taken before this time")
    lease_owner = models.CharField(max_length=32, blank=True, help_text="instance id of the node running it")
    lease_until = models.DateTimeField(null=True, blank=True, help_text="taken again after this time")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["due", "id"]
        indexes = [models.Index(fields=["app_name", "channel", "due"], name="nocluster_queued_due")]

    def __str__(self) -> str:
        return f"{self.channel} {self.message_id}"


class RelayedRun(models.Model):
    """A relayed event queue message that started to run, and the send it came from (see
    :mod:`nocluster.queue.ledger`): a copy from another send is dropped. Rows older than a day are removed."""

    app_name = models.CharField(max_length=100)
    message_id = models.CharField(max_length=64)
    send_id = models.CharField(max_length=32)
    created = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["app_name", "message_id"], name="nocluster_relayed_once")]

    def __str__(self) -> str:
        return f"{self.message_id} from send {self.send_id}"


class Redelivery(models.Model):
    """How often the broker delivered an event queue try after its worker died (Celery backend): a message that
    keeps killing its worker is recorded failed after ``max_deliveries`` instead of running for ever."""

    app_name = models.CharField(max_length=100)
    message_id = models.CharField(max_length=64)
    retried = models.PositiveIntegerField()
    deliveries = models.PositiveIntegerField(default=1)
    created = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["app_name", "message_id", "retried"], name="nocluster_redelivery_once"),
        ]

    def __str__(self) -> str:
        return f"{self.message_id} try {self.retried}: {self.deliveries} deliveries"


class ParkedMessage(models.Model):
    """An event queue message waiting out a long delay in the database instead of in a consumer
    (:mod:`nocluster.queue.parking`): sent to its broker shortly before ``due``, then deleted."""

    app_name = models.CharField(max_length=100)
    channel = models.CharField(max_length=200, help_text="channel, without the app prefix")
    message_id = models.CharField(max_length=64)
    body = models.JSONField(help_text="the message as it travels (JSON)")
    due = models.DateTimeField(help_text="when it may run")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["due", "id"]
        indexes = [
            models.Index(fields=["app_name", "due"], name="nocluster_parked_due"),
            models.Index(fields=["app_name", "message_id"], name="nocluster_parked_message"),
        ]

    def __str__(self) -> str:
        return f"{self.channel} {self.message_id} due {self.due:%Y-%m-%d %H:%M:%S}"


class ChannelState(models.Model):
    """A paused event queue channel, cluster-wide (see :mod:`nocluster.queue.control`): no node runs its messages
    until it is resumed. A channel without a row, or with ``paused`` false, runs."""

    app_name = models.CharField(max_length=100)
    channel = models.CharField(max_length=200, help_text="channel, without the app prefix")
    paused = models.BooleanField(default=False)
    changed_at = models.DateTimeField(auto_now=True)
    changed_by = models.CharField(max_length=200, blank=True, help_text="who paused or resumed it last")

    class Meta:
        ordering = ["channel"]
        constraints = [models.UniqueConstraint(fields=["app_name", "channel"], name="nocluster_channel_state_once")]

    def __str__(self) -> str:
        return f"{self.channel} ({'paused' if self.paused else 'running'})"


class CancelledMessage(models.Model):
    """An event queue message cancelled before or while it ran: a delivery of it is dropped, on any node, also
    after every node restarted. Rows are removed after ``nocluster.queue.control.CANCEL_KEPT`` seconds."""

    app_name = models.CharField(max_length=100)
    message_id = models.CharField(max_length=64)
    created = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["app_name", "message_id"], name="nocluster_cancelled_once")]

    def __str__(self) -> str:
        return f"{self.message_id} (cancelled)"


class UniqueMessage(models.Model):
    """The message holding a ``unique_key`` while it is queued, delayed or running; deleted when it ends, taken
    over by a new publish once ``expires`` passed (a lost message cannot hold its key for ever)."""

    app_name = models.CharField(max_length=100)
    key = models.CharField(max_length=200)
    message_id = models.CharField(max_length=64)
    expires = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["app_name", "key"], name="nocluster_unique_key_once")]

    def __str__(self) -> str:
        return f"{self.key}: {self.message_id}"


class ScheduledJob(models.Model):
    """The cluster-wide state of one periodic job (:mod:`nocluster.schedule`): whether it runs, and the latest slot
    handled (claimed, skipped as missed, or passed while disabled). Nodes create the row when they first see the job
    and keep its declared fields up to date; ``enabled`` and ``last_slot`` survive restarts."""

    app_name = models.CharField(max_length=100)
    name = models.CharField(max_length=200)
    schedule = models.CharField(max_length=200, help_text="as declared: every N s, or a cron expression")
    channel = models.CharField(max_length=200, help_text="event queue channel, without the app prefix")
    misfire = models.CharField(max_length=10, help_text="skip or once")
    enabled = models.BooleanField(default=True)
    last_slot = models.DateTimeField(null=True, blank=True, help_text="the latest slot handled (UTC)")
    next_run = models.DateTimeField(null=True, blank=True, help_text="the next slot (UTC)")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["app_name", "name"], name="nocluster_scheduled_job_once")]

    def __str__(self) -> str:
        return self.name


class ScheduleRun(models.Model):
    """One run of a periodic job: a claimed slot (one row per job and slot: the unique constraint is what makes it
    run once for the whole cluster) or a run started by hand (no slot). Rows older than ``KEEP`` are removed."""

    app_name = models.CharField(max_length=100)
    job = models.CharField(max_length=200)
    slot = models.DateTimeField(null=True, blank=True, help_text="nominal time of the slot (UTC); empty: by hand")
    kind = models.CharField(max_length=10, help_text="scheduled, catch-up or manual")
    missed = models.PositiveIntegerField(default=0, help_text="catch-up: the slots it stands for")
    message_id = models.CharField(max_length=64, blank=True)
    node = models.CharField(max_length=32, blank=True, help_text="instance id of the node that claimed it")
    claimed_at = models.DateTimeField(help_text="by the claiming node's clock")
    outcome = models.CharField(max_length=10, default="queued", help_text="queued, done, failed or cancelled")
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-claimed_at"]
        constraints = [models.UniqueConstraint(fields=["app_name", "job", "slot"], name="nocluster_schedule_slot_once")]
        indexes = [
            models.Index(fields=["app_name", "message_id"], name="nocluster_run_message"),
            models.Index(fields=["app_name", "job", "claimed_at"], name="nocluster_run_claimed"),
        ]

    def __str__(self) -> str:
        return f"{self.job} {self.kind} {self.slot.isoformat() if self.slot else self.claimed_at.isoformat()}"
