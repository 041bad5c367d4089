"""W3C trace context across nodes, when OpenTelemetry is installed (``opentelemetry-api``; optional).

A pub/sub message, a sync message and an event-queue message carry the trace context of the code that
published it (``traceparent`` and ``tracestate``, through OpenTelemetry's global propagator: W3C Trace Context
unless the application configured another). Where it is handled, on whichever node, the callback or ``process``
runs in a ``CONSUMER`` span that is a child of the publishing span: the request that published and the task that
ran share one trace. A message published outside any span carries nothing, and its handler's span starts a trace
of its own (if the application configured an SDK). No span is made at publish: the caller's span is the parent,
so a publish costs a lookup of the current span and, inside a trace, one ``inject``.

Without ``opentelemetry-api``, or with ``NOCLUSTER["TRACING"]`` (env ``NOCLUSTER_TRACING``) false, nothing is
carried and no span is made. Without an SDK, the API's no-op tracer still makes the publisher's context current
in the handler (so logs and further publishes keep the trace id), at the cost of a few microseconds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager as ContextManager
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Status, StatusCode
except ImportError:  # pragma: no cover - the optional dependency is in requirements.txt
    trace = None  # type: ignore[assignment]

# The fields a carrier may hold: W3C Trace Context's (baggage is not carried).
FIELDS = ("traceparent", "tracestate")
# Longest value of a carried field: W3C's traceparent is 55 characters, tracestate at most 32 list members.
MAX_FIELD_LENGTH = 1024

_enabled = trace is not None
NO_SPAN: ContextManager[None] = contextlib.nullcontext()
if trace is not None:
    # The API's proxy: it follows a tracer provider the application sets later.
    _tracer = trace.get_tracer("nocluster")
    EMPTY_CONTEXT = otel_context.Context()
    # Tracer providers that record nothing (no SDK was set up).
    NO_SDK = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)


def configure(enabled: bool) -> None:
    """Turn carrying and spans on or off (``NOCLUSTER["TRACING"]``; on by default when OpenTelemetry is
    installed). Called when the application is set up."""
    global _enabled
    _enabled = enabled and trace is not None


def enabled() -> bool:
    return _enabled


# The last carrier made, with the span context and propagator it was made from: the publishes of one request
# (one span) carry the same headers, and an inject costs more than the rest of carrier() (~5 µs against ~1 µs).
_last_carrier: tuple[Any, Any, dict[str, str]] = (None, None, {})


def carrier() -> dict[str, str]:
    """The current trace context as W3C headers, or ``{}`` outside a trace (or when tracing is off)."""
    global _last_carrier
    if not _enabled:
        return {}
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    propagator = propagate.get_global_textmap()
    last_context, last_propagator, last_headers = _last_carrier
    if span_context is last_context and propagator is last_propagator:
        return dict(last_headers)
    headers: dict[str, str] = {}
    propagate.inject(headers)
    made = {name: headers[name] for name in FIELDS if name in headers}
    _last_carrier = (span_context, propagator, made)
    return dict(made)


def from_wire(value: object) -> dict[str, str]:
    """A carrier read off the wire: the known fields that are short strings; anything else is ignored (a bad
    trace context never makes a message malformed)."""
    if not isinstance(value, Mapping):
        return {}
    return {
        name: text for name in FIELDS if isinstance(text := value.get(name), str) and 0 < len(text) <= MAX_FIELD_LENGTH
    }


def consumer_span(name: str, carried: Mapping[str, str], attributes: Mapping[str, Any]) -> ContextManager[Any]:
    """A context manager running its block in a ``CONSUMER`` span named ``name``, child of the ``carried``
    context (a new trace when it is empty). Exceptions pass through; the span records them."""
    if not _enabled:
        return NO_SPAN
    if isinstance(trace.get_tracer_provider(), NO_SDK):
        # No span could be recorded: only the publisher's context is made current (what the API's no-op tracer
        # would do, without its layers of context managers).
        return attached(parent_context(carried)) if carried else NO_SPAN
    return _ConsumerSpan(name, parent_context(carried) if carried else EMPTY_CONTEXT, attributes)


_last_parent: tuple[tuple[str | None, str | None], Any] = ((None, None), None)


def parent_context(carried: Mapping[str, str]) -> Any:
    """The context ``carried`` holds (the last one is kept: the messages of one request share it)."""
    global _last_parent
    key = (carried.get("traceparent"), carried.get("tracestate"))
    last_key, context = _last_parent
    if key != last_key:
        context = propagate.extract(carried)
        _last_parent = (key, context)
    return context


class _ConsumerSpan:
    """``start_as_current_span`` without its layers of generator context managers (a third of a span's cost)."""

    __slots__ = ("_attributes", "_name", "_parent", "_span", "_token")

    def __init__(self, name: str, parent: Any, attributes: Mapping[str, Any]) -> None:
        self._name, self._parent, self._attributes = name, parent, attributes

    def __enter__(self) -> Any:
        self._span = _tracer.start_span(
            self._name, context=self._parent, kind=trace.SpanKind.CONSUMER, attributes=self._attributes
        )
        self._token = otel_context.attach(trace.set_span_in_context(self._span, self._parent))
        return self._span

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        try:
            if error is not None and self._span.is_recording():
                self._span.record_exception(error)
                self._span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        finally:
            otel_context.detach(self._token)
            self._span.end()


def current() -> Any:
    """The current OpenTelemetry context (None when tracing is off), to run a deferred call in it later."""
    return otel_context.get_current() if _enabled else None


@contextlib.contextmanager
def attached(saved: Any) -> Iterator[None]:
    """Run the block in a context saved by :func:`current` (a debounced call, in another thread)."""
    if saved is None:
        yield
        return
    token = otel_context.attach(saved)
    try:
        yield
    finally:
        otel_context.detach(token)
