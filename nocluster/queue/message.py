"""What travels through the event queue: the message (JSON on the wire), a subscription, and the run context."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nocluster.envelope import JSON
from nocluster.queue.signal import AbortSignal


@dataclass
class Message:
    """One queued piece of work. ``to_json()`` is what a backend carries (JSON only).

    Attributes:
      id: uuid4 hex, stable across retries and redeliveries (``context.id``).
      channel: the channel as the subscriber named it (without the ``app.name`` prefix).
      payload: the JSON value handed to ``process``.
      timeout: seconds after which the abort signal fires.
      max_retries: how many more tries after the first one failing.
      retried: 0 on the first try, then 1, 2, ... (``context.retried``).
      published_at: Unix time of the first publish (seconds).
    """

    channel: str
    payload: JSON
    timeout: float = 15.0
    max_retries: int = 0
    retried: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    published_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "payload": self.payload,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            "retried": self.retried,
            "id": self.id,
            "published_at": self.published_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Message:
        return cls(**data)

    def next_try(self) -> Message:
        """The same message for its next try (``retried`` + 1)."""
        return Message(**{**self.to_json(), "retried": self.retried + 1})


class Process(Protocol):
    def __call__(self, payload: Any, context: Context, /) -> Any: ...


@dataclass
class Subscription:
    """A channel's consumer: ``process(payload, context)``, at most ``concurrency`` at once per node."""

    channel: str
    process: Process
    concurrency: int = 1
    idle: Callable[[], bool] | None = None

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
