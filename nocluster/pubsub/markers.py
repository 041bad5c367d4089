"""Drain markers (ours): wait until what was published has been delivered, on any pub/sub backend.

No broker can say what is still in flight, so each node publishes a marker on the reserved channel
``nocluster.drain`` and waits until the markers of every node came back to every node. Per-publisher order
holds on every backend (one producer connection per node), so a marker that arrived proves that the same
publisher's earlier messages arrived first. Used by :meth:`PubSubManager.drain` and ``nocluster.testing.drain``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

# The reserved channel of drain markers.
MARKER_CHANNEL = "nocluster.drain"


class MarkerBox:
    """The marker tokens that reached one node (the callback of its marker subscription)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: set[str] = set()

    def __call__(self, token: Any) -> None:
        if isinstance(token, str):
            with self._lock:
                self._tokens.add(token)

    def seen(self, token: str) -> bool:
        with self._lock:
            return token in self._tokens

    def forget(self, tokens: Sequence[str]) -> None:
        with self._lock:
            self._tokens.difference_update(tokens)


class Drainable(Protocol):
    """What draining needs of a node's pub/sub manager."""

    markers: MarkerBox

    def subscribe(self, channel: str, callback: Callable[[Any], Any], debounce: float = 0) -> None: ...

    def publish(self, channel: str, message: Any, skip_self: bool = True, only_self: bool = False) -> str: ...

    def debounced_idle(self) -> bool: ...


def drain(nodes: Sequence[Drainable], timeout: float) -> bool:
    """Wait until every node got every node's marker, twice in a row with no debounced call pending or running
    (a delivery may push a debounced call, and a debounced call may publish again); False after ``timeout`` s."""
    for node in nodes:
        # Bound before anyone publishes a marker (subscribe returns once the broker binding is in place).
        node.subscribe(MARKER_CHANNEL, node.markers)
    deadline = time.monotonic() + timeout
    used: list[str] = []
    quiet_rounds = 0
    try:
        while quiet_rounds < 2:
            tokens = [uuid.uuid4().hex for _ in nodes]
            used += tokens
            for node, token in zip(nodes, tokens, strict=True):
                node.publish(MARKER_CHANNEL, token, skip_self=False)
            while not all(node.markers.seen(token) for node in nodes for token in tokens):
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.002)
            quiet_rounds = quiet_rounds + 1 if all(node.debounced_idle() for node in nodes) else 0
            if quiet_rounds == 0:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.005)
        return True
    finally:
        for node in nodes:
            node.markers.forget(used)
