"""What travels through the event queue: the message (JSON on the wire), a subscription, and the run context."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nocluster import tracing
from nocluster.durations import seconds
from nocluster.envelope import JSON, validate_channel, wire_field, wire_id, wire_json, wire_number, wire_object
from nocluster.errors import InvalidChannel, MalformedMessage
from nocluster.queue.rates.limit import RateLimit
from nocluster.queue.signal import AbortSignal


@dataclass
class Message:
    """One queued piece of work. ``to_wire()`` is what a backend carries (JSON only).

    Attributes:
      id: uuid4 hex, stable across retries and redeliveries (``context.id``).
      channel: the channel as the subscriber named it (without the ``app.name`` prefix).
      payload: the JSON value handed to ``process``.
      timeout: seconds after which the abort signal fires.
      max_retries: how many more tries after the first one failing.
      retried: 0 on the first try, then 1, 2, ... (``context.retried``).
      published_at: Unix time of the first publish (seconds).
      relayed: it went through the outbox, which may send it twice: the consumer drops a second copy.
      send_id: of a relayed message, unique per send (a second send of the same outbox row has another).
      not_before: Unix time before which it must not run (0: none); a delay longer than the backend keeps a
        message is made of several shorter ones.
      unique_key: the key it holds while queued, delayed or running (``publish(unique_key=...)``; "" if none).
      settle_error, settle_attempts: a failed try whose retry or failed record could not be written: the error to
        settle with, and how many times that was tried (the message is not run again, only settled).
      trace: the W3C trace context of the code that published it (``nocluster.tracing``; empty outside a trace).
    """

    channel: str
    payload: JSON
    timeout: float = 15.0
    max_retries: int = 0
    retried: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    published_at: float = field(default_factory=time.time)
    relayed: bool = False
    send_id: str = ""
    not_before: float = 0.0
    unique_key: str = ""
    settle_error: str = ""
    settle_attempts: int = 0
    trace: dict[str, str] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        """The JSON object a backend carries."""
        return {
            "channel": self.channel,
            "payload": self.payload,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            "retried": self.retried,
            "id": self.id,
            "published_at": self.published_at,
            **({"relayed": True, "send_id": self.send_id} if self.relayed else {}),
            **({"not_before": self.not_before} if self.not_before else {}),
            **({"unique_key": self.unique_key} if self.unique_key else {}),
            **(
                {"settle_error": self.settle_error, "settle_attempts": self.settle_attempts}
                if self.settle_error
                else {}
            ),
            **({"trace": self.trace} if self.trace else {}),
        }

    @classmethod
    def from_wire(cls, data: object) -> Message:
        """Parse a message off the wire; unknown fields are ignored. Raises :class:`MalformedMessage`."""
        what = "event queue message"
        fields = wire_object(data, what)
        try:
            channel = validate_channel(wire_field(fields, "channel", str, what))
            timeout = seconds(wire_field(fields, "timeout", (int, float), what), f"{what}: timeout")
        except (InvalidChannel, ValueError) as exc:
            raise MalformedMessage(f"{what}: {exc}") from None
        counts = {name: wire_field(fields, name, int, what) for name in ("max_retries", "retried")}
        if min(counts.values()) < 0:
            raise MalformedMessage(f"{what}: max_retries and retried must be >= 0, got {counts}")
        return cls(
            channel=channel,
            payload=wire_json(fields, "payload", what),
            timeout=timeout,
            id=wire_id(fields, "id", what),
            published_at=wire_number(fields, "published_at", what),
            relayed=fields.get("relayed") is True,
            send_id=optional_text(fields, "send_id", what, 32),
            not_before=optional_time(fields, "not_before", what),
            unique_key=optional_text(fields, "unique_key", what, 200),
            settle_error=optional_text(fields, "settle_error", what, 100_000),
            settle_attempts=optional_count(fields, "settle_attempts", what),
            trace=tracing.from_wire(fields.get("trace")),
            **counts,
        )

    def held(self, error: str) -> Message:
        """This message, kept after a failed try that could not be settled with ``error`` (one more attempt)."""
        return dataclasses.replace(self, settle_error=error or "failed", settle_attempts=self.settle_attempts + 1)

    def next_try(self) -> Message:
        """The same message for its next try (``retried`` + 1)."""
        return dataclasses.replace(self, retried=self.retried + 1, settle_error="", settle_attempts=0)


class Process(Protocol):
    def __call__(self, payload: Any, context: Context, /) -> Any: ...


@dataclass
class Subscription:
    """A channel's consumer: ``process(payload, context)``, at most ``concurrency`` at once per node, and at most
    ``rate_limit`` runs for the whole cluster (None: no limit)."""

    channel: str
    process: Process
    concurrency: int = 1
    idle: Callable[[], bool] | None = None
    rate_limit: RateLimit | None = None

    def is_idle(self) -> bool:
        """Ask ``idle()`` (True when there is none). Backends treat an ``idle`` that raises as not idle."""
        return True if self.idle is None else bool(self.idle())


@dataclass
class Context:
    """The second argument of ``process``: ``id``, ``retried`` (0 first), ``signal``, and a few extras.

    Attributes:
      id: the message id (stable across retries).
      retried: 0 on the first try.
      signal: the :class:`AbortSignal` (timeout or cancel).
      channel: the channel (without prefix).
      max_retries: the message's ``max_retries`` (so ``retried == max_retries`` means the last try).
      timeout: the message's timeout in seconds.
    """

    id: str
    retried: int
    signal: AbortSignal
    channel: str = ""
    max_retries: int = 0
    timeout: float = 15.0

    @property
    def last_try(self) -> bool:
        return self.retried >= self.max_retries


def optional_text(fields: dict[str, Any], name: str, what: str, longest: int) -> str:
    """An optional str field ("" when absent), cut to ``longest`` characters."""
    value = fields.get(name) or ""
    if not isinstance(value, str):
        raise MalformedMessage(f"{what}: field {name!r} must be a str, got {type(value).__name__}")
    return value[:longest]


def optional_count(fields: dict[str, Any], name: str, what: str) -> int:
    """An optional int field >= 0 (0 when absent)."""
    value = fields.get(name) or 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1_000_000:
        raise MalformedMessage(f"{what}: field {name!r} must be an int from 0 to 1000000, got {value!r}")
    return value


def optional_time(fields: dict[str, Any], name: str, what: str) -> float:
    """An optional Unix time field (0.0 when absent)."""
    value = fields.get(name) or 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e11:
        raise MalformedMessage(f"{what}: field {name!r} must be a Unix time in seconds, got {value!r}")
    return float(value)
