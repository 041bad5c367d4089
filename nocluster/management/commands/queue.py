"""``manage.py queue``: pause, resume and inspect event-queue channels, and cancel a message, cluster-wide."""

from __future__ import annotations

import getpass
import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from nocluster.app import app
from nocluster.errors import NoclusterError


class Command(BaseCommand):
    help = (
        "Control the event queue of this app (NOCLUSTER NAME) on every node: 'pause CHANNEL' leaves the channel's "
        "messages queued (nothing is lost) until 'resume CHANNEL'; both persist across restarts and take effect "
        "on every consumer within a second. 'status [CHANNEL]' lists the subscribed channels with their depth "
        "(queued), the messages waiting out a long delay in the database (delayed; Celery backend) and whether "
        "they are paused. 'cancel MESSAGE_ID' cancels a message for good: a queued or delayed copy "
        "never runs, a running try gets its abort signal on this process. Channels are given without the app "
        "prefix. Exit status: 0 on success, 1 with a one-line error otherwise."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", metavar="{pause,resume,status,cancel}", required=True)
        for name, text in (("pause", "pause CHANNEL on every node"), ("resume", "resume a paused CHANNEL")):
            action = actions.add_parser(name, help=text)
            action.add_argument("channel", help="the channel, without the app prefix")
        status = actions.add_parser("status", help="depth and paused state of each channel (or of CHANNEL)")
        status.add_argument("channel", nargs="?", help="only this channel")
        status.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
        cancel = actions.add_parser("cancel", help="cancel a message by id, durably")
        cancel.add_argument("message_id", help="the id publish() returned")

    def handle(self, *args: Any, **options: Any) -> None:
        queue = app.event_queue
        by = f"manage.py queue ({getpass.getuser()})"
        try:
            if options["action"] == "pause":
                queue.pause(options["channel"], by=by)
                self.stdout.write(f"channel {options['channel']!r} of {app.name!r} paused")
            elif options["action"] == "resume":
                queue.resume(options["channel"], by=by)
                self.stdout.write(f"channel {options['channel']!r} of {app.name!r} resumed")
            elif options["action"] == "cancel":
                queue.cancel(options["message_id"])
                self.stdout.write(f"message {options['message_id']} of {app.name!r} cancelled")
            else:
                self.status(options["channel"], options["json"])
        except (ValueError, TypeError, NoclusterError) as exc:
            raise CommandError(str(exc).splitlines()[0]) from exc

    def status(self, only: str | None, as_json: bool) -> None:
        queue = app.event_queue
        channels = [queue.subscription(only).channel] if only else queue.channels()
        paused = set(queue.paused_channels(fresh=True))
        parked = queue.parking.counts() if queue.backend.park_after is not None else {}
        rows = [
            {"channel": name, "paused": name in paused, "depth": depth(name), "delayed": parked.get(name, 0)}
            for name in channels
        ]
        if as_json:
            self.stdout.write(json.dumps(rows))
            return
        if not rows:
            self.stdout.write(f"no event-queue channel is subscribed in {app.name!r}")
            return
        width = max(len("CHANNEL"), *(len(channel) for channel in channels))
        self.stdout.write(f"{'CHANNEL':<{width}}  {'STATE':<7}  {'DEPTH':>7}  {'DELAYED':>7}")
        for row in rows:
            shown = "?" if row["depth"] is None else row["depth"]
            state = "paused" if row["paused"] else "running"
            self.stdout.write(f"{row['channel']:<{width}}  {state:<7}  {shown:>7}  {row['delayed']:>7}")


def depth(channel: str) -> int | None:
    """Messages waiting on ``channel``, or None if the backend cannot tell or cannot be reached."""
    try:
        return app.event_queue.backend.depth(app.event_queue.full_channel(channel))
    except Exception:
        return None
