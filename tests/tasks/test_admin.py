"""The admin, as a new user would use it: log in, see tasks with status and progress, cancel one, re-queue a
failed message (Django's test client against the real admin site)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.contrib.auth.models import User
from django.test import Client

from nocluster import app
from nocluster.models import FailedMessage
from tasks.models import Task
from tests.helpers import wait_until


@pytest.fixture
def admin_user_client(transactional_db: None) -> Client:
    User.objects.create_superuser("ada", "ada@example.com", "correct horse battery")
    client = Client()
    response = client.post(
        "/admin/login/?next=/admin/",
        {"username": "ada", "password": "correct horse battery", "next": "/admin/"},
        follow=True,
    )
    assert response.status_code == 200 and response.context["user"].is_authenticated
    return client


@pytest.fixture
def running_queue() -> Iterator[None]:
    """This process's event queue workers (memory backend), as a node started by ``runnode`` has them."""
    app.event_queue.start()
    yield
    app.event_queue.stop()


def test_the_task_list_shows_status_and_progress(admin_user_client: Client) -> None:
    Task.objects.create(title="Export users", plugin="async_task_manager", channel="c", status="running", progress=42)
    Task.objects.create(title="Import orders", plugin="async_task_manager", channel="c", status="failed", error="boom")

    page = admin_user_client.get("/admin/tasks/task/")

    html = page.content.decode()
    assert page.status_code == 200
    assert "Export users" in html and "Import orders" in html
    assert '<progress value="42" max="100"' in html and "42%" in html
    assert "running" in html and "failed" in html
    # Filters by status, plugin and node
    filtered = admin_user_client.get("/admin/tasks/task/?status__exact=failed").content.decode()
    assert "Import orders" in filtered and "Export users" not in filtered


def test_the_cancel_action_cancels_a_task(admin_user_client: Client) -> None:
    task = Task.objects.create(title="Long export", plugin="async_task_manager", channel="c", message_id="m" * 32)

    response = admin_user_client.post(
        "/admin/tasks/task/", {"action": "cancel_tasks", "_selected_action": [task.pk]}, follow=True
    )

    assert response.status_code == 200 and "1 task(s) cancelled" in response.content.decode()
    task.refresh_from_db()
    assert task.status == "cancelled" and task.finished is not None


def test_the_requeue_action_runs_a_failed_message_again(admin_user_client: Client, running_queue: None) -> None:
    # Given a task whose queue message failed for good
    task = Task.objects.create(
        title="Checksum", plugin="async_task_manager", channel="tasks.async_task_manager.checksum", status="failed"
    )
    failed = FailedMessage.objects.create(
        app_name=app.name,
        channel="tasks.async_task_manager.checksum",
        message_id="f" * 32,
        payload={"task_id": task.pk, "params": {"rounds": 5, "pause": 0.01}},
        error="RuntimeError: database was down",
        tries=1,
        node="node-a",
    )
    page = admin_user_client.get("/admin/nocluster/failedmessage/").content.decode()
    assert "tasks.async_task_manager.checksum" in page and "RuntimeError: database was down" in page

    # When the user re-queues it
    response = admin_user_client.post(
        "/admin/nocluster/failedmessage/", {"action": "requeue", "_selected_action": [failed.pk]}, follow=True
    )

    # Then the record is gone and the message ran
    assert "1 message(s) re-queued" in response.content.decode()
    assert not FailedMessage.objects.filter(pk=failed.pk).exists()
    wait_until(lambda: Task.objects.get(pk=task.pk).status == "succeeded", timeout=10)
