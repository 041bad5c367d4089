"""The periodic jobs page in a real headless browser: an operator finds the job, runs it now, and sees it done."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from playwright.sync_api import Page, expect

from nocluster import app
from nocluster.models import ScheduledJob, ScheduleRun
from nocluster.schedule import PeriodicJob
from tasks.models import Task
from tests.conftest import unique_name
from tests.e2e.browser import PageProblems
from tests.e2e.test_admin_browser import PASSWORD, log_in, open_from_index, shot
from tests.helpers import wait_until


@pytest.fixture
def hourly_job(running_node: list[Task]) -> Iterator[tuple[PeriodicJob, threading.Event]]:
    """An hourly job declared on this running node (as a plugin would); its handler sets the yielded event."""
    name = unique_name("digest")
    ran = threading.Event()
    app.event_queue.subscribe(name, lambda payload, context: ran.set())
    job = PeriodicJob(name, channel=name, every=3600, misfire="once", payload={"report": "digest"})
    app.scheduler.add(job)  # after the node started: its scheduler thread takes it up at once
    wait_until(lambda: ScheduledJob.objects.filter(app_name=app.name, name=name).exists(), timeout=10)
    yield job, ran
    app.scheduler.remove(name)


def test_an_operator_runs_a_periodic_job_now_from_the_admin(
    live_server: Any,
    hourly_job: tuple[PeriodicJob, threading.Event],
    page: Page,
    page_problems: PageProblems,
    tmp_path: Path,
) -> None:
    job, ran = hourly_job
    User.objects.create_superuser("ada", "ada@example.com", PASSWORD)
    log_in(page, live_server.url, tmp_path)

    # The periodic jobs page, from the index: the job with its schedule, channel, policy and next run; never run
    open_from_index(page, "model-scheduledjob", "Select scheduled job to change")
    row = page.locator("#result_list tbody tr").filter(has_text=job.name)
    expect(row.locator("td.field-schedule")).to_have_text("every 3600 s")
    expect(row.locator("td.field-channel")).to_have_text(job.channel)
    expect(row.locator("td.field-misfire")).to_have_text("once")
    expect(row.locator("td.field-enabled img")).to_have_attribute("alt", "True")
    expect(row.locator("td.field-last_outcome")).to_have_text("-")
    expect(row.locator("td.field-next_run")).not_to_have_text("-")
    shot(page, tmp_path, "10-schedules")

    # Run it now with the admin action
    row.locator('input[name="_selected_action"]').check()
    page.locator('select[name="action"]').select_option("run_now")
    page.get_by_role("button", name="Go").click()
    expect(page.locator("ul.messagelist")).to_contain_text("1 job(s) run now")

    # The node's queue workers ran it; reloaded, the page shows the run and its outcome
    assert ran.wait(20), "the job's message did not run"
    wait_until(lambda: ScheduleRun.objects.filter(job=job.name, outcome="done").exists(), timeout=10)
    page.reload()
    row = page.locator("#result_list tbody tr").filter(has_text=job.name)
    expect(row.locator("td.field-last_outcome")).to_have_text("done")
    expect(row.locator("td.field-last_run")).not_to_have_text("-")
    shot(page, tmp_path, "11-schedules-run")

    # Its runs page: one manual run, done
    row.get_by_role("link", name="runs").click()
    run_row = page.locator("#result_list tbody tr")
    expect(run_row).to_have_count(1)
    expect(run_row.locator("td.field-kind")).to_have_text("manual")
    expect(run_row.locator("td.field-outcome")).to_have_text("done")
    shot(page, tmp_path, "12-schedule-runs")

    assert page_problems.all() == [], "errors while the admin pages loaded"
