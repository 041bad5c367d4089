"""Trace context on the wire (``nocluster.tracing``): carried inside a span, nothing outside one or when off, a
bad one never makes a message malformed, and the handler's span continues the publisher's trace.

This process has no SDK (a global tracer provider would change every other test): a local provider makes the
publisher's span, and the handler's span comes from the API's tracer, which keeps the carried trace current.
The trace test across real processes, with an SDK in each, is ``tests/tracing``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from nocluster import tracing
from nocluster.envelope import Envelope
from nocluster.queue.message import Message

tracer = TracerProvider().get_tracer("tests")


@pytest.fixture
def tracing_on() -> Iterator[None]:
    was = tracing.enabled()
    tracing.configure(True)
    yield
    tracing.configure(was)


def current_ids() -> tuple[int, int]:
    context = trace.get_current_span().get_span_context()
    return context.trace_id, context.span_id


def test_a_message_published_in_a_span_carries_its_w3c_context_and_its_handler_continues_the_trace(
    tracing_on: None,
) -> None:
    with tracer.start_as_current_span("request") as span:
        carried = tracing.carrier()
        message = Message("orders", {"n": 1}, trace=carried)
    context = span.get_span_context()
    assert carried["traceparent"] == f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"

    received = Message.from_wire(message.to_wire())
    assert received.trace == carried
    assert current_ids()[0] == 0  # outside the span again
    with tracing.consumer_span("process orders", received.trace, {}):
        assert current_ids() == (context.trace_id, context.span_id)


def test_each_span_carries_its_own_context_and_the_carrier_is_the_caller_s_to_change(tracing_on: None) -> None:
    # The carrier of a span is made once and kept for its next publishes: a nested or a later span of the same
    # trace, and a later trace, each get their own
    def parent_id(carried: dict[str, str]) -> str:
        return carried["traceparent"].split("-")[2]

    with tracer.start_as_current_span("request") as request:
        first = tracing.carrier()
        first["traceparent"] = "changed by the caller"
        again = tracing.carrier()
        with tracer.start_as_current_span("child") as child:
            nested = tracing.carrier()
        after_child = tracing.carrier()
    with tracer.start_as_current_span("next request") as later:
        other = tracing.carrier()

    assert parent_id(again) == parent_id(after_child) == f"{request.get_span_context().span_id:016x}"
    assert parent_id(nested) == f"{child.get_span_context().span_id:016x}"
    assert parent_id(other) == f"{later.get_span_context().span_id:016x}"
    assert other["traceparent"].split("-")[1] != again["traceparent"].split("-")[1]
    assert tracing.carrier() == {}  # outside any span


def test_outside_a_span_or_when_off_nothing_is_carried_and_the_wire_is_unchanged(tracing_on: None) -> None:
    assert tracing.carrier() == {}
    assert "trace" not in Envelope("a" * 32, {"n": 1}).to_wire()
    assert "trace" not in Message("orders", {"n": 1}).to_wire()
    tracing.configure(False)
    with tracer.start_as_current_span("request"):
        assert tracing.carrier() == {}
        with tracing.consumer_span("process orders", {}, {}):
            assert current_ids()[0] != 0  # off: no span of ours, the caller's stays current


@pytest.mark.parametrize(
    "value", [None, 5, "00-abc", ["traceparent"], {"traceparent": 5}, {"traceparent": "x" * 2000}, {"other": "y"}]
)
def test_a_bad_trace_field_is_ignored_not_malformed(value: object) -> None:
    wire = {**Envelope("a" * 32, {"n": 1}).to_wire(), "trace": value}
    assert Envelope.from_wire(wire).trace == {}
    wire = {**Message("orders", {"n": 1}).to_wire(), "trace": value}
    assert Message.from_wire(wire).trace == {}


def test_a_debounced_call_runs_in_the_context_it_was_saved_in(tracing_on: None) -> None:
    with tracer.start_as_current_span("receive") as span:
        saved = tracing.current()
    with tracing.attached(saved):
        assert current_ids() == (span.get_span_context().trace_id, span.get_span_context().span_id)
    assert current_ids()[0] == 0


def test_with_an_sdk_the_handler_span_is_a_consumer_child_of_the_publisher_and_records_what_it_raised(
    tracing_on: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("nocluster"))
    monkeypatch.setattr(tracing, "NO_SDK", ())  # this process's global provider stays the API's
    with tracer.start_as_current_span("request") as request:
        carried = tracing.carrier()

    with pytest.raises(ValueError), tracing.consumer_span("process orders", carried, {"messaging.system": "nocluster"}):
        raise ValueError("bad order")

    [span] = exporter.get_finished_spans()
    assert span.parent is not None and span.parent.span_id == request.get_span_context().span_id
    assert (span.name, span.kind, span.attributes["messaging.system"]) == (
        "process orders",
        trace.SpanKind.CONSUMER,
        "nocluster",
    )
    assert span.status.status_code.name == "ERROR" and "bad order" in (span.status.description or "")
    assert [event.name for event in span.events] == ["exception"]
    assert current_ids()[0] == 0  # the handler's context was detached
