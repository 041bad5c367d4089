"""The contract between :class:`~nocluster.pubsub.manager.PubSubManager` and a pub/sub backend.

The backend owns the wire only: it sees full channel names (``"{app.name}.{channel}"``) and envelope JSON
text. Prefixes, the envelope, ``skip_self``/``only_self``, debounce and the subscription table live in the
manager.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from nocluster.envelope import JSON


class PubSubListener(Protocol):
    """What a backend calls back into (the manager)."""

    def deliver(self, full_channel: str, data: JSON) -> None:
        """A decoded envelope arrived on ``full_channel`` (called in the backend's consumer thread)."""

    def connection_revived(self, reconnected: bool) -> None:
        """The backend (re)connected and re-bound every subscription; ``reconnected`` is False the first time."""


class PubSubBackend(ABC):
    """Base class of pub/sub backends.

    Lifecycle: the manager calls :meth:`attach` once, then :meth:`connect` when the node starts and
    :meth:`close` when it stops. :meth:`subscribe` and :meth:`unsubscribe` may be called at any time,
    before :meth:`connect` too: the backend binds its subscriptions whenever it (re)connects.
    """

    listener: PubSubListener | None = None
    namespace: str = ""
    # ``publish`` returns only once the broker confirmed the message: the outbox then relays sync messages from
    # its thread, not from the committing one.
    publish_waits: bool = False

    def attach(self, listener: PubSubListener, namespace: str) -> None:
        """Give the backend its listener and the app name (queue names are derived from it)."""
        self.listener = listener
        self.namespace = namespace

    @abstractmethod
    def connect(self, instance_id: str) -> None:
        """Start consuming for instance ``instance_id`` (starts the consumer thread; returns when bound or
        after the backend's connect timeout, seconds, while it keeps retrying in the background)."""

    @abstractmethod
    def close(self) -> None:
        """Stop consuming, join the consumer thread and close connections. Idempotent."""

    @abstractmethod
    def subscribe(self, full_channel: str) -> None:
        """Receive messages published on ``full_channel`` from now on (idempotent)."""

    @abstractmethod
    def unsubscribe(self, full_channel: str) -> None:
        """Stop receiving ``full_channel`` (idempotent)."""

    @abstractmethod
    def publish(self, full_channel: str, data: str) -> None:
        """Hand the envelope JSON text ``data`` to every instance bound to ``full_channel``.

        Returns after the broker accepted it. Raises:
          PublishError: the broker could not be reached after the backend's retries.
        """

    @property
    def connected(self) -> bool:
        """True while the consumer is connected and bound."""
        return False

    def ping(self) -> None:  # noqa: B027 (in-process backends have no server to reach)
        """Raise if the broker cannot be reached (for ``manage.py cluster``); in-process backends never do."""

    def after_fork(self) -> None:  # noqa: B027 (optional hook: in-process backends have nothing to forget)
        """In a forked child: forget the parent's threads and connections without closing them."""
