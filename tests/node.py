"""A node process for multi-node tests: ``python -m tests.node module:function [--start|--no-start]``.

Sets Django up (``DJANGO_ENV=test``), installs plugins, optionally starts the consumers, prints one JSON
``ready`` line, then reads JSON commands from stdin, one per line, and prints a JSON ``reply`` for each.
SIGTERM (or the end of stdin) stops the node gracefully.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback
from typing import Any

_print_lock = threading.Lock()


def emit(event: dict[str, Any]) -> None:
    """Print one JSON line on stdout (thread-safe); the test reads it as an event."""
    with _print_lock:
        sys.stdout.write(json.dumps(event, default=str) + "\n")
        sys.stdout.flush()


def default_handler(command: dict[str, Any]) -> Any:
    """Commands every node understands: ``eval`` of a Python expression with ``app`` in scope, and ``ping``."""
    from nocluster import app

    if command["cmd"] == "ping":
        return {"instance_id": app.instance_id, "pid": os.getpid()}
    if command["cmd"] == "eval":
        return eval(command["expr"], {"app": app})
    raise ValueError(f"unknown command {command['cmd']!r}")


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    os.environ.setdefault("DJANGO_ENV", "test")
    import django

    django.setup()
    from django.utils.module_loading import import_string

    from nocluster import app

    scenario = sys.argv[1] if len(sys.argv) > 1 else "tests.node:default_handler"
    handler = import_string(scenario.replace(":", "."))
    app.install_plugins()
    if "--no-start" not in sys.argv:
        app.start()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    threading.Thread(target=_serve_commands, args=(handler, stopping), name="node-commands", daemon=True).start()
    emit({"event": "ready", "instance_id": app.instance_id, "pid": os.getpid(), "name": app.name})
    stopping.wait()
    app.stop()
    emit({"event": "stopped", "instance_id": app.instance_id})


def _serve_commands(handler: Any, stopping: threading.Event) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        try:
            emit({"event": "reply", "id": command.get("id"), "result": handler(command)})
        except Exception as exc:
            emit(
                {
                    "event": "reply",
                    "id": command.get("id"),
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                }
            )
    stopping.set()


if __name__ == "__main__":
    main()
