"""Task logs: what a task's fn logs is kept with the task, bounded, written in batches, and shown on its admin
page by any node (here: a Celery worker runs it, this process's test client serves the admin)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from tasks.logs import BATCH_LINES, MAX_BYTES, MAX_LINES, TaskLog, bounded
from tasks.models import Task
from tests.helpers import NodeProcess, wait_until
from tests.queue.workers import QUEUE_LIMITS, Worker


def test_the_log_keeps_the_last_lines_within_its_bounds() -> None:
    # Within the line bound: the newest lines, oldest first, and the count of those let go
    kept, dropped = bounded([f"old {i}" for i in range(150)], [f"new {i}" for i in range(100)])
    assert len(kept) == MAX_LINES and dropped == 50
    assert kept[0] == "old 50" and kept[-1] == "new 99"
    # Within the size bound (UTF-8 bytes, a newline each): long lines go first from the oldest end
    big = ["é" * 1000 for _ in range(100)]  # 2,001 bytes each
    kept, dropped = bounded([], big)
    assert sum(len(line.encode()) + 1 for line in kept) <= MAX_BYTES < sum(len(line.encode()) + 1 for line in big)
    assert dropped == 100 - len(kept) and len(kept) == MAX_BYTES // 2001


def test_lines_are_written_in_batches_not_one_query_per_line(db: None) -> None:
    task = Task.objects.create(title="t", plugin="p", channel="c")
    log = TaskLog(task.pk)
    lines = 3 * BATCH_LINES
    with CaptureQueriesContext(connection) as queries:
        for number in range(lines):
            log.add(f"line {number}")
        log.flush()
    updates = [query for query in queries.captured_queries if query["sql"].startswith("UPDATE")]
    assert 3 <= len(updates) <= lines // 10
    task.refresh_from_db()
    assert task.log.splitlines() == [f"line {number}" for number in range(lines)] and task.log_dropped == 0


@pytest.mark.cluster
def test_a_task_that_logs_three_lines_on_a_worker_shows_them_on_its_admin_page(
    node_env: dict[str, str], redis_url: str, app_name: str
) -> None:
    # Given a node that submits and a Celery worker that runs the chatty task type (both register it)
    env = {**node_env, "BROKER_URL": redis_url, **QUEUE_LIMITS}
    worker = Worker(f"logs-{app_name}", env, concurrency=1, include="tests.tasks.chatty")
    try:
        with NodeProcess("tests.tasks.chatty:handle", env=env) as node:
            worker.wait_ready()
            # When the node submits one, and the worker runs it
            task_id = node.request({"cmd": "submit", "table": "orders"})
            task = wait_until(lambda: Task.objects.filter(pk=task_id, status="succeeded").first(), timeout=60)
    finally:
        worker.stop()
    # Then its three lines are kept with it, written by the worker's node ...
    assert task.node not in ("", node.instance_id)
    lines = task.log.splitlines()
    assert f"on node {task.node}" in lines[0]
    assert [line.split(" ", 1)[1] for line in lines[1:]] == [
        "INFO plugins.chatty: reading 3 rows from orders",
        "WARNING plugins.chatty: row 2 of orders is empty, skipped",
        "INFO task: wrote 2 rows",
    ]
    # ... and this process (another node, on the same database) shows them on the task's admin page
    client = Client()
    client.force_login(User.objects.create_superuser("ada", "ada@example.com", "pw"))
    page = client.get(f"/admin/tasks/task/{task_id}/change/").content.decode()
    assert '<pre class="task-log"' in page
    for line in lines[1:]:
        assert line.split(" ", 1)[1] in page
