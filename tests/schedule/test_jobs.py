"""Declaring periodic jobs: their slots (every node computes the same ones), the checks on a declaration, the
settings, and the plugin attribute."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from nocluster import Application, Plugin, PluginError
from nocluster.schedule import PeriodicJob, run_info
from nocluster.schedule.settings import ScheduleSettings
from nocluster.schedule.slots import CronSchedule, IntervalSchedule

NOON = datetime(2031, 6, 1, 12, 0, 0, tzinfo=UTC)


def test_interval_slots_are_multiples_of_the_interval_since_the_epoch() -> None:
    hourly = IntervalSchedule(3600)
    moment = NOON + timedelta(minutes=20, microseconds=5)
    assert hourly.latest_at_or_before(moment) == NOON
    assert hourly.next_after(moment) == NOON + timedelta(hours=1)
    assert hourly.latest_at_or_before(NOON) == NOON and hourly.next_after(NOON) == NOON + timedelta(hours=1)
    assert hourly.previous(NOON) == NOON - timedelta(hours=1)
    # 1.5 s, counted in microseconds: no float drift, even far from the epoch
    odd = IntervalSchedule(1.5)
    slot = odd.latest_at_or_before(NOON)
    assert (slot - datetime(1970, 1, 1, tzinfo=UTC)) % timedelta(seconds=1.5) == timedelta(0)
    assert list(odd.between(slot, slot + timedelta(seconds=6), 10)) == [
        slot + timedelta(seconds=1.5 * n) for n in (1, 2, 3)
    ]
    assert len(list(odd.between(slot, slot + timedelta(days=1), 50))) == 50


def test_cron_slots_follow_the_expression_in_its_time_zone() -> None:
    daily = CronSchedule("0 3 * * *", "Europe/Paris")  # 03:00 in Paris is 01:00 UTC in summer
    assert daily.latest_at_or_before(NOON) == datetime(2031, 6, 1, 1, 0, tzinfo=UTC)
    assert daily.next_after(NOON) == datetime(2031, 6, 2, 1, 0, tzinfo=UTC)
    every_ten_seconds = CronSchedule("*/10 * * * * *")  # six fields: seconds first
    assert every_ten_seconds.latest_at_or_before(NOON + timedelta(seconds=19.9)) == NOON + timedelta(seconds=10)
    assert every_ten_seconds.latest_at_or_before(NOON + timedelta(seconds=20)) == NOON + timedelta(seconds=20)
    assert every_ten_seconds.next_after(NOON + timedelta(seconds=20)) == NOON + timedelta(seconds=30)
    assert daily.describe() == "cron 0 3 * * * (Europe/Paris)"
    assert every_ten_seconds.describe() == "cron */10 * * * * *"


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"name": "bad name"}, ValueError, "periodic job name 'bad name'"),
        ({"channel": ""}, ValueError, "periodic job 'report': channel name must be a non-empty str"),
        ({"every": None}, ValueError, "'report': give either every .seconds. or cron"),
        ({"cron": "* * * * *"}, ValueError, "'report': give either every"),
        ({"every": 0.5}, ValueError, "'report': every must be at least 1 s"),
        ({"every": True}, TypeError, "'report': every must be a number of seconds"),
        ({"every": None, "cron": "61 * * * *"}, ValueError, "'report': cron expression '61 \\* \\* \\* \\*'"),
        ({"every": None, "cron": "* * *"}, ValueError, "'report': cron expression .* Wrong number of fields"),
        ({"timezone": "Mars/Olympus"}, ValueError, "'report': unknown timezone 'Mars/Olympus'"),
        ({"misfire": "all"}, ValueError, "'report': misfire must be one of \\('skip', 'once'\\)"),
        ({"payload": [1]}, TypeError, "'report': payload must be a JSON object"),
        ({"payload": {"when": datetime.now()}}, TypeError, "periodic job 'report': datetime at \\$.when"),
        ({"payload": {"nocluster.schedule": 1}}, ValueError, "'report': the payload key 'nocluster.schedule' is"),
        ({"timeout": 0}, ValueError, "'report': timeout must be > 0"),
        ({"max_retries": -1}, ValueError, "'report': max_retries must be between 0 and 1000"),
        ({"enabled": "yes"}, TypeError, "'report': enabled must be a bool"),
    ],
)
def test_a_bad_declaration_is_refused_naming_the_job(options: dict[str, Any], error: type, message: str) -> None:
    declared = {"name": "report", "channel": "reports", "every": 60.0, **options}
    with pytest.raises(error, match=message):
        PeriodicJob(**declared)


def test_each_message_carries_the_declared_payload_and_what_run_it_is() -> None:
    job = PeriodicJob("report", channel="reports", every=60, payload={"format": "pdf"})
    payload = job.message_payload(NOON, "catch-up", 3)
    assert payload == {
        "format": "pdf",
        "nocluster.schedule": {"job": "report", "slot": "2031-06-01T12:00:00+00:00", "kind": "catch-up", "missed": 3},
    }
    assert run_info(payload) == payload["nocluster.schedule"]
    assert run_info({"format": "pdf"}) is None and run_info([1]) is None


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"GRACE": 0}, 'NOCLUSTER\\["SCHEDULE"\\]\\["GRACE"\\] must be > 0'),
        ({"GRACE": 7200}, '\\["GRACE"\\] must be at most 3600'),
        ({"TICK": "1"}, '\\["TICK"\\] must be a number of seconds'),
        ({"KEEP": 60}, '\\["KEEP"\\] must be at least 3600 s'),
        ({"ROLES": "web"}, '\\["ROLES"\\] must be a list of role names'),
        ({"DATABASE": "elsewhere"}, "unknown database alias 'elsewhere'"),
        ({"GRACEFUL": 1}, "unknown key\\(s\\) \\['GRACEFUL'\\]"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(schedule: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        ScheduleSettings.from_config({"SCHEDULE": schedule})


def test_a_plugin_declares_its_jobs_as_a_class_attribute() -> None:
    # Given a plugin with a job, whose load() subscribes the job's channel
    class Reports(Plugin):
        schedules = [PeriodicJob("reports.daily", channel="reports.daily", cron="0 3 * * *")]

        def load(self) -> None:
            self.app.event_queue.subscribe("reports.daily", lambda payload, context: None)

    app = Application({"NAME": "declares"})

    # When the plugins load
    app.plugins.populate([SimpleNamespace(label="reports", plugin_class=Reports)])

    # Then the scheduler has the job
    assert [job.name for job in app.scheduler.jobs()] == ["reports.daily"]


def test_two_plugins_declaring_one_job_name_differently_fail_naming_the_second() -> None:
    def plugin(every: float) -> type[Plugin]:
        class Declaring(Plugin):
            schedules = [PeriodicJob("shared", channel="shared", every=every)]

        return Declaring

    app = Application({"NAME": "twice"})
    configs = [
        SimpleNamespace(label="first", plugin_class=plugin(60)),
        SimpleNamespace(label="second", plugin_class=plugin(30)),
    ]
    with pytest.raises(PluginError, match=r"plugin 'second' failed in load\(\).*'shared' is declared twice"):
        app.plugins.populate(configs)
