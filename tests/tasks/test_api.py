"""The tasks API on the embedded backends (memory queue, local pub/sub): submit, progress, results, cancel."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.utils import timezone

from nocluster import Application
from nocluster.models import FailedMessage
from plugins.async_task_manager.jobs import checksum
from tasks import api
from tasks.api import TaskContext
from tasks.models import Task
from tests.conftest import unique_name
from tests.helpers import wait_until

MEMORY = "nocluster.queue.backends.memory.MemoryQueueBackend"
release = threading.Event()


def gated_job(params: Any, task: TaskContext) -> dict[str, Any]:
    """Reports 50 %, then waits for the test to release it (or for its signal)."""
    task.progress(50)
    while not release.wait(0.02):
        task.signal.throw_if_aborted()
    return {"echo": params}


def failing_job(params: Any, task: TaskContext) -> None:
    raise ValueError(f"bad input {params!r}")


@pytest.fixture
def tasks_app(transactional_db: None) -> Iterator[Application]:
    """A project with three task types of plugin "demo", its queue workers and pub/sub started."""
    name = unique_name("k")
    options = {"retry_backoff": 0.05, "retry_backoff_max": 0.1, "grace": 0.5, "poll_interval": 0.05}
    app = Application({"NAME": name, "EVENT_QUEUE": {"BACKEND": MEMORY, "OPTIONS": options}})
    api.register("demo", "gated", gated_job, app=app)
    api.register("demo", "failing", failing_job, app=app)
    api.register("demo", "checksum", checksum, concurrency=2, app=app)
    release.clear()
    app.pub_sub_manager.start()
    app.event_queue.start()
    yield app
    release.set()
    app.event_queue.stop()
    app.pub_sub_manager.stop()


def status(task: Task) -> str:
    task.refresh_from_db()
    return task.status


def test_a_submitted_task_runs_reports_progress_and_records_its_result(tasks_app: Application) -> None:
    task = api.submit("demo", "gated", {"x": 1}, title="Gated", app=tasks_app)
    assert (task.status, task.progress, task.plugin, task.channel) == ("queued", 0, "demo", "tasks.demo.gated")

    wait_until(lambda: Task.objects.filter(pk=task.pk, status="running", progress=50).exists(), timeout=5)
    task.refresh_from_db()
    assert task.node == tasks_app.instance_id and task.started and task.tries == 1

    release.set()
    wait_until(lambda: status(task) == "succeeded", timeout=5)
    assert (task.progress, task.result, task.error) == (100, {"echo": {"x": 1}}, "")
    assert task.finished and task.finished >= task.started


def test_the_plugin_job_reports_progress_up_to_its_result(tasks_app: Application) -> None:
    task = api.submit("demo", "checksum", {"rounds": 20, "pause": 0.01}, app=tasks_app)

    wait_until(lambda: status(task) == "succeeded", timeout=10)
    assert task.progress == 100 and task.result["rounds"] == 20 and len(task.result["sha256"]) == 64


def test_cancelling_a_running_task_aborts_it(tasks_app: Application) -> None:
    task = api.submit("demo", "gated", None, app=tasks_app)
    wait_until(lambda: status(task) == "running", timeout=5)

    assert api.cancel(task.pk, app=tasks_app).status == "cancelled"

    # The running work saw its signal and stopped (it was never released)
    wait_until(lambda: Task.objects.get(pk=task.pk).finished is not None, timeout=5)
    assert tasks_app.event_queue.backend.drain(5)
    assert status(task) == "cancelled" and task.result is None
    assert not FailedMessage.objects.filter(message_id=task.message_id).exists()


def test_a_task_cancelled_before_it_runs_never_runs(tasks_app: Application) -> None:
    # Given both slots of the channel are busy (concurrency 1: one gated task running)
    first = api.submit("demo", "gated", None, app=tasks_app)
    wait_until(lambda: status(first) == "running", timeout=5)
    second = api.submit("demo", "gated", None, app=tasks_app)

    # When the queued one is cancelled, then the first finishes
    assert api.cancel(second.pk, app=tasks_app).status == "cancelled"
    release.set()

    # Then the second never ran
    assert tasks_app.event_queue.backend.drain(5)
    second.refresh_from_db()
    assert (second.status, second.started, second.tries) == ("cancelled", None, 0)
    assert status(first) == "succeeded"


def test_a_task_that_keeps_failing_is_failed_with_its_error(tasks_app: Application) -> None:
    task = api.submit("demo", "failing", {"n": 7}, max_retries=1, app=tasks_app)

    assert tasks_app.event_queue.backend.drain(5)
    task.refresh_from_db()
    assert (task.status, task.tries) == ("failed", 2)
    assert "ValueError: bad input {'n': 7}" in task.error
    assert FailedMessage.objects.get(message_id=task.message_id).tries == 2


def test_the_plugin_registers_its_job_in_every_process() -> None:
    from nocluster import app

    assert "tasks.async_task_manager.checksum" in app.event_queue.channels()


def test_a_requeued_task_can_still_be_cancelled(tasks_app: Application) -> None:
    # Given a task whose first run failed and whose failed message was re-queued

    release.clear()
    task = api.submit("demo", "gated", {"n": 1}, timeout=30, app=tasks_app)
    wait_until(lambda: status(task) == "running", timeout=10)
    tasks_app.event_queue.abort(task.message_id, reason="timeout")  # the first try fails as if timed out
    failed = wait_until(lambda: FailedMessage.objects.filter(message_id=task.message_id).first(), timeout=10)
    tasks_app.event_queue.requeue(failed)
    wait_until(lambda: status(task) == "running" and Task.objects.get(pk=task.pk).tries == 2, timeout=10)

    # When it is cancelled
    api.cancel(task.pk, app=tasks_app)

    # Then the run of the re-queued message stops (it does not run until released)
    wait_until(lambda: Task.objects.get(pk=task.pk).finished is not None, timeout=5, message="the re-run to stop")
    assert status(task) == "cancelled"


def test_a_task_whose_message_cannot_be_queued_waits_in_the_outbox_and_runs_once_it_can(
    tasks_app: Application,
) -> None:
    from nocluster.models import OutboxMessage

    def broker_down(full_channel: str, message: Any, delay: float = 0.0) -> None:
        raise ConnectionError("broker down")

    # Given a backend that cannot take the message at the commit
    tasks_app.event_queue.backend.publish = broker_down  # type: ignore[method-assign]
    try:
        task = api.submit("demo", "checksum", {"rounds": 2, "pause": 0.01}, app=tasks_app)
        # Then the caller gets its task, queued, and the message waits in the outbox with the broker's error
        row = OutboxMessage.objects.get(message_id=task.message_id)
        assert status(task) == "queued" and "ConnectionError: broker down" in row.last_error and row.attempts == 1
    finally:
        del tasks_app.event_queue.backend.publish
    # When the broker takes messages again, the next relay sends it and the task runs
    assert row.next_attempt is not None  # it waits out a backoff; skip it rather than wait
    OutboxMessage.objects.filter(pk=row.pk).update(next_attempt=timezone.now())
    assert tasks_app.outbox.flush() == 1
    wait_until(lambda: status(task) == "succeeded", timeout=10)
    assert not OutboxMessage.objects.filter(pk=row.pk).exists()
