"""``manage.py runnode``: one cluster node: install plugins, start consumers, serve HTTP with gunicorn."""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from nocluster.app import app
from nocluster.checks import check_secret_key


def announce_ready() -> None:
    """One JSON line on stdout that tools (and the test helpers) wait for."""
    line = {"event": "ready", "instance_id": app.instance_id, "name": app.name, "plugins": app.plugins.names()}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def start_web_node(worker: object) -> None:
    """gunicorn's ``post_worker_init``: the worker is a forked child, so it starts its own consumers."""
    app.start(role="web")
    announce_ready()


def refuse_development_key() -> None:
    """With DEBUG off this node serves for real: it must not sign sessions with the committed development key."""
    if settings.DEBUG:
        return
    errors = check_secret_key()
    if errors:
        error = errors[0]
        raise CommandError(f"{error.id}: {error.msg}; {error.hint} (or set DJANGO_DEBUG=true for development)")


class Command(BaseCommand):
    help = (
        "Run a nocluster node: install plugins not yet installed in the cluster, start this node's consumers "
        "(pub/sub listener, in-process queue workers) and serve HTTP with gunicorn. SIGTERM stops it gracefully."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--bind", default="127.0.0.1:8000", help="address:port to serve HTTP on")
        parser.add_argument("--threads", type=int, default=4, help="HTTP worker threads (default 4)")
        parser.add_argument("--no-http", action="store_true", help="run the consumers only, serve no HTTP")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["threads"] < 1:
            raise CommandError(f"--threads must be at least 1, got {options['threads']}")
        host, _, port = options["bind"].rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise CommandError(f"--bind must be HOST:PORT, got {options['bind']!r}")
        refuse_development_key()
        app.install_plugins()
        if options["no_http"]:
            self.run_consumers_only()
        else:
            self.serve(options["bind"], options["threads"])

    def run_consumers_only(self) -> None:
        stopping = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stopping.set())
        app.start(role="node")
        announce_ready()
        try:
            stopping.wait()
        finally:
            app.stop()

    def serve(self, bind: str, threads: int) -> None:
        from gunicorn.app.base import BaseApplication

        from nocluster.wsgi import application

        class NodeServer(BaseApplication):
            def load_config(self) -> None:
                self.cfg.set("bind", [bind])
                self.cfg.set("workers", 1)
                self.cfg.set("worker_class", "gthread")
                self.cfg.set("threads", threads)
                self.cfg.set("graceful_timeout", 30)
                self.cfg.set("post_worker_init", start_web_node)
                self.cfg.set("worker_exit", lambda server, worker: app.stop())

            def load(self) -> Any:
                return application

        NodeServer().run()
