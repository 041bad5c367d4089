"""Sequence numbers per sync channel, gap detection, and the resync marker.

Ours (NocoBase leaves it as a TODO): pub/sub may lose messages (Redis pub/sub is at most once; a node that is
disconnected, or that Redis drops for a full output buffer, misses what went by). Every sync message carries
``seq``, numbered per (publishing instance, channel) from 1. A receiver remembers the last number seen from
each publisher; a jump means messages were lost, and the plugin resyncs (reloads its state from the
database). The first message seen from a publisher sets the baseline: a node loads its state when it starts,
after its subscriptions are bound, so it needs nothing older. A reconnect forgets every baseline and resyncs.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

RESYNC_TYPE = "nocluster.resync"


def resync_marker(reason: str) -> dict[str, Any]:
    """The message a plugin's ``handle_sync_message`` gets when it must reload everything from the database."""
    return {"type": RESYNC_TYPE, "reason": reason}


def is_resync(message: Any) -> bool:
    """True if ``message`` is a resync marker (see :func:`resync_marker`)."""
    return isinstance(message, dict) and message.get("type") == RESYNC_TYPE


class SequenceCounter:
    """The next ``seq`` of each channel this instance publishes on (thread-safe, from 1)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, int] = defaultdict(int)

    def next(self, channel: str) -> int:
        with self._lock:
            self._last[channel] += 1
            return self._last[channel]


class GapDetector:
    """The last ``seq`` seen per (channel, publisher); :meth:`observe` reports a jump."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], int] = {}

    def observe(self, channel: str, source: str, seq: int) -> int:
        """Record ``seq`` from ``source`` on ``channel``; return how many messages before it were missed."""
        with self._lock:
            last = self._last.get((channel, source))
            if last is None or seq <= last:
                # A new baseline, or an old/duplicate number (never counted as a gap).
                self._last[(channel, source)] = max(seq, last or 0)
                return 0
            self._last[(channel, source)] = seq
            return seq - last - 1

    def repeated(self, channel: str, source: str, seq: int) -> bool:
        """True if ``seq`` from ``source`` on ``channel`` is not newer than the last one seen (a second copy)."""
        with self._lock:
            last = self._last.get((channel, source))
            return last is not None and seq <= last

    def reset(self) -> None:
        """Forget every baseline (after a reconnect, which resyncs anyway)."""
        with self._lock:
            self._last.clear()
