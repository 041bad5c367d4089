"""The scheduler on the embedded defaults as ``make run`` has them (SQLite in a file, no server), in a process of
its own: two nodes of one project claim each slot once, a catch-up once, and a run by hand runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.cluster

SCRIPT = """
import json
from datetime import UTC, datetime, timedelta

import django

django.setup()
from nocluster import Application
from nocluster.models import ScheduledJob, ScheduleRun
from nocluster.schedule import PeriodicJob

T0 = datetime(2031, 1, 1, tzinfo=UTC)
nodes = []
for _ in range(2):
    node = Application({"SCHEDULE": {"ENABLED": False}})
    node.event_queue.subscribe("tick", lambda payload, context: None)
    node.scheduler.add(PeriodicJob("tick", channel="tick", every=1, misfire="once"))
    nodes.append(node)
claimed = []
for second in range(4):
    moment = T0 + timedelta(seconds=second)
    claimed.append([run.slot.second for node in nodes for run in node.scheduler.tick(moment)])
# Both nodes wake after 37 s down, the second having read the state from before the first one's claims
nodes[0].scheduler.tick(T0 + timedelta(seconds=40))
ScheduledJob.objects.update(last_slot=T0 + timedelta(seconds=3))
late = [(run.slot.second, run.kind) for run in nodes[1].scheduler.tick(T0 + timedelta(seconds=41))]
manual = nodes[0].scheduler.run_now("tick")
nodes[0].scheduler.start()
nodes[0].event_queue.start()
drained = nodes[0].event_queue.drain(20)
nodes[0].event_queue.stop()
runs = ScheduleRun.objects.all()
print(json.dumps({
    "claimed": claimed,
    "late": late,
    "catch_ups": runs.filter(kind="catch-up").count(),
    "manual": manual.kind,
    "drained": drained,
    "outcomes": sorted(set(runs.values_list("outcome", flat=True))),
    "runs": runs.count(),
}))
"""


def test_two_nodes_on_sqlite_claim_each_slot_once(app_name: str) -> None:
    folder = Path(tempfile.mkdtemp(prefix="embedded-schedule-"))  # inside the run's temporary folder
    env = {key: value for key, value in os.environ.items()
           if key not in {"DJANGO_ENV", "DATABASE_URL", "REDIS_URL", "BROKER_URL", "PUBSUB_URL"}}  # fmt: skip
    env.update(DJANGO_SETTINGS_MODULE="settings", DATABASE_URL=f"sqlite:///{folder / 'db.sqlite3'}",
               NOCLUSTER_NAME=app_name, LOG_LEVEL="WARNING")  # fmt: skip
    for command in (["manage.py", "migrate", "-v0"], ["-c", SCRIPT]):
        done = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])

    # Each slot claimed by one of the two nodes (the first tick only creates the job's row)
    assert result["claimed"] == [[], [1], [2], [3]]
    # The late node finds the catch-up and the slots up to T0+40 taken, and claims only T0+41
    assert result["late"] == [[41, "scheduled"]] and result["catch_ups"] == 1
    assert result["manual"] == "manual" and result["drained"] and result["outcomes"] == ["done"]
    assert result["runs"] == 3 + 1 + 6 + 1 + 1  # 3 slots, a catch-up, T0+35..40, T0+41, the manual run
