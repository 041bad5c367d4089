"""``manage.py schedule``: list the periodic jobs, run one now, enable or disable one (``app.scheduler``)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from nocluster.app import app
from nocluster.errors import NoclusterError
from nocluster.schedule.claims import JobStatus

COLUMNS = ("NAME", "SCHEDULE", "CHANNEL", "MISFIRE", "ENABLED", "LAST RUN", "OUTCOME", "NEXT RUN")


def _time(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _row(status: JobStatus) -> tuple[str, ...]:
    run = status.last_run
    job = status.job
    last = f"{_time(run.claimed_at)} ({run.kind})" if run else "never"
    enabled = "yes" if status.enabled else "no"
    outcome = run.outcome if run else "-"
    return (job.name, job.schedule.describe(), job.channel, job.misfire, enabled, last, outcome, _time(status.next_run))


class Command(BaseCommand):
    help = (
        "The periodic jobs the plugins declare: 'list' shows each with its schedule, channel, misfire policy, "
        "whether it is enabled, its last run (and outcome) and next run (UTC); 'run NAME' publishes one message "
        "of the job now (a manual run; the schedule goes on as before); 'enable NAME' / 'disable NAME' for the "
        "whole cluster (enabled again, a job starts at its next slot). Exit status: 0 on success, 1 with a one-line "
        "error otherwise."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", metavar="{list,run,enable,disable}", required=True)
        listing = actions.add_parser("list", help="list the periodic jobs")
        listing.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
        for name, text in (("run", "run one job now"), ("enable", "enable one job"), ("disable", "disable one job")):
            actions.add_parser(name, help=text).add_argument("name", help="the job's name")

    def handle(self, *args: Any, **options: Any) -> None:
        app.load_plugins()
        try:
            if options["action"] == "list":
                self.list_jobs(options["json"])
            elif options["action"] == "run":
                run = app.scheduler.run_now(options["name"])
                self.stdout.write(f"job {options['name']!r} of {app.name!r} run now: message {run.message_id}")
            else:
                if options["action"] == "enable":
                    app.scheduler.enable(options["name"])
                else:
                    app.scheduler.disable(options["name"])
                self.stdout.write(f"job {options['name']!r} of {app.name!r} {options['action']}d")
        except (ValueError, TypeError, NoclusterError) as exc:
            raise CommandError(str(exc).splitlines()[0]) from exc

    def list_jobs(self, as_json: bool) -> None:
        statuses = app.scheduler.status()
        if as_json:
            self.stdout.write(json.dumps([status.as_dict() for status in statuses]))
            return
        if not statuses:
            self.stdout.write(f"no periodic job is declared in {app.name!r}")
            return
        rows = [COLUMNS, *map(_row, statuses)]
        widths = [max(len(row[index]) for row in rows) for index in range(len(COLUMNS))]
        for row in rows:
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
