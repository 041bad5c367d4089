"""Remembering the ids of recent messages, to drop a second copy (pub/sub redeliveries, repeated sync messages)."""

from __future__ import annotations

# How many message ids each instance remembers.
RECENT_IDS = 10_000


class RecentIds:
    """The last ``size`` message ids seen (called from the one consumer thread)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: dict[str, None] = {}

    def seen(self, message_id: str) -> bool:
        """True if ``message_id`` was seen already; else remember it."""
        if message_id in self._ids:
            return True
        self._ids[message_id] = None
        if len(self._ids) > self.size:
            del self._ids[next(iter(self._ids))]
        return False

    def contains(self, message_id: str) -> bool:
        """True if ``message_id`` is among the remembered ids (without remembering it)."""
        return message_id in self._ids
