"""The admin's queue channels page in a real headless browser: a staff user pauses a channel (its messages stay
queued), sees it paused, and resumes it (they run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.contrib.auth.models import User
from playwright.sync_api import Page, expect

from nocluster import app
from tasks.models import Task
from tests.e2e.browser import PageProblems
from tests.e2e.test_admin_browser import PASSWORD, log_in, open_from_index, shot
from tests.helpers import wait_until


def test_a_staff_user_pauses_and_resumes_a_channel(
    live_server: Any, running_node: list[Task], page: Page, page_problems: PageProblems, tmp_path: Path
) -> None:
    User.objects.create_superuser("ada", "ada@example.com", PASSWORD)
    log_in(page, live_server.url, tmp_path)
    channel = "tasks.async_task_manager.checksum"
    assert channel in app.event_queue.channels()

    # The channels page, linked from the index: every subscribed channel, running
    open_from_index(page, "model-channels", "Queue channels")
    row = page.locator(f'#result_list tr.channel-row[data-channel="{channel}"]')
    expect(row.locator("td.channel-state")).to_have_text("running")
    shot(page, tmp_path, "20-channels")

    # Pause: the page says so, every node reads it, and a task submitted now stays queued
    row.get_by_role("button", name="Pause").click()
    expect(page.locator("ul.messagelist")).to_contain_text(f"Channel '{channel}' paused on every node")
    expect(row.locator("td.channel-state")).to_have_text("paused")
    assert app.event_queue.paused_channels(fresh=True) == [channel]
    task = app.plugins["async_task_manager"].submit_checksum(rounds=1, pause=0.0, timeout=10)
    running_node.append(task)
    wait_until(lambda: app.event_queue.backend.depth(app.event_queue.full_channel(channel)) == 1, timeout=10)
    page.reload()
    expect(row.locator("td.channel-depth")).to_have_text("1")
    expect(row).to_contain_text("admin (ada)")
    shot(page, tmp_path, "21-channel-paused")

    # Resume: the queued task runs
    row.get_by_role("button", name="Resume").click()
    expect(row.locator("td.channel-state")).to_have_text("running")
    wait_until(lambda: Task.objects.get(pk=task.pk).status == "succeeded", timeout=30)
    shot(page, tmp_path, "22-channel-resumed")
    assert not page_problems.all()
