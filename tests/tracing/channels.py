"""The trace test's queue channel, registered by its nodes, its Celery worker and the test's publisher app.

The ``traced`` channel's ``process`` records, on the project's Redis event list (``tests.queue.scenarios``),
the ids of the span it runs in. Only OpenTelemetry's API is used here: the SDK is set up by the processes that
import ``tests.tracing.otel`` (never the test process itself).
"""

from __future__ import annotations

import json
from typing import Any

from opentelemetry import trace

from nocluster.app import Application
from nocluster.queue.message import Context
from tests.queue import scenarios


def ids(span: Any) -> dict[str, str]:
    """``{"trace_id", "span_id", "parent_id"}`` of a span, as W3C hex ("" for no parent)."""
    context = span.get_span_context()
    parent = getattr(span, "parent", None)
    return {
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
        "parent_id": format(parent.span_id, "016x") if parent is not None else "",
    }


def register(application: Application) -> None:
    def traced(payload: Any, context: Context) -> None:
        span = trace.get_current_span()
        event = {"kind": "traced", "id": context.id, "name": getattr(span, "name", ""), **ids(span)}
        scenarios.client().rpush(scenarios.events_key(application.name), json.dumps(event))

    application.event_queue.subscribe("traced", traced)
