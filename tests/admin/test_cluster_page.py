"""The admin's Cluster page and its JSON endpoint: staff only, read-only, every section from the cluster's own
records (node registry, tasks, failed messages, locks, outbox), and a backend that does not answer named."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from nocluster import Application, app
from nocluster.cluster_state import cluster_state, ping_all
from nocluster.models import FailedMessage, Node
from tasks.models import Task
from tests.helpers import wait_until

PAGE = "/admin/cluster/"
STATE = "/admin/cluster/state.json"
CHANNEL = "tasks.async_task_manager.checksum"
REDIS_LOCKS = "nocluster.locks.backends.redis.RedisLockBackend"


def logged_in(name: str, **flags: bool) -> Client:
    client = Client()
    client.force_login(User.objects.create_user(name, f"{name}@example.com", "pw", **flags))
    return client


@pytest.fixture
def a_lock_with_a_waiter(app_name: str) -> Iterator[Any]:
    """A lock held by this node (60 s) and one caller blocked waiting for it, who gives up at teardown."""
    lock = app.lock_manager.acquire(f"{app_name}:report", ttl=60)
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiter = pool.submit(app.lock_manager.acquire, lock.key, 10, 30)
        wait_until(lambda: app.lock_manager.get_lock(lock.key).waiting == 1, message="the waiter counted")
        yield lock
        app.lock_manager.force_release(lock.key)  # the waiter gets it now, and lets go
        waiter.result(30).release()


def test_only_staff_see_the_page_and_its_data(db: None) -> None:
    # Anonymous users and logged-in users who are not staff are sent to the login page, for both
    for client in (Client(), logged_in("visitor")):
        for url in (PAGE, STATE):
            response = client.get(url)
            assert response.status_code == 302 and "/admin/login/" in response["Location"]
    # Staff see both; the page is read-only (no form) and refuses a POST
    staff = logged_in("viewer", is_staff=True)
    page = staff.get(PAGE)
    assert page.status_code == 200 and b"<form" not in page.content.split(b'id="content-main"')[1]
    assert staff.get(STATE)["Content-Type"] == "application/json"
    assert staff.post(PAGE).status_code == 405 and staff.post(STATE).status_code == 405
    # The index links to it, beside the other cluster pages
    assert f'href="{PAGE}"' in staff.get("/admin/").content.decode()


def test_the_state_shows_nodes_backends_channels_tasks_locks_and_outbox(db: None, a_lock_with_a_waiter: Any) -> None:
    # Given a node that is up, one gone silent, a running task at 40 %, two failed messages on its channel
    now = timezone.now()
    for instance_id, beat in (("a" * 32, now - timedelta(seconds=3)), ("b" * 32, now - timedelta(hours=1))):
        Node.objects.create(
            instance_id=instance_id, app_name=app.name, role="web", host="h1", pid=7, started_at=beat,
            last_heartbeat=beat,
        )  # fmt: skip
    task = Task.objects.create(
        title="Export", plugin="async_task_manager", channel=CHANNEL, status="running", progress=40, node="a" * 32,
        started=now - timedelta(seconds=5),
    )  # fmt: skip
    for number in range(2):
        FailedMessage.objects.create(app_name=app.name, channel=CHANNEL, message_id=f"m{number}", tries=1)
    FailedMessage.objects.create(app_name="another-project", channel=CHANNEL, message_id="x", tries=1)

    # When staff read the JSON endpoint (the page renders the same dict)
    state = logged_in("viewer", is_staff=True).get(STATE).json()

    # Then every section answers, and shows what the cluster's records say
    assert {name: state[name]["error"] for name in ("nodes", "backends", "channels", "tasks", "locks", "outbox")} == {
        name: None for name in ("nodes", "backends", "channels", "tasks", "locks", "outbox")
    }
    nodes = {node["instance_id"]: node for node in state["nodes"]["rows"]}
    assert nodes["a" * 32]["state"] == "up" and nodes["b" * 32]["state"] == "gone"
    assert 3 <= nodes["a" * 32]["heartbeat_age"] < 3600 <= nodes["b" * 32]["heartbeat_age"]
    assert nodes["a" * 32]["role"] == "web"
    backends = {row["name"]: row for row in state["backends"]["rows"]}
    assert set(backends) == {"database", "cache", "pubsub", "event_queue", "locks"}
    assert all(row["ok"] and row["error"] is None for row in backends.values()), backends
    channel = next(row for row in state["channels"]["rows"] if row["name"] == CHANNEL)
    assert channel == {
        "name": CHANNEL, "depth": 0, "oldest_age": None, "running": 1, "failed": 2, "paused": False, "consumers": None,
    }  # fmt: skip
    [running] = state["tasks"]["rows"]
    assert running["id"] == task.pk and running["progress"] == 40 and running["node"] == "a" * 32
    assert running["running_for"] >= 5
    [lock] = [row for row in state["locks"]["rows"] if row["key"] == a_lock_with_a_waiter.key]
    assert lock["holder"] == app.instance_id and lock["token"] == a_lock_with_a_waiter.token
    assert lock["waiting"] == 1 and 0 < lock["time_left"] <= 60
    assert state["outbox"]["backlog"] == {"pending": 0, "oldest_seconds": None}


def test_a_paused_channel_is_shown_paused(db: None) -> None:
    app.event_queue.pause(CHANNEL, by="test")
    try:
        state = logged_in("viewer", is_staff=True).get(STATE).json()
        assert next(row for row in state["channels"]["rows"] if row["name"] == CHANNEL)["paused"] is True
    finally:
        app.event_queue.resume(CHANNEL, by="test")


def test_a_ping_that_fails_or_does_not_answer_in_time_is_named_with_why() -> None:
    # Given three checks: one answers, one raises, one hangs until the test lets it go
    hang = threading.Event()

    def refuse() -> None:
        raise ConnectionRefusedError("Connection refused by 127.0.0.1:6390")

    try:
        results = ping_all({"fine": lambda: None, "refused": refuse, "hung": hang.wait}, timeout=0.3)
    finally:
        hang.set()
    # Then each says whether it answered, and why not
    assert results["fine"]["ok"] and results["fine"]["error"] is None
    assert results["refused"] == {
        "ok": False, "error": "ConnectionRefusedError: Connection refused by 127.0.0.1:6390",
        "seconds": results["refused"]["seconds"],
    }  # fmt: skip
    assert results["hung"] == {"ok": False, "error": "no answer within 0.3 s", "seconds": None}


def test_an_unreachable_lock_server_is_named_and_the_other_sections_still_show(db: None, app_name: str) -> None:
    # Given a node whose locks are on a Redis that refuses connections (nothing listens on port 9)
    unreachable = Application(
        {"NAME": app_name, "LOCKS": {"BACKEND": REDIS_LOCKS, "OPTIONS": {"url": "redis://127.0.0.1:9/0"}}}
    )
    try:
        state = cluster_state(unreachable)
    finally:
        unreachable.lock_manager.close()
    # Then the locks backend reads "NO" with the reason, and the locks section says it cannot be read ...
    backends = {row["name"]: row for row in state["backends"]["rows"]}
    assert not backends["locks"]["ok"] and "127.0.0.1:9" in backends["locks"]["error"]
    assert state["locks"] == {"rows": [], "error": state["locks"]["error"]} and "unavailable" in state["locks"]["error"]
    # ... while every other backend and section answers
    assert all(row["ok"] for name, row in backends.items() if name != "locks"), backends
    assert all(state[name]["error"] is None for name in ("nodes", "channels", "tasks", "outbox"))
