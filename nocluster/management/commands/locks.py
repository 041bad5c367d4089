"""``manage.py locks``: list, show and force-release the locks of this app (``app.lock_manager``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from nocluster.app import app
from nocluster.errors import NoclusterError
from nocluster.locks.backend import LockInfo


def _left(info: LockInfo) -> str:
    return "no expiry" if info.time_left is None else f"{info.time_left:.3f}"


class Command(BaseCommand):
    help = (
        "Inspect the locks of this app (NOCLUSTER NAME) in the configured lock backend: 'list [PATTERN]' lists held "
        "locks (key, holder instance id, fencing token, waiters, seconds left), 'show KEY' shows one, "
        "'release KEY --force' frees one whoever holds it. Keys are given without the '<app name>:lock:' prefix. "
        "On the local backend only this command's own process is seen, so use it with the Redis backend. "
        "Exit status: 0 on success, 1 with a one-line error otherwise."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", metavar="{list,show,release}", required=True)
        listing = actions.add_parser("list", help="list held locks whose key matches PATTERN")
        listing.add_argument("pattern", nargs="?", default="*", help="glob on the key: *, ?, [...] (default: *)")
        listing.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
        show = actions.add_parser("show", help="show the holder, token and time left of one lock")
        show.add_argument("key", help="the lock key, without the '<app name>:lock:' prefix")
        show.add_argument("--json", action="store_true", help="print JSON")
        release = actions.add_parser("release", help="force-release one lock (needs --force)")
        release.add_argument("key", help="the lock key, without the '<app name>:lock:' prefix")
        release.add_argument(
            "--force", action="store_true", help="really free it: the holder may still be running its work"
        )
        release.add_argument(
            "--token", type=int, help="release only the holder with this fencing token (as 'show' printed it)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            if options["action"] == "list":
                self.list_locks(options["pattern"], options["json"])
            elif options["action"] == "show":
                self.show(options["key"], options["json"])
            else:
                self.release(options["key"], options["force"], options["token"])
        except (ValueError, TypeError, NoclusterError) as exc:
            raise CommandError(str(exc)) from exc

    def list_locks(self, pattern: str, as_json: bool) -> None:
        found = app.lock_manager.list_locks(pattern)
        if as_json:
            self.stdout.write(json.dumps([asdict(info) for info in found]))
            return
        if not found:
            self.stdout.write(f"no locks of {app.name!r} match {pattern!r}")
            return
        width = max(len("KEY"), *(len(info.key) for info in found))
        self.stdout.write(f"{'KEY':<{width}}  {'INSTANCE':<32}  {'TOKEN':>8}  {'WAITING':>7}  TIME LEFT (s)")
        for info in found:
            self.stdout.write(
                f"{info.key:<{width}}  {info.instance_id:<32}  {info.token!s:>8}  {info.waiting:>7}  {_left(info)}"
            )

    def show(self, key: str, as_json: bool) -> None:
        info = app.lock_manager.get_lock(key)
        if info is None:
            raise CommandError(f"lock {key!r} of {app.name!r} is not held")
        if as_json:
            self.stdout.write(json.dumps(asdict(info)))
            return
        for label, value in (
            ("key", info.key),
            ("name", info.name),
            ("instance", info.instance_id),
            ("token", info.token),
            ("time left (s)", _left(info)),
            ("waiting", info.waiting),
        ):
            self.stdout.write(f"{label + ':':<15}{value}")

    def release(self, key: str, force: bool, token: int | None) -> None:
        if not force:
            raise CommandError(f"refusing to release lock {key!r} without --force (its holder may still be working)")
        if not app.lock_manager.force_release(key, token):
            held = "" if token is None else f" with token {token}"
            raise CommandError(f"lock {key!r} of {app.name!r} is not held{held}")
        self.stdout.write(f"released lock {key!r} of {app.name!r}")
