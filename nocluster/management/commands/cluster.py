"""``manage.py cluster``: the nodes, the backends and whether each is reachable, queue depths, which live nodes
consume each channel (and its rate limit), failed messages."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from nocluster import app
from nocluster.cluster_state import backend_checks, ping_all
from nocluster.models import FailedMessage

# Seconds the probes may take in all: longer than any client's own connect timeout (kombu's 2 s), so each
# backend's own answer is what is reported.
PROBE_TIMEOUT = 10.0


def backends() -> dict[str, dict[str, Any]]:
    """Each component's backend class and whether its server answers, all asked at once (the Cluster page's
    checks, and the rate limiter's)."""
    checks = backend_checks(app)
    checks["rate_limits"] = (app.backend_names()["rate_limits"], app.event_queue.rate_limiter.ping)
    answers = ping_all({name: check for name, (_, check) in checks.items()}, PROBE_TIMEOUT)
    return {
        name: {"backend": backend, "reachable": answers[name]["ok"], "error": answers[name]["error"]}
        for name, (backend, _) in checks.items()
    }


def durability() -> list[str]:
    try:
        return app.event_queue.backend.durability_warnings()
    except Exception as exc:
        return [f"the event queue's broker configuration could not be read: {type(exc).__name__}: {exc}"]


def queue_depths(reachable: bool = True) -> dict[str, Any]:
    if not reachable:
        # Asking again would wait out the broker client's own connection retries (6 s on kombu) for nothing.
        return {"depths": {}, "error": "the event queue's broker is unreachable"}
    try:
        return {"depths": app.event_queue.depths(), "error": None}
    except Exception as exc:
        return {"depths": {}, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}


def channels(node_list: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Per subscribed channel: its rate limit and the live nodes that consume it (None when the registry is
    unknown: it cannot be read, or this process does not keep one)."""
    known = node_list is not None and app.node_registry.settings.enabled
    live = [node for node in node_list or [] if node["state"] == "up"]
    return {
        channel: {
            "rate_limit": str(limit) if (limit := app.event_queue.subscription(channel).rate_limit) else None,
            "consumers": [node["instance_id"] for node in live if channel in (node.get("channels") or [])]
            if known
            else None,
        }
        for channel in app.event_queue.channels()
    }


def channel_warnings(report: dict[str, dict[str, Any]]) -> list[str]:
    """A subscribed channel no live node consumes; a rate limit that each of several consumers keeps alone."""
    warnings = []
    per_process = not app.event_queue.rate_limiter.cluster_wide
    for channel, entry in report.items():
        consumers = entry["consumers"]
        if consumers == []:
            warnings.append(f"event queue channel {channel!r} is subscribed but no live node consumes it")
        elif per_process and entry["rate_limit"] and consumers and len(consumers) > 1:
            warnings.append(
                f"event queue channel {channel!r}: rate limit {entry['rate_limit']} holds per process, not for the "
                f'cluster ({len(consumers)} live consumers; NOCLUSTER["RATE_LIMITS"] is process-local: set '
                "NOCLUSTER_RATE_LIMIT_URL or REDIS_URL)"
            )
    return warnings


def failed_messages() -> int | None:
    try:
        return FailedMessage.objects.filter(app_name=app.name).count()
    except Exception:
        return None


def outbox() -> dict[str, Any] | None:
    try:
        return app.outbox.backlog()
    except Exception:
        return None


def nodes() -> list[dict[str, Any]] | None:
    try:
        return app.node_registry.nodes()
    except Exception:
        return None


class Command(BaseCommand):
    help = (
        "Show the cluster: its nodes with their state and last heartbeat, the configured backends and whether "
        "each is reachable, the event queue's depth per channel, the number of failed queue messages and the "
        "outbox backlog (committed messages not yet relayed). "
        "--json prints one JSON object for scripts; --check exits 1 when a backend is unreachable."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument("--check", action="store_true", help="exit with status 1 if a backend is unreachable")

    def handle(self, *args: Any, **options: Any) -> None:
        node_list = nodes()
        reached = backends()
        report: dict[str, Any] = {
            "app": app.name,
            "nodes": node_list,
            "backends": reached,
            "queues": queue_depths(reached["event_queue"]["reachable"]),
            "channels": channels(node_list),
            "failed_messages": failed_messages(),
            "outbox": outbox(),
            "warnings": durability(),
        }
        report["warnings"] += channel_warnings(report["channels"])
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2, default=str))
        else:
            self.print_report(report)
        for warning in report["warnings"]:
            self.stderr.write(f"warning: {warning}")
        down = [name for name, entry in report["backends"].items() if not entry["reachable"]]
        if options["check"] and down:
            raise CommandError(f"unreachable: {', '.join(down)}")

    def print_report(self, report: dict[str, Any]) -> None:
        write = self.stdout.write
        node_list = report["nodes"]
        write(f"cluster {report['app']!r}")
        write("\nNodes")
        if node_list is None:
            write("  (the node registry cannot be read: is the database migrated and reachable?)")
        elif not node_list:
            write("  (no node registered)")
        for node in node_list or []:
            write(
                f"  {node['instance_id'][:12]}  {node['state']:<7} {node['role']:<7} {node['host']}:{node['pid']}  "
                f"last heartbeat {node['last_heartbeat']}"
            )
        write("\nBackends")
        for name, entry in report["backends"].items():
            state = "ok" if entry["reachable"] else f"UNREACHABLE ({entry['error']})"
            write(f"  {name:<12} {entry['backend']:<60} {state}")
        write("\nEvent queue depth")
        queues = report["queues"]
        if queues["error"]:
            write(f"  (unknown: {queues['error']})")
        for channel, depth in queues["depths"].items():
            write(f"  {channel:<40} {'?' if depth is None else depth}")
        write("\nConsumers")
        for channel, entry in report["channels"].items():
            limit = f" (rate limit {entry['rate_limit']})" if entry["rate_limit"] else ""
            if entry["consumers"] is None:
                consumers = "? (no node registry)"
            else:
                consumers = ", ".join(node[:12] for node in entry["consumers"]) or "NONE"
            write(f"  {channel + limit:<40} {consumers}")
        failed = report["failed_messages"]
        write(f"\nFailed queue messages: {'?' if failed is None else failed}")
        backlog = report["outbox"]
        if backlog is None:
            write("Outbox: ? (is the database migrated and reachable?)")
        else:
            oldest = "" if backlog["oldest_seconds"] is None else f", oldest {backlog['oldest_seconds']:.1f} s"
            write(f"Outbox: {backlog['pending']} message(s) waiting for their broker{oldest}")
