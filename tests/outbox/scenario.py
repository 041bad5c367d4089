"""Node scenario for the outbox relay tests (``tests.outbox.scenario:handle``).

Commands (JSON over stdin, see ``tests/node.py``):
  publish_in_transaction {count, freeze_after}
                                   publish ``count`` ``echo`` messages in one transaction, in a thread; the
                                   commit's relay then sends them. With ``freeze_after``, the sending thread
                                   stops for good once the broker took that many (in whole batches), before
                                   it deletes any row: the moment a kill -9 leaves sent rows in the table
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


def _freeze_sends_after(count: int) -> None:
    """Stop the thread that sends to the broker, for good, once ``count`` messages were queued."""
    backend = app.event_queue.backend
    publish_many, queued = backend.publish_many, [0]

    def publish_many_then_freeze(full_channel: str, messages: Any) -> None:
        if queued[0] >= count:
            threading.Event().wait()
        publish_many(full_channel, messages)
        queued[0] += len(messages)

    backend.publish_many = publish_many_then_freeze  # type: ignore[method-assign]


def _publish(count: int) -> None:
    with transaction.atomic():
        for n in range(count):
            app.event_queue.publish("echo", {"relay": n}, timeout=5)


def handle(command: dict[str, Any]) -> Any:
    if command["cmd"] == "publish_in_transaction":
        if command.get("freeze_after"):
            _freeze_sends_after(command["freeze_after"])
        threading.Thread(target=_publish, args=(command["count"],), name="publisher").start()
        return True
    return default_handler(command)
