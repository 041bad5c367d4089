"""Node scenario for the outbox relay tests (``tests.outbox.scenario:handle``).

Commands (JSON over stdin, see ``tests/node.py``):
  publish_in_transaction {count}   publish ``count`` ``echo`` messages in one transaction, in a thread; the
                                   commit's relay then sends them (the test may kill the node meanwhile)
and everything ``tests.node.default_handler`` understands.
"""

from __future__ import annotations

import threading
from typing import Any

from django.db import transaction

from nocluster import app
from tests.node import default_handler
from tests.queue.scenarios import register

register(app)


def _publish(count: int) -> None:
    with transaction.atomic():
        for n in range(count):
            app.event_queue.publish("echo", {"relay": n}, timeout=5)


def handle(command: dict[str, Any]) -> Any:
    if command["cmd"] == "publish_in_transaction":
        threading.Thread(target=_publish, args=(command["count"],), name="publisher").start()
        return True
    return default_handler(command)
