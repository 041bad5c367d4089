"""Issue 15's acceptance for periodic jobs, with real processes on PostgreSQL and Celery on Redis.

Three node processes claim the slots of two 1-second jobs (misfire "once" and "skip"); two Celery workers run
their messages, whose handler writes a row per call. One node's clock is 2 s ahead, so it claims every slot
first; that node is killed (SIGKILL) midway, the two others go on racing for each slot, and it is started again.
Then every node stops for a while and the three start again. Counted in PostgreSQL: every slot ran exactly once,
with no gap; after the downtime "once" ran one catch-up and "skip" none.

``NOCLUSTER_TEST_SCHEDULE_SECONDS`` (default 12) is how many slots the first phase lasts, and
``NOCLUSTER_TEST_SCHEDULE_DOWNTIME`` (default 5) how many seconds every node stays down; the issue's figures are
60 and 30.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from django.db.models import Max

from nocluster.models import ScheduleRun
from tests.fixture_plugin.models import ScheduleTick
from tests.helpers import NodeProcess, stop_nodes, wait_until
from tests.queue.workers import QUEUE_LIMITS, Worker, kill_workers, start_workers

pytestmark = pytest.mark.cluster

SCENARIO = "tests.schedule.cluster_scenario:handle"
DURATION = int(os.environ.get("NOCLUSTER_TEST_SCHEDULE_SECONDS", "12"))
DOWNTIME = float(os.environ.get("NOCLUSTER_TEST_SCHEDULE_DOWNTIME", "5"))
SECOND = timedelta(seconds=1)
JOBS = ("tick-once", "tick-skip")  # as tests/schedule/cluster_scenario.py declares them (importing it declares them)


@pytest.fixture
def cluster_env(node_env: dict[str, str], redis_url: str) -> dict[str, str]:
    # A grace of 3 s: above the 2 s clock offset, below the downtime plus a node's start.
    return {**node_env, "BROKER_URL": redis_url, **QUEUE_LIMITS, "NOCLUSTER_SCHEDULE_GRACE": "3"}


@pytest.fixture
def workers(cluster_env: dict[str, str], app_name: str) -> Iterator[list[Worker]]:
    started = start_workers([f"w1-{app_name}", f"w2-{app_name}"], cluster_env, concurrency=1,
                            include="tests.schedule.cluster_scenario")  # fmt: skip
    yield started
    kill_workers(started)


def runs(app_name: str, job: str) -> list[ScheduleRun]:
    return list(ScheduleRun.objects.filter(app_name=app_name, job=job).order_by("slot"))


def latest_slot(app_name: str) -> datetime | None:
    return ScheduleRun.objects.filter(app_name=app_name, job="tick-skip").aggregate(last=Max("slot"))["last"]


def wait_for_slot(app_name: str, slot: datetime, timeout: float = 30.0) -> None:
    def reached() -> bool:
        latest = latest_slot(app_name)
        return latest is not None and latest >= slot

    wait_until(reached, timeout=timeout, interval=0.1, message=f"a run claimed for slot {slot.isoformat()}")


def start(env: dict[str, str], offset: float = 0.0) -> NodeProcess:
    return NodeProcess(SCENARIO, env={**env, "NOCLUSTER_TEST_CLOCK_OFFSET": str(offset)}).spawn()


def contiguous(slots: list[datetime]) -> bool:
    return all(later - earlier == SECOND for earlier, later in itertools.pairwise(slots))


def test_each_slot_runs_once_across_nodes_kills_skew_and_downtime(
    cluster_env: dict[str, str], workers: list[Worker], app_name: str
) -> None:
    nodes = [start(cluster_env), start(cluster_env), start(cluster_env, offset=2.0)]
    try:
        for node in nodes:
            node.wait_ready()
        on_time_clock = {nodes[0].instance_id, nodes[1].instance_id}
        # Phase 1: DURATION slots; the node ahead killed with SIGKILL halfway, started again 3 slots later
        wait_until(lambda: latest_slot(app_name) is not None, timeout=30, message="a first run claimed")
        first = min(run.slot for run in runs(app_name, "tick-skip"))
        wait_for_slot(app_name, first + DURATION // 2 * SECOND)
        nodes[2].kill()
        killed_at = latest_slot(app_name)
        assert killed_at is not None
        wait_for_slot(app_name, killed_at + 3 * SECOND)
        nodes[2] = start(cluster_env, offset=2.0).wait_ready()
        wait_for_slot(app_name, first + DURATION * SECOND)
        stop_nodes(nodes)
        stopped = {job: runs(app_name, job)[-1].slot for job in JOBS}

        # Phase 2: every node down for DOWNTIME seconds, then the three start again
        time.sleep(DOWNTIME)  # the downtime itself (nothing is waited for here)
        nodes = [start(cluster_env), start(cluster_env), start(cluster_env, offset=2.0)]
        for node in nodes:
            node.wait_ready()
        resumed = wait_for_on_time_runs(app_name, stopped)
    finally:
        stop_nodes(nodes)
    # Every message has run (the workers record "done" through the tracked handler)
    wait_until(lambda: not ScheduleRun.objects.filter(app_name=app_name).exclude(outcome="done").exists(),
               timeout=60, message="every run done")  # fmt: skip

    report = check_runs(app_name, stopped, resumed)
    before = ScheduleRun.objects.filter(app_name=app_name, slot__lte=max(stopped.values()))
    claimers = Counter("on time" if run.node in on_time_clock else "2 s ahead" for run in before)
    # The node ahead claimed first while it was up; the two others while it was down
    assert claimers["on time"] > 0 and claimers["2 s ahead"] > 0, claimers
    print(f"\nschedule cluster test ({DURATION} slots, {DOWNTIME:g} s down): {report}; "
          f"claims before the downtime by clock: {dict(claimers)}")  # fmt: skip


def wait_for_on_time_runs(app_name: str, stopped: dict[str, datetime]) -> dict[str, datetime]:
    """The first on-time slot each job ran after the downtime (waiting until 3 of them ran)."""

    def resumed() -> bool:
        return all(
            ScheduleRun.objects.filter(app_name=app_name, job=job, kind="scheduled", slot__gt=stopped[job]).count() >= 3
            for job in JOBS
        )

    wait_until(resumed, timeout=60, interval=0.2, message="3 on-time runs of each job after the downtime")
    return {
        job: ScheduleRun.objects.filter(app_name=app_name, job=job, kind="scheduled", slot__gt=stopped[job])
        .order_by("slot")
        .values_list("slot", flat=True)[0]
        for job in JOBS
    }


def check_runs(app_name: str, stopped: dict[str, datetime], resumed: dict[str, datetime]) -> str:
    """Assert every slot ran exactly once (the handler's rows, counted per slot) and how each job went on after
    the downtime; return the figures."""
    ticks = Counter(ScheduleTick.objects.filter(app_name=app_name).values_list("job", "slot"))
    figures = []
    for job in JOBS:
        claimed = runs(app_name, job)
        assert ScheduleTick.objects.filter(app_name=app_name, job=job, kind="manual").count() == 0
        # Each claimed slot ran exactly once, and nothing ran that was not claimed
        assert {slot: ticks[(job, slot)] for slot in (run.slot for run in claimed) if ticks[(job, slot)] != 1} == {}
        assert {slot for (name, slot) in ticks if name == job} == {run.slot for run in claimed}
        before = [run for run in claimed if run.slot <= stopped[job]]
        after = [run for run in claimed if run.slot > stopped[job]]
        # Before the downtime: no gap, all on time (the kill of the node ahead included)
        assert contiguous([run.slot for run in before]) and {run.kind for run in before} == {"scheduled"}
        catch_ups = [run for run in after if run.kind == "catch-up"]
        on_time = [run for run in after if run.kind == "scheduled"]
        assert contiguous([run.slot for run in on_time]) and on_time[0].slot == resumed[job]
        missed = round((resumed[job] - stopped[job]) / SECOND) - 1
        assert missed >= 1, "no slot was missed: the downtime was shorter than the grace"
        if job == "tick-once":
            # One catch-up, claimed as the first missed slot (its count is by the clock of the node that claimed it)
            assert [run.slot for run in catch_ups] == [stopped[job] + SECOND] and catch_ups[0].missed >= 1
        else:
            assert catch_ups == []
        figures.append(f"{job}: {len(before)} slots before the downtime, {missed} missed, "
                       f"{len(catch_ups)} catch-up, {len(on_time)} after")  # fmt: skip
    return "; ".join(figures)
