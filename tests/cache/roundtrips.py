"""Counting round trips to the real Redis: a redis-py connection that counts what it sends.

redis-py sends one packed buffer per command, and one for a whole pipeline, so the count of
``send_packed_command`` calls is the count of round trips.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from redis.connection import Connection

_local = threading.local()


class CountingConnection(Connection):
    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        counter = getattr(_local, "counter", None)
        if counter is not None:
            counter.append(command)
        super().send_packed_command(command, check_health)


@contextmanager
def count_round_trips() -> Iterator[list[Any]]:
    """Collect the round trips this thread makes inside the block (a list; ``len()`` is the count)."""
    _local.counter = sent = []
    try:
        yield sent
    finally:
        _local.counter = None
