"""Waiting for a channel's rate limit before a run: in place for a slot that is near, aside for one that is far.

A node that takes a message of a rate-limited channel books the next slot of the channel's limit if it starts
within ``hold`` seconds and waits for it where it is (holding one of the channel's concurrency slots, so at most
``concurrency`` waits per node), then runs the message. A slot further off is not booked: the message is put aside
(published again with a delay, no retry counted) until that slot is about ``hold`` seconds away, and asks again
then. So a backlog costs one reservation per message plus one per ``longest_defer`` seconds it waits, never a busy
loop, and no slot is booked for a message that is not about to run.
"""

from __future__ import annotations

import logging
import time

from nocluster.queue.rates.backend import RateLimiter
from nocluster.queue.rates.limit import RateLimit

logger = logging.getLogger("nocluster.queue")

# Seconds a message is put aside when the limiter cannot be asked (its server is down): not run, no retry counted.
UNAVAILABLE_DELAY = 1.0
# The shortest put-aside, in seconds.
SHORTEST_DEFER = 0.01


def take_slot(
    limiter: RateLimiter, key: str, limit: RateLimit, *, hold: float, longest_defer: float, what: str
) -> float:
    """Wait (at most ``hold`` seconds) for a slot of ``limit`` and return 0.0, or return the seconds (at most
    ``longest_defer``) to put the message aside for, without waiting. ``what`` names the message in logs.

    A limiter that raises counts as "not now": the message is put aside for :data:`UNAVAILABLE_DELAY` seconds, so
    an outage of the limiter's server never lets a channel run over its limit.
    """
    try:
        reservation = limiter.reserve(key, limit, hold)
    except Exception as exc:
        logger.warning("%s: rate limit %s not asked (%s: %s); put aside", what, limit, type(exc).__name__, exc)
        return min(UNAVAILABLE_DELAY, longest_defer)
    if reservation.booked:
        if reservation.delay > 0:
            time.sleep(reservation.delay)
        return 0.0
    return min(max(reservation.delay - hold, SHORTEST_DEFER), longest_defer)
