"""The admin in a real headless browser, as a new user would use it: log in, see the locks held, the nodes of the
cluster and the tasks, and cancel a running task, which really stops on the node that runs it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from django.contrib.auth.models import User
from playwright.sync_api import Locator, Page, expect

from nocluster import app
from tasks.models import Task
from tests.e2e.browser import PageProblems
from tests.helpers import wait_until

PASSWORD = "correct horse battery staple"


def shot(page: Page, directory: Path, name: str) -> None:
    page.screenshot(path=directory / f"{name}.png", full_page=True)


def log_in(page: Page, url: str, shots: Path) -> None:
    page.goto(f"{url}/admin/")
    expect(page).to_have_url(re.compile(r"/admin/login/\?next=/admin/$"))
    page.get_by_label("Username").fill("ada")
    page.get_by_label("Password").fill(PASSWORD)
    shot(page, shots, "01-login")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Site administration")).to_be_visible()
    # The admin's stylesheet applied: the header bar is coloured, not the browser's default transparent.
    header = page.locator("#header")
    assert header.evaluate("el => getComputedStyle(el).backgroundColor") != "rgba(0, 0, 0, 0)"
    shot(page, shots, "02-index")


def open_from_index(page: Page, row_class: str, heading: str) -> None:
    """Go to the admin index and follow the link of one of its rows (``tr.model-...``)."""
    page.locator("#site-name a").click()
    expect(page.get_by_role("heading", name="Site administration")).to_be_visible()
    page.locator(f"tr.{row_class} th a").click()
    expect(page.locator("#content h1")).to_have_text(heading)


def task_row(page: Page, task: Task) -> Locator:
    checkbox = page.locator(f'input[name="_selected_action"][value="{task.pk}"]')
    return page.locator("#result_list tbody tr").filter(has=checkbox)


def test_a_new_user_sees_the_cluster_and_cancels_a_running_task(
    live_server: Any,
    running_node: list[Task],
    held_lock: Any,
    page: Page,
    page_problems: PageProblems,
    tmp_path: Path,
) -> None:
    User.objects.create_superuser("ada", "ada@example.com", PASSWORD)
    log_in(page, live_server.url, tmp_path)

    # The locks page, linked from the index: the lock this node holds, with its holder and token.
    open_from_index(page, "model-locks", "Locks held")
    lock_row = page.locator("#result_list tr.lock-row").filter(has_text=held_lock.key)
    expect(lock_row).to_contain_text(app.instance_id)
    expect(lock_row).to_contain_text(str(held_lock.token))
    expect(lock_row.get_by_role("button", name="Force release")).to_be_visible()
    shot(page, tmp_path, "03-locks")

    # The nodes page: this process, registered and up.
    open_from_index(page, "model-node", "Select node to view")
    node_row = page.locator("#result_list tbody tr").filter(has_text=app.instance_id)
    expect(node_row.locator("td.field-state")).to_have_text("up")
    expect(node_row.locator("td.field-role")).to_have_text(app.role)
    shot(page, tmp_path, "04-nodes")

    # A long checksum job (1000 steps, 50 ms apart: 50 s) running on this node's queue workers.
    task = app.plugins["async_task_manager"].submit_checksum(rounds=1000, pause=0.05, timeout=120)
    running_node.append(task)
    wait_until(lambda: Task.objects.filter(pk=task.pk, status="running", progress__gte=2).exists(), timeout=20)

    # The tasks page shows it running, with its progress bar.
    open_from_index(page, "model-task", "Select task to change")
    row = task_row(page, task)
    expect(row.locator("td.field-status")).to_have_text("running")
    expect(row.locator("td.field-progress_bar progress")).to_have_attribute("max", "100")
    expect(row).to_contain_text(app.instance_id[:8])
    expect(row.locator(f'span[title="{app.instance_id}"]')).to_have_count(1)
    shot(page, tmp_path, "05-tasks-running")

    # Cancel it with the admin action.
    row.locator('input[name="_selected_action"]').check()
    page.locator('select[name="action"]').select_option("cancel_tasks")
    page.get_by_role("button", name="Go").click()
    expect(page.locator("ul.messagelist")).to_contain_text("1 task(s) cancelled")
    expect(task_row(page, task).locator("td.field-status")).to_have_text("cancelled")

    # The job really stopped: its worker recorded the end, the queue has nothing running, and it never finished.
    wait_until(lambda: Task.objects.filter(pk=task.pk, finished__isnull=False).exists(), timeout=20)
    assert app.event_queue.backend.drain(10), "the cancelled job is still running on the queue worker"
    stopped = Task.objects.get(pk=task.pk)
    assert (stopped.status, stopped.result) == ("cancelled", None)
    assert 2 <= stopped.progress < 100

    # Reloaded, the page shows it cancelled, finished, its progress frozen where the job stopped.
    page.reload()
    row = task_row(page, task)
    expect(row.locator("td.field-status")).to_have_text("cancelled")
    expect(row.locator("td.field-progress_bar progress")).to_have_attribute("value", str(stopped.progress))
    expect(row.locator("td.field-finished")).not_to_have_text("-")
    # The list is wider than a 1600 px page (its "finished" column scrolls out of sight): a wider window and the
    # navigation sidebar folded show every column on the screenshot.
    page.set_viewport_size({"width": 1920, "height": 900})
    page.locator("#toggle-nav-sidebar").click()
    expect(row.locator("td.field-finished")).to_be_in_viewport(ratio=1)
    shot(page, tmp_path, "06-tasks-cancelled")
    assert Task.objects.get(pk=task.pk).progress == stopped.progress

    assert page_problems.all() == [], "errors while the admin pages loaded"
