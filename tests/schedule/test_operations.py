"""Operating periodic jobs: the admin page (list, run now, enable, disable; the change permission) and
``manage.py schedule list|run|enable|disable``, on the process-wide application as a web node has it."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.test import Client

from nocluster import app
from nocluster.models import ScheduledJob, ScheduleRun
from nocluster.schedule import PeriodicJob
from tests.conftest import unique_name

JOBS_URL = "/admin/nocluster/scheduledjob/"
RUNS_URL = "/admin/nocluster/schedulerun/"


@pytest.fixture
def declared(db: None) -> Iterator[PeriodicJob]:
    """An hourly job declared in this process (as a plugin would), its row created by a tick of the scheduler."""
    name = unique_name("job")
    job = PeriodicJob(name, channel=name, every=3600, payload={"report": "daily"})
    app.event_queue.subscribe(name, lambda payload, context: None)
    app.scheduler.add(job)
    app.scheduler.tick()
    yield job
    app.scheduler.remove(name)


def client_with(*codenames: str) -> Client:
    user = User.objects.create_user(f"staff-{len(codenames)}", password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


def row_of(job: PeriodicJob) -> ScheduledJob:
    return ScheduledJob.objects.get(app_name=app.name, name=job.name)


def post_action(client: Client, action: str, job: PeriodicJob) -> int:
    data = {"action": action, "_selected_action": [row_of(job).pk], "index": 0}
    return client.post(JOBS_URL, data).status_code


def test_the_jobs_page_lists_each_job_with_its_schedule_and_runs(declared: PeriodicJob) -> None:
    viewer = client_with("view_scheduledjob", "view_schedulerun")
    page = viewer.get(JOBS_URL).content.decode()
    for text in (declared.name, "every 3600 s", "skip", f"{RUNS_URL}?job={declared.name}"):
        assert text in page
    assert "Run selected jobs now" not in page  # a view-only user has no actions
    assert viewer.get(f"{RUNS_URL}?job={declared.name}").status_code == 200


def test_run_now_from_the_admin_publishes_a_manual_run(declared: PeriodicJob) -> None:
    editor = client_with("view_scheduledjob", "change_scheduledjob")
    assert "Run selected jobs now" in editor.get(JOBS_URL).content.decode()

    assert post_action(editor, "run_now", declared) == 302

    run = ScheduleRun.objects.get(app_name=app.name, job=declared.name)
    assert (run.kind, run.slot, run.outcome) == ("manual", None, "queued") and run.message_id
    assert "queued" in editor.get(JOBS_URL).content.decode()  # its last outcome, until a node runs it


def test_disable_and_enable_from_the_admin(declared: PeriodicJob) -> None:
    editor = client_with("view_scheduledjob", "change_scheduledjob")
    assert post_action(editor, "disable_jobs", declared) == 302
    assert row_of(declared).enabled is False
    assert post_action(editor, "enable_jobs", declared) == 302
    assert row_of(declared).enabled is True


def test_a_view_only_user_gets_403_for_every_action_and_nothing_changes(declared: PeriodicJob) -> None:
    viewer = client_with("view_scheduledjob")
    for action in ("run_now", "enable_jobs", "disable_jobs"):
        assert post_action(viewer, action, declared) == 403
    assert not ScheduleRun.objects.filter(app_name=app.name, job=declared.name).exists()
    assert row_of(declared).enabled is True


def schedule(*args: str) -> str:
    out = io.StringIO()
    call_command("schedule", *args, stdout=out)
    return out.getvalue()


def test_schedule_list_shows_every_declared_job(declared: PeriodicJob) -> None:
    table = schedule("list")
    header, line = table.splitlines()[0], next(row for row in table.splitlines() if row.startswith(declared.name))
    assert header.split()[:4] == ["NAME", "SCHEDULE", "CHANNEL", "MISFIRE"]
    assert "every 3600 s" in line and "never" in line and " yes " in line
    listed = json.loads(schedule("list", "--json"))
    mine = next(item for item in listed if item["name"] == declared.name)
    assert (mine["enabled"], mine["last_run"], mine["channel"]) == (True, None, declared.name)
    assert mine["next_run"] is not None


def test_schedule_run_publishes_one_message_and_says_its_id(declared: PeriodicJob) -> None:
    said = schedule("run", declared.name)
    run = ScheduleRun.objects.get(app_name=app.name, job=declared.name)
    assert run.kind == "manual" and run.message_id in said
    assert "(manual)" in next(row for row in schedule("list").splitlines() if row.startswith(declared.name))


def test_schedule_enable_and_disable(declared: PeriodicJob) -> None:
    assert "disabled" in schedule("disable", declared.name)
    assert row_of(declared).enabled is False
    assert "enabled" in schedule("enable", declared.name)
    assert row_of(declared).enabled is True


def test_an_unknown_job_is_a_one_line_error_naming_it(db: None) -> None:
    with pytest.raises(CommandError, match="periodic job 'no-such-job' is not declared"):
        schedule("run", "no-such-job")
