"""Admin actions that change state need the change permission: re-queue a failed message, cancel a task.

A staff user who may only view sees neither action, and posting one anyway gets 403 with nothing changed. Anonymous
users and users who are not staff are sent to the login page.
"""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client

from nocluster import app
from nocluster.models import FailedMessage
from tasks.models import Task

FAILED_URL = "/admin/nocluster/failedmessage/"
TASKS_URL = "/admin/tasks/task/"


def client_for(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def viewer(db: None) -> Client:
    """A staff user with the view permissions only."""
    user = User.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=["view_failedmessage", "view_task"]))
    return client_for(user)


@pytest.fixture
def editor(db: None) -> Client:
    """A staff user who may view and change failed messages and tasks (not a superuser)."""
    user = User.objects.create_user("editor", password="pw", is_staff=True)
    codenames = ["view_failedmessage", "change_failedmessage", "view_task", "change_task"]
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    return client_for(user)


@pytest.fixture
def failed(db: None) -> FailedMessage:
    return FailedMessage.objects.create(app_name=app.name, channel="nowhere", message_id="m1", payload={}, error="x")


@pytest.fixture
def task(db: None) -> Task:
    return Task.objects.create(title="long job", plugin="async_task_manager", channel="nowhere")


def post_action(client: Client, url: str, action: str, pk: int) -> int:
    return client.post(url, {"action": action, "_selected_action": [pk], "index": 0}).status_code


def test_a_view_only_user_sees_the_lists_but_not_the_actions(viewer: Client, failed: FailedMessage, task: Task) -> None:
    failed_page = viewer.get(FAILED_URL)
    tasks_page = viewer.get(TASKS_URL)
    assert failed_page.status_code == 200 and tasks_page.status_code == 200
    assert "Re-queue selected messages" not in failed_page.content.decode()
    assert "Cancel selected tasks" not in tasks_page.content.decode()


def test_a_view_only_user_gets_403_on_requeue_and_cancel_and_nothing_changes(
    viewer: Client, failed: FailedMessage, task: Task
) -> None:
    assert post_action(viewer, FAILED_URL, "requeue", failed.pk) == 403
    assert post_action(viewer, TASKS_URL, "cancel_tasks", task.pk) == 403
    assert post_action(viewer, FAILED_URL, "delete_selected", failed.pk) == 403
    assert FailedMessage.objects.filter(pk=failed.pk).exists()
    task.refresh_from_db()
    assert task.status == Task.Status.QUEUED


def test_a_user_with_the_change_permission_may_cancel(editor: Client, task: Task) -> None:
    page = editor.get(TASKS_URL).content.decode()
    assert "Cancel selected tasks" in page
    assert post_action(editor, TASKS_URL, "cancel_tasks", task.pk) == 302  # back to the list, with a message
    task.refresh_from_db()
    assert task.status == Task.Status.CANCELLED


@pytest.mark.parametrize("url", [FAILED_URL, TASKS_URL])
def test_anonymous_and_non_staff_users_are_sent_to_the_login_page(db: None, url: str) -> None:
    not_staff = client_for(User.objects.create_user("someone", password="pw"))
    for client in (Client(), not_staff):
        response = client.post(url, {"action": "requeue", "_selected_action": [1], "index": 0})
        assert response.status_code == 302 and "/admin/login/" in response["Location"]
