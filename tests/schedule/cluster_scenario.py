"""The periodic jobs of the scheduler's cluster test, imported by every process of that project at start.

Node processes run ``python -m tests.node tests.schedule.cluster_scenario:handle``; Celery workers import it with
``-I tests.schedule.cluster_scenario``. Both declare the same two 1-second jobs on one channel, ``tick-once``
(misfire "once") and ``tick-skip`` ("skip"), whose handler writes one :class:`ScheduleTick` row per call in
PostgreSQL. ``NOCLUSTER_TEST_CLOCK_OFFSET`` (seconds, tests only) shifts this process's scheduler clock.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

from django.utils import timezone

from nocluster import app
from nocluster.schedule import PeriodicJob, run_info
from tests.node import default_handler

CHANNEL = "schedule-tick"
JOBS = ("tick-once", "tick-skip")
OFFSET = float(os.environ.get("NOCLUSTER_TEST_CLOCK_OFFSET", "0"))


def record_tick(payload: Any, context: Any) -> None:
    from tests.fixture_plugin.models import ScheduleTick

    info = run_info(payload) or {}
    slot = datetime.fromisoformat(info["slot"]) if info.get("slot") else None
    ScheduleTick.objects.create(app_name=app.name, job=info.get("job", ""), slot=slot, kind=info.get("kind", ""),
                                message_id=context.id, instance_id=app.instance_id)  # fmt: skip


def offset_clock() -> datetime:
    return timezone.now() + timedelta(seconds=OFFSET)


app.event_queue.subscribe(CHANNEL, record_tick)
for name in JOBS:
    # A timeout within the test queue's limits (NOCLUSTER_QUEUE_MAX_TIMEOUT=6, tests/queue/workers.py).
    app.scheduler.add(PeriodicJob(name, channel=CHANNEL, every=1, misfire=name.removeprefix("tick-"), timeout=5))
if OFFSET:
    app.scheduler.clock = offset_clock


def handle(command: dict[str, Any]) -> Any:
    return default_handler(command)
