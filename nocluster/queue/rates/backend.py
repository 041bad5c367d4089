"""The rate limiter interface: book the next slot of a limit, shared by every node that uses the same limiter.

The algorithm is GCRA (the generic cell rate algorithm, as in ATM networks and redis-cell): a limit's state is
one number, its *theoretical arrival time* (TAT), the instant its next slot starts. Booking a slot moves the TAT
one :attr:`~nocluster.queue.rates.limit.RateLimit.interval` later; a TAT in the past counts as now. Ours, and
why: a caller books only a slot that starts within its ``horizon``, and otherwise learns how long until the next
free one without booking it, so a node waits in place for a slot that is near and puts a message aside (without
booking) when its slot is far, instead of reserving slots it may never use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

from nocluster.queue.rates.limit import RateLimit


class Reservation(NamedTuple):
    """What :meth:`RateLimiter.reserve` found.

    Attributes:
      booked: True when the slot is the caller's: it may start once ``delay`` seconds have passed.
      delay: seconds from now until the slot starts (0 when it starts now); when not booked, until the next free
        slot (more than the horizon).
    """

    booked: bool
    delay: float


class RateLimiter(ABC):
    """Base class of rate limiters (``NOCLUSTER["RATE_LIMITS"]``)."""

    @abstractmethod
    def reserve(self, key: str, limit: RateLimit, horizon: float) -> Reservation:
        """Book the next slot of ``key`` under ``limit`` if it starts within ``horizon`` seconds from now.

        Parameters:
          key: the limit's full name (the manager gives ``"{app.name}:rate:{channel}"``).
          limit: its rate; every caller of one key must give the same one.
          horizon: the furthest (seconds) a slot may start from now for this call to book it (>= 0).

        Raises:
          BackendUnavailable: the limiter's server cannot be reached (nothing was booked, or it is unknown).
        """

    def ping(self) -> None:  # noqa: B027 (a process-local limiter has no server to reach)
        """Raise if this limiter's server cannot be reached (for ``manage.py cluster``)."""

    def after_fork(self) -> None:  # noqa: B027 (an optional hook: a no-op by default)
        """In a forked child: forget connections inherited from the parent."""

    def close(self) -> None:  # noqa: B027 (an optional hook: a no-op by default)
        """Close connections (they reopen on the next use)."""

    @property
    def cluster_wide(self) -> bool:
        """True when every process using this limiter shares its limits (False: each process has its own)."""
        return True
