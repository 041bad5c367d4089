"""A channel's rate limit: ``"N/s"``, ``"N/m"`` or ``"N/h"``, at most N runs per second, minute or hour.

The runs are spread evenly (one every ``period / N`` seconds, a burst of one): in any stretch of ``t`` seconds at
most ``t * N / period + 1`` runs start, across the whole cluster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nocluster.durations import shown

PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
# The most runs per period a limit may allow (one per microsecond at "1000000/s": what the limiters resolve).
MOST = 1_000_000
PATTERN = re.compile(r"(\d{1,7})/([smh])")


@dataclass(frozen=True)
class RateLimit:
    """At most ``count`` runs per ``period`` seconds, one every :attr:`interval` seconds."""

    count: int
    period: float

    @property
    def interval(self) -> float:
        """Seconds between two runs."""
        return self.period / self.count

    def __str__(self) -> str:
        unit = next(unit for unit, seconds in PERIODS.items() if seconds == self.period)
        return f"{self.count}/{unit}"

    @classmethod
    def parse(cls, value: object, what: str) -> RateLimit:
        """``"20/s"`` -> ``RateLimit(20, 1.0)``; ``what`` names the limit in errors (``"channel 'x': rate_limit"``).

        Raises:
          TypeError: ``value`` is not a str.
          ValueError: not ``"N/s"``, ``"N/m"`` or ``"N/h"`` with N a whole number from 1 to 1000000.
        """
        if not isinstance(value, str):
            raise TypeError(f'{what} must be a str such as "100/m", got {shown(value)}')
        match = PATTERN.fullmatch(value.strip())
        if match is None or not 1 <= int(match[1]) <= MOST:
            raise ValueError(
                f'{what} must be "N/s", "N/m" or "N/h" with N a whole number from 1 to {MOST}, got {shown(value)}'
            )
        return cls(int(match[1]), PERIODS[match[2]])
