"""The abort signal handed to ``process(payload, context)`` as ``context.signal``.

It fires when the message's timeout passes or when the work is cancelled (from any node). Work is expected to
look at it (``signal.aborted``, ``signal.wait(t)``, ``signal.throw_if_aborted()``); work that ignores it is
stopped after a grace period by the backend.
"""

from __future__ import annotations

import threading

from nocluster.errors import Aborted

TIMEOUT = "timeout"
CANCELLED = "cancelled"


class AbortSignal:
    """A one-shot, thread-safe abort flag with a reason (``"timeout"`` or ``"cancelled"``)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.reason: str | None = None

    @property
    def aborted(self) -> bool:
        """True once the signal fired."""
        return self._event.is_set()

    def abort(self, reason: str = CANCELLED) -> bool:
        """Fire the signal; the first reason wins. Returns False if it had fired already."""
        with self._lock:
            if self._event.is_set():
                return False
            self.reason = reason
            self._event.set()
            return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block up to ``timeout`` seconds (None: forever) or until the signal fires; return ``aborted``.

        Use it instead of ``time.sleep`` in long work: ``if signal.wait(1.0): return``.
        """
        return self._event.wait(timeout)

    def throw_if_aborted(self) -> None:
        """Raise :class:`~nocluster.errors.Aborted` (naming the reason) if the signal fired."""
        if self._event.is_set():
            raise Aborted(f"aborted: {self.reason}")

    def __repr__(self) -> str:
        return f"<AbortSignal {'aborted: ' + str(self.reason) if self.aborted else 'armed'}>"
