"""Running one message: the abort signal, its timeout, and what the try came to.

The grace stop for threads is ours (Dramatiq's ``TimeLimit`` middleware does the same): Python cannot kill a
thread, so work still running ``grace`` seconds after its timeout gets :class:`StoppedAfterGrace` raised
asynchronously in its thread (``PyThreadState_SetAsyncExc``). Pure-Python code stops at its next bytecode;
a call blocked in C (a long ``time.sleep``) only when it returns. Celery workers use their soft and hard time
limits instead, which stop any code.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
import traceback
from dataclasses import dataclass

from nocluster import tracing
from nocluster.db import close_old_connections
from nocluster.errors import Aborted
from nocluster.queue.deadlines import deadlines
from nocluster.queue.message import Context, Message, Subscription
from nocluster.queue.signal import CANCELLED, TIMEOUT, AbortSignal

logger = logging.getLogger("nocluster.queue")


class StoppedAfterGrace(Aborted):
    """Raised inside work that went on ``grace`` seconds past its timeout, ignoring its abort signal."""


@dataclass
class Outcome:
    """What a try came to: ``"done"``, ``"failed"`` (retry or failed record) or ``"cancelled"`` (no retry)."""

    status: str
    error: str = ""
    duration: float = 0.0


class _GraceStopper:
    """Raises :class:`StoppedAfterGrace` in the running thread if ``process`` is still inside after ``delay`` s."""

    def __init__(self, delay: float) -> None:
        self._thread_id = threading.get_ident()
        self._inside = True
        self._lock = threading.Lock()
        self._timer = deadlines.after(delay, self._stop)

    def _stop(self) -> None:
        with self._lock:
            if self._inside:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self._thread_id), ctypes.py_object(StoppedAfterGrace)
                )

    def leave(self) -> None:
        with self._lock:
            self._inside = False
        self._timer.cancel()


def span_attributes(message: Message) -> dict[str, str | int]:
    """The attributes of a try's span (OpenTelemetry's messaging conventions)."""
    return {
        "messaging.system": "nocluster",
        "messaging.operation.type": "process",
        "messaging.destination.name": message.channel,
        "messaging.message.id": message.id,
        "nocluster.retried": message.retried,
    }


def run_message(subscription: Subscription, message: Message, signal: AbortSignal, grace: float | None) -> Outcome:
    """Call ``subscription.process(message.payload, context)`` once and classify the result.

    The signal fires after ``message.timeout`` seconds. A try that raises, or that was still running when
    the timeout passed, is ``"failed"``; one whose signal was fired by a cancel is ``"cancelled"``.
    """
    context = Context(
        id=message.id,
        retried=message.retried,
        signal=signal,
        channel=message.channel,
        max_retries=message.max_retries,
        timeout=message.timeout,
    )
    started = time.monotonic()
    error = ""
    reason: str | None = None
    timer = deadlines.after(message.timeout, lambda: signal.abort(TIMEOUT))
    try:
        stopper = _GraceStopper(message.timeout + grace) if grace is not None else None
        close_old_connections()  # as Django does around a request, in this long-lived worker thread
        try:
            with tracing.consumer_span(f"process {message.channel}", message.trace, span_attributes(message)):
                subscription.process(message.payload, context)
        finally:
            close_old_connections()
            if stopper is not None:
                stopper.leave()
            # What the signal said when the work ended: a timer firing after that does not count.
            reason = signal.reason
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=20)}"
    finally:
        timer.cancel()
    duration = time.monotonic() - started
    if reason is None and error:
        reason = signal.reason
    if reason == CANCELLED:
        return Outcome("cancelled", error or "cancelled", duration)
    if reason == TIMEOUT:
        return Outcome("failed", error or f"timed out after {message.timeout} s", duration)
    return Outcome("failed", error, duration) if error else Outcome("done", "", duration)
