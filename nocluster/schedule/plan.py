"""What a node claims for one job when its slots are due: the policy of on-time slots and misfires, as a pure
function of the job, the latest slot handled and this node's clock (so every node derives the same keys)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from nocluster.schedule.claims import CATCH_UP, SCHEDULED
from nocluster.schedule.jobs import PeriodicJob

logger = logging.getLogger("nocluster.schedule")

# The most slots one catch-up run reports as missed, and the most on-time slots one tick claims for a job.
MOST_COUNTED = 10_000
MOST_ON_TIME = 4000

Plan = list[tuple[datetime, str, int]]  # (slot, kind, missed)


def plan_runs(job: PeriodicJob, last: datetime | None, now: datetime, grace: float) -> Plan:
    """The runs to claim at ``now`` for ``job`` whose latest handled slot is ``last``, oldest first.

    On time: every slot after ``last`` at most ``grace`` seconds old. Missed: the older slots after ``last``;
    misfire "once" adds one catch-up run for them, keyed by the first missed slot (derived from ``last`` alone, so
    two nodes computing it at different times get the same key); "skip" adds nothing and logs how many.
    """
    schedule, horizon = job.schedule, now - timedelta(seconds=grace)
    on_time: list[datetime] = []
    slot = schedule.latest_at_or_before(now)
    while slot is not None and slot >= horizon and (last is None or slot > last) and len(on_time) < MOST_ON_TIME:
        on_time.append(slot)
        slot = schedule.previous(slot)
    plan: Plan = []
    if last is not None and slot is not None and slot > last:
        # Missed: the slots after ``last`` up to ``slot``, older than the grace, that no node claimed.
        missed = sum(1 for _ in schedule.between(last, slot + timedelta(microseconds=1), MOST_COUNTED))
        if job.misfire == "once":
            first = schedule.next_after(last)
            assert first is not None
            plan.append((first, CATCH_UP, missed))
        else:
            logger.warning(
                "periodic job %r: %d slot(s) after %s missed (none claimed within %s s); misfire 'skip': not run",
                job.name, missed, last.isoformat(), grace,
            )  # fmt: skip
    plan += [(slot, SCHEDULED, 0) for slot in reversed(on_time)]
    return plan
