"""The admin's live Cluster page in a real headless browser: it shows this node, a held lock and a running task,
then, without a reload, a node that registers after the page loaded and a queue depth that grows on a paused
channel. Its screenshot is kept as an artifact of the run: ``artifacts/cluster-page.png`` at the repo root."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.contrib.auth.models import User
from playwright.sync_api import Page, expect

from nocluster import app
from nocluster.identity import NodeIdentity
from nocluster.nodes import NodeRegistry
from tasks.models import Task
from tests.e2e.browser import PageProblems
from tests.e2e.test_admin_browser import PASSWORD, log_in, open_from_index, shot
from tests.helpers import ROOT, wait_until

ARTIFACTS = ROOT / "artifacts"
CHANNEL = "tasks.async_task_manager.checksum"


def register_another_node() -> str:
    """A worker node of this cluster registers itself in the node registry (as its start() does)."""
    identity = NodeIdentity(app.name, role="worker")
    NodeRegistry(identity, app.node_registry.settings, plugins=list, backends=app.backend_names()).register()
    return identity.instance_id


def test_the_cluster_page_shows_a_new_node_and_a_growing_queue_without_reloading(
    live_server: Any, running_node: list[Task], held_lock: Any, page: Page, page_problems: PageProblems, tmp_path: Path
) -> None:
    User.objects.create_superuser("ada", "ada@example.com", PASSWORD)
    # Given a task running on this node (20 s at most; cancelled at teardown)
    running = app.plugins["async_task_manager"].submit_checksum(rounds=400, pause=0.05, timeout=30)
    running_node.append(running)
    wait_until(lambda: Task.objects.get(pk=running.pk).status == "running", timeout=20)

    # When a staff user opens the Cluster page from the admin index
    log_in(page, live_server.url, tmp_path)
    open_from_index(page, "model-cluster", "Cluster")
    page.evaluate("window.loadedOnce = true")  # gone if the page reloads
    # Then it shows this node up, every backend answering, the held lock and the running task with its progress
    expect(page.locator(f'tr.nodes-row[data-instance="{app.instance_id}"] td.node-state')).to_have_text("up")
    for component in ("database", "cache", "pubsub", "event_queue", "locks"):
        expect(page.locator(f'tr.backends-row[data-component="{component}"] td.backend-answers')).to_have_text("yes")
    expect(page.locator(f'tr.locks-row[data-key="{held_lock.key}"] td.lock-waiting')).to_have_text("0")
    expect(page.locator(f'tr.tasks-row[data-task="{running.pk}"] td.task-progress progress')).to_be_attached()
    channel = page.locator(f'tr.channels-row[data-channel="{CHANNEL}"]')
    expect(channel.locator("td.channel-depth")).to_have_text("0")
    expect(channel.locator("td.channel-running")).to_have_text("1")

    # When another node registers, and a task is queued on the channel once it is paused
    other = register_another_node()
    app.event_queue.pause(CHANNEL, by="e2e")
    try:
        queued = app.plugins["async_task_manager"].submit_checksum(rounds=1, pause=0.0, timeout=10)
        running_node.append(queued)
        # Then the page shows both, without a reload
        expect(page.locator(f'tr.nodes-row[data-instance="{other}"] td.node-state')).to_have_text("up")
        expect(channel.locator("td.channel-paused")).to_have_text("paused")
        expect(channel.locator("td.channel-depth")).to_have_text("1")
        assert page.evaluate("window.loadedOnce") is True
        expect(page.locator("#cluster-status")).to_have_text("live")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=ARTIFACTS / "cluster-page.png", full_page=True)
        shot(page, tmp_path, "30-cluster")
    finally:
        app.event_queue.resume(CHANNEL, by="e2e")
    assert not page_problems.all()
