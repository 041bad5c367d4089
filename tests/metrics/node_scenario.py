"""Imported by the metrics test's processes before their node starts: the web node (``python -m tests.node
tests.metrics.node_scenario:handle``) and the Celery worker (``-I tests.metrics.node_scenario``).

The web node serves Django (``/metrics`` included) on a free port from a wsgiref thread (command ``serve``) and
makes the traffic the test asks for (``queue``, ``news``, ``malformed``, ``locks``).
"""

from __future__ import annotations

import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from nocluster import app
from nocluster.envelope import dumps
from nocluster.errors import LockAcquireError
from tests.metrics.scenario import FAIL, HELD, NEWS, OK, register
from tests.node import default_handler

register(app)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve() -> int:
    """Serve this project's WSGI application on 127.0.0.1 (a daemon thread, gone with the node); its port."""
    from nocluster.wsgi import application

    server = make_server("127.0.0.1", 0, application, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics-test-http", daemon=True).start()
    return int(server.server_address[1])


def queue(ok: int, failing: int, held: int) -> None:
    app.event_queue.publish_many(OK, [{"n": n} for n in range(ok)], timeout=5)
    for n in range(failing):
        app.event_queue.publish(FAIL, {"n": n}, timeout=5, max_retries=1)
    for n in range(held):
        app.event_queue.publish(HELD, {"n": n}, timeout=5)


def news(count: int) -> None:
    for n in range(count):
        app.pub_sub_manager.publish(NEWS, {"n": n})


def malformed() -> None:
    """An envelope with no fields on the channel's exchange, as a broken publisher would send it."""
    manager = app.pub_sub_manager
    manager.backend.publish(manager.full_channel(NEWS), dumps({"bogus": True}))


def locks(exclusive: int) -> None:
    """``exclusive`` runs under a lock, then one lock held while another try times out, then force-released."""
    for _ in range(exclusive):
        app.lock_manager.run_exclusive("mt.lock", lambda: None, ttl=5)
    held = app.lock_manager.acquire("mt.held-lock", ttl=30)
    try:
        app.lock_manager.try_acquire("mt.held-lock", ttl=5)
    except LockAcquireError:
        pass
    else:
        raise AssertionError("a held lock was acquired again")
    if not app.lock_manager.force_release("mt.held-lock", held.token):
        raise AssertionError("the held lock was not force-released")


COMMANDS = {"serve": serve, "queue": queue, "news": news, "malformed": malformed, "locks": locks}


def handle(command: dict[str, Any]) -> Any:
    if command["cmd"] in COMMANDS:
        arguments = {key: value for key, value in command.items() if key not in ("cmd", "id")}
        return COMMANDS[command["cmd"]](**arguments)
    return default_handler(command)
