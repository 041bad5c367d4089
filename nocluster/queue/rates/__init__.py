"""Cluster-wide rate limits of event queue channels: ``subscribe(..., rate_limit="100/m")``."""

from nocluster.queue.rates.backend import RateLimiter, Reservation
from nocluster.queue.rates.limit import RateLimit

__all__ = ["RateLimit", "RateLimiter", "Reservation"]
