"""In-process pub/sub: every instance is an application of this process (the embedded default).

Limit: threads of one process only. Several :class:`~nocluster.app.Application` objects of one process that use
the same ``bus`` see each other's messages, which is how tests play a cluster in one process. An instance
receives only while it is started (like a broker: nothing is queued for an instance that is not connected).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from nocluster.envelope import loads
from nocluster.pubsub.backend import PubSubBackend

logger = logging.getLogger("nocluster.pubsub.local")

_STOP = object()


class _Bus:
    """The in-process "broker": which started backends are bound to which channels."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.members: set[LocalPubSubBackend] = set()

    def publish(self, full_channel: str, data: str) -> None:
        with self.lock:
            targets = [member for member in self.members if full_channel in member.channels]
        for member in targets:
            member.inbox.put((full_channel, data))


_buses: dict[str, _Bus] = {}
_buses_lock = threading.Lock()


def get_bus(name: str) -> _Bus:
    with _buses_lock:
        return _buses.setdefault(name, _Bus())


class LocalPubSubBackend(PubSubBackend):
    """In-process fan-out, delivered on one named dispatcher thread per instance.

    Parameters:
      bus: name of the in-process bus; backends on the same bus see each other (default ``"default"``).
    """

    def __init__(self, *, bus: str = "default") -> None:
        self.bus = get_bus(bus)
        self.channels: set[str] = set()
        self.inbox: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def connect(self, instance_id: str) -> None:
        if self.connected:
            return
        self.inbox = queue.Queue()
        self._thread = threading.Thread(
            target=self._dispatch, name=f"nocluster-pubsub-local-{instance_id[:8]}", daemon=True
        )
        self._thread.start()
        with self.bus.lock:
            self.bus.members.add(self)
        if self.listener is not None:
            self.listener.connection_revived(False)

    def close(self) -> None:
        with self.bus.lock:
            self.bus.members.discard(self)
        thread, self._thread = self._thread, None
        if thread is not None:
            self.inbox.put(_STOP)
            thread.join(10)
            if thread.is_alive():
                logger.error("pub/sub dispatcher thread %s did not stop within 10 s", thread.name)

    def subscribe(self, full_channel: str) -> None:
        with self.bus.lock:
            self.channels.add(full_channel)

    def unsubscribe(self, full_channel: str) -> None:
        with self.bus.lock:
            self.channels.discard(full_channel)

    def publish(self, full_channel: str, data: str) -> None:
        self.bus.publish(full_channel, data)

    def after_fork(self) -> None:
        with self.bus.lock:
            self.bus.members.discard(self)
        self._thread = None
        self.inbox = queue.Queue()

    def _dispatch(self) -> None:
        inbox = self.inbox
        while True:
            item = inbox.get()
            try:
                if item is _STOP:
                    return
                full_channel, data = item
                if full_channel in self.channels and self.listener is not None:
                    self.listener.deliver(full_channel, loads(data))
            except Exception:
                logger.exception("pub/sub local dispatcher: delivery failed")
            finally:
                inbox.task_done()
