"""Node scenario of the trace test (``tests.tracing.scenario:handle``), with the SDK of ``tests.tracing.otel``.

Every node of the test registers the ``traced`` queue channel (run by the Celery worker, see
``tests.tracing.channels``) and subscribes the ``traced`` sync channel and the ``traced`` pub/sub channel,
emitting ``{"event": "sync"|"pubsub", ...}`` with the ids of the span its callback ran in.

Commands (JSON over stdin, see ``tests/node.py``):
  request      in a SERVER span "GET /orders" (a request, as Django's instrumentation makes one): publish a
               ``traced`` queue message and a ``traced`` sync message inside ``atomic()`` (both through the
               outbox), and a pub/sub message outside it; returns the span's ids
  spans        the spans this node finished
and everything ``tests.node.default_handler`` understands.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from opentelemetry import trace

from nocluster import app
from tests.node import default_handler, emit
from tests.tracing import channels, otel

channels.register(app)


def _callback(kind: str) -> Any:
    def callback(message: Any) -> None:
        emit({"event": kind, "message": message, **channels.ids(trace.get_current_span())})

    return callback


app.sync_message_manager.subscribe("traced", _callback("sync"))
app.pubsub.subscribe("traced", _callback("pubsub"))


def handle(command: dict[str, Any]) -> Any:
    if command["cmd"] == "request":
        with otel.tracer.start_as_current_span("GET /orders", kind=trace.SpanKind.SERVER) as span:
            with transaction.atomic():
                app.event_queue.publish("traced", {"order": 1}, timeout=5)
                app.sync_message_manager.publish("traced", {"order": 1})
            app.pubsub.publish("traced", {"order": 1})
            return channels.ids(span)
    if command["cmd"] == "spans":
        return otel.finished()
    return default_handler(command)
