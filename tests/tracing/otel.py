"""An OpenTelemetry SDK in this process, its finished spans kept in memory (the SDK's ``InMemorySpanExporter``).

Imported by the trace test's node scenario and Celery worker; a process that imports it has a real tracer
provider, so its spans have ids and parents that the test can compare across processes.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.tracing import channels

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("tests.tracing")


def finished() -> list[dict[str, Any]]:
    """The spans this process finished: name, kind, ids and attributes."""
    spans: tuple[ReadableSpan, ...] = exporter.get_finished_spans()
    return [
        {"name": s.name, "kind": s.kind.name, "attributes": dict(s.attributes or {}), **channels.ids(s)} for s in spans
    ]
