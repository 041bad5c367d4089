"""The database side of the scheduler: one row per job (its state) and one row per run (the claim of a slot).

Ours, and why it holds across nodes: a slot is claimed by inserting its :class:`~nocluster.models.ScheduleRun` row
with one ``INSERT ... ON CONFLICT DO NOTHING`` on the unique (app, job, slot) constraint, and its message is
published in the same transaction (the outbox row, or the queue row of the database backend, commits with the
claim). Two nodes inserting the same slot at once: PostgreSQL makes the second wait for the first's commit, then
do nothing; so whatever the number of nodes, restarts or clocks, a slot has at most one row and one message, and
a claim that rolls back leaves neither. The job's ``last_slot`` only moves forward (a conditional ``UPDATE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import connections, transaction
from django.db.models import Q

if TYPE_CHECKING:
    from django.db.models import QuerySet

    from nocluster.models import ScheduledJob, ScheduleRun
    from nocluster.schedule.jobs import PeriodicJob

# The kinds of run: a slot on time, the one run standing for missed slots (misfire "once"), a run by hand.
SCHEDULED, CATCH_UP, MANUAL = "scheduled", "catch-up", "manual"
QUEUED = "queued"


def job_model() -> type[ScheduledJob]:
    from nocluster.models import ScheduledJob  # this module loads before the app registry is ready

    return ScheduledJob


def run_model() -> type[ScheduleRun]:
    from nocluster.models import ScheduleRun

    return ScheduleRun


@dataclass
class JobStatus:
    """A job as ``manage.py schedule list`` shows it: its declaration, its row (if any node created it) and its
    latest run."""

    job: PeriodicJob
    enabled: bool
    last_slot: datetime | None
    next_run: datetime | None
    last_run: ScheduleRun | None

    def as_dict(self) -> dict[str, Any]:
        run = self.last_run
        return {
            "name": self.job.name,
            "schedule": self.job.schedule.describe(),
            "channel": self.job.channel,
            "misfire": self.job.misfire,
            "enabled": self.enabled,
            "last_slot": self.last_slot.isoformat() if self.last_slot else None,
            "next_run": self.next_run.isoformat() if self.next_run else None,
            "last_run": run.claimed_at.isoformat() if run else None,
            "last_kind": run.kind if run else None,
            "last_outcome": run.outcome if run else None,
        }


class ClaimStore:
    """The rows of app ``app_name`` on database ``alias``."""

    def __init__(self, app_name: str, alias: str) -> None:
        self.app_name = app_name
        self.alias = alias

    def jobs(self) -> QuerySet[ScheduledJob]:
        return job_model().objects.using(self.alias).filter(app_name=self.app_name)

    def runs(self) -> QuerySet[ScheduleRun]:
        return run_model().objects.using(self.alias).filter(app_name=self.app_name)

    # --- job state ----------------------------------------------------------------------------------------
    def state(self, job: PeriodicJob, now: datetime) -> ScheduledJob:
        """The job's row, created if missing: a new job starts after the latest slot at or before ``now`` (it never
        catches up on slots from before it existed). The declared fields are brought up to date."""
        declared = {"schedule": job.schedule.describe(), "channel": job.channel, "misfire": job.misfire}
        row, created = self.jobs().get_or_create(
            app_name=self.app_name,  # create() takes no value from the queryset's filter
            name=job.name,
            defaults={**declared, "enabled": job.enabled, "last_slot": job.schedule.latest_at_or_before(now),
                      "next_run": job.schedule.next_after(now)},
        )  # fmt: skip
        changed = [name for name, value in declared.items() if getattr(row, name) != value]
        if changed and not created:
            for name in changed:
                setattr(row, name, declared[name])
            row.save(update_fields=changed)
        return row

    def advance(self, job: PeriodicJob, slot: datetime) -> None:
        """Record ``slot`` as handled: ``last_slot`` moves forward only (a node with an older view changes nothing)."""
        later = Q(last_slot__isnull=True) | Q(last_slot__lt=slot)
        self.jobs().filter(later, name=job.name).update(last_slot=slot, next_run=job.schedule.next_after(slot))

    def set_enabled(self, job: PeriodicJob, enabled: bool, now: datetime) -> None:
        """Enable or disable the job. Enabling starts it at the next slot: the slots that passed while it was
        disabled are handled, not missed (no catch-up for them)."""
        self.state(job, now)
        self.jobs().filter(name=job.name).update(enabled=enabled)
        if enabled:
            latest = job.schedule.latest_at_or_before(now)
            if latest is not None:
                self.advance(job, latest)

    # --- runs ---------------------------------------------------------------------------------------------
    def insert_run(
        self, job: str, slot: datetime | None, kind: str, missed: int, node: str, now: datetime
    ) -> int | None:
        """Insert a run row in the current transaction; its id, or None if another node has this slot already.

        One statement; ``ON CONFLICT DO NOTHING`` (PostgreSQL, SQLite) neither raises nor breaks the transaction.
        The SQL is built from the model's own table and column names (quoted); every value is a parameter.
        """
        model = run_model()
        connection = connections[self.alias]
        quote = connection.ops.quote_name
        fields = ("app_name", "job", "slot", "kind", "missed", "message_id", "node", "claimed_at", "outcome", "error")
        by_name = {field.name: field for field in model._meta.concrete_fields}
        values = dict(zip(fields, (self.app_name, job, slot, kind, missed, "", node, now, QUEUED, ""), strict=True))
        params = [by_name[name].get_db_prep_save(values[name], connection) for name in fields]
        columns = ", ".join(quote(by_name[name].column) for name in fields)
        placeholders = ", ".join(["%s"] * len(fields))
        returning = f" RETURNING {quote('id')}" if connection.features.can_return_columns_from_insert else ""
        sql = (
            f"INSERT INTO {quote(model._meta.db_table)} ({columns}) VALUES ({placeholders})"  # noqa: S608
            f" ON CONFLICT DO NOTHING{returning}"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            if returning:
                # The returned row, not rowcount: SQLite counts the rows of an INSERT ... RETURNING only once read.
                row = cursor.fetchone()
                return None if row is None else int(row[0])
            return int(cursor.lastrowid) if cursor.rowcount else None

    def set_message(self, run_id: int, message_id: str) -> None:
        self.runs().filter(pk=run_id).update(message_id=message_id)

    def settle(self, message_id: str, outcome: str, when: datetime, error: str = "") -> int:
        """Record how the message of a run came out; how many rows it matched (0: not a run of this app)."""
        return self.runs().filter(message_id=message_id).update(outcome=outcome, finished_at=when, error=error[:20000])

    def latest_run(self, job: str) -> ScheduleRun | None:
        """The latest run of ``job`` (scheduled, catch-up or by hand), by claim time."""
        return self.runs().filter(job=job).order_by("-claimed_at", "-id").first()

    def prune(self, before: datetime) -> int:
        """Delete the runs claimed before ``before``, except the latest run of each job (its outcome stays shown);
        return how many were deleted."""
        old = self.runs().filter(claimed_at__lt=before)
        names = sorted(set(old.values_list("job", flat=True)))
        keep = [run.pk for run in map(self.latest_run, names) if run is not None]
        deleted, _ = old.exclude(pk__in=keep).delete()
        return deleted

    def atomic(self) -> transaction.Atomic:
        return transaction.atomic(using=self.alias)
