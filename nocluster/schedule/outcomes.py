"""How a periodic job's message came out (the "last outcome" the admin shows), recorded without the queue's help.

Ours, and small: the event queue settles a message in its own code (done, retried, recorded failed) and tells
nobody but the failed-message record. So the scheduler learns the outcome of its messages in two places:

- ``done`` and ``cancelled``: the channel's ``process`` is wrapped, in place on its
  :class:`~nocluster.queue.message.Subscription` (so every other subscription option stays as it is). For a message
  that carries the scheduler's marker, the wrapper records ``done`` when ``process`` returned with its abort signal
  unfired (what the queue counts as done), ``cancelled`` when the signal was fired by a cancel. A try that raised
  or timed out is left to the queue: retried, or recorded failed;
- ``failed``: the queue's ``message_failed`` signal, sent once the failed record is written (after the last try).

A run whose message is still queued, running or being retried shows ``queued``. Recording is one ``UPDATE`` by
message id; if it fails it is logged and the work's result stands (an outcome is a display, never a reason to
run the work again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nocluster.schedule.jobs import run_info

if TYPE_CHECKING:
    from nocluster.queue.message import Context, Subscription

logger = logging.getLogger("nocluster.schedule")

DONE, FAILED, CANCELLED = "done", "failed", "cancelled"
# The abort signal's reason when the work was cancelled (nocluster.queue.signal.CANCELLED).
CANCELLED_REASON = "cancelled"
TRACKED = "_nocluster_schedule_tracked"

Recorder = Callable[[str, str, str], None]  # (message id, outcome, error)


def track(subscription: Subscription, record: Recorder) -> None:
    """Wrap ``subscription.process`` so that the outcome of each periodic job message is recorded (idempotent)."""
    process = subscription.process
    if getattr(process, TRACKED, False):
        return

    def tracked(payload: Any, context: Context, /) -> Any:
        if run_info(payload) is None:
            return process(payload, context)
        try:
            result = process(payload, context)
        except BaseException:
            if context.signal.reason == CANCELLED_REASON:
                record(context.id, CANCELLED, "cancelled while running")
            raise
        if context.signal.reason is None:
            record(context.id, DONE, "")
        elif context.signal.reason == CANCELLED_REASON:
            record(context.id, CANCELLED, "cancelled while running")
        return result

    setattr(tracked, TRACKED, True)
    tracked.__wrapped__ = process  # type: ignore[attr-defined]
    subscription.process = tracked
