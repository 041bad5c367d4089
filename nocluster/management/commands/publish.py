"""``manage.py publish``: send a pub/sub, sync or event-queue message from the command line."""

from __future__ import annotations

import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from nocluster import NoclusterError, app
from nocluster.pubsub.backends.local import LocalPubSubBackend
from nocluster.queue.backends.memory import MemoryQueueBackend


class Command(BaseCommand):
    help = (
        "Publish a JSON message on CHANNEL: a pub/sub message (default), a sync message (--sync: "
        "'sync.CHANNEL', each other node's plugin CHANNEL reloads) or an event-queue message (--queue). The payload "
        "is the PAYLOAD argument, or standard input when PAYLOAD is '-' or left out. Pub/sub and sync "
        "messages need a cluster broker (BROKER_URL or PUBSUB_URL): the in-process bus would reach this short-lived "
        "process only. --queue also works on embedded defaults, where the queue is the project's database."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("channel", help="channel name, without the app prefix")
        parser.add_argument("payload", nargs="?", default="-", help="JSON payload, or '-' to read standard input")
        kind = parser.add_mutually_exclusive_group()
        kind.add_argument("--sync", action="store_true", help="publish a sync message (on 'sync.CHANNEL')")
        kind.add_argument("--queue", action="store_true", help="publish to the event queue")
        parser.add_argument("--timeout", type=float, help="--queue: seconds per try (default 15)")
        parser.add_argument("--max-retries", type=int, help="--queue: further tries after a failure (default 0)")
        parser.add_argument("--count", type=int, default=1, help="publish N copies (default 1), with a progress bar")

    def handle(self, *args: Any, channel: str, payload: str, count: int, **options: Any) -> None:
        if count < 1:
            raise CommandError(f"--count must be at least 1, got {count}")
        if not options["queue"] and (options["timeout"] is not None or options["max_retries"] is not None):
            raise CommandError("--timeout and --max-retries apply to --queue messages only")
        message = self.read_payload(payload)
        send = self.sender(channel, options)
        ids = []
        try:
            for done in range(1, count + 1):
                ids.append(send(message))
                if count > 1:
                    self.progress(done, count)
        except (TypeError, ValueError, NoclusterError) as exc:
            raise CommandError(str(exc).splitlines()[0]) from exc
        kind = "sync" if options["sync"] else "queue" if options["queue"] else "pub/sub"
        last = f", last id {ids[-1]}" if ids and ids[-1] else ""
        self.stdout.write(f"published {count} {kind} message(s) on {channel!r}{last}")

    def read_payload(self, payload: str) -> Any:
        if payload == "-" and sys.stdin.isatty():
            raise CommandError("no payload: give it as an argument or pipe JSON on standard input")
        text = sys.stdin.read() if payload == "-" else payload
        try:
            return json.loads(text)
        except ValueError as exc:
            raise CommandError(f"payload is not JSON: {exc}") from exc
        except RecursionError:
            raise CommandError("payload is nested too deeply to read (at most 100 levels are sent)") from None

    def sender(self, channel: str, options: dict[str, Any]) -> Any:
        if options["queue"]:
            if isinstance(app.event_queue.backend, MemoryQueueBackend):
                raise CommandError(
                    "the event queue is in-process (memory backend): use the database backend (the default) or set "
                    "BROKER_URL to reach workers"
                )
            timeout = 15.0 if options["timeout"] is None else options["timeout"]
            max_retries = 0 if options["max_retries"] is None else options["max_retries"]
            return lambda message: app.event_queue.publish(channel, message, timeout=timeout, max_retries=max_retries)
        if isinstance(app.pub_sub_manager.backend, LocalPubSubBackend):
            raise CommandError("pub/sub is in-process (local backend): set PUBSUB_URL or BROKER_URL to reach nodes")
        if options["sync"]:
            return lambda message: app.sync_message_manager.publish(channel, message)
        return lambda message: app.pub_sub_manager.publish(channel, message)

    def progress(self, done: int, total: int, width: int = 30) -> None:
        filled = width * done // total
        self.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}", ending="")
        if done == total:
            self.stderr.write("")
