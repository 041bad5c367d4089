"""Tasks across nodes: a Celery worker (node B) runs the plugin's long job; node A cancels it over pub/sub.

Runs on Redis and on RabbitMQ (queue and pub/sub on the same broker)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tasks.models import Task
from tests.helpers import NodeProcess, wait_until
from tests.queue.workers import QUEUE_LIMITS, Worker

pytestmark = pytest.mark.cluster


def test_cancel_from_node_a_stops_the_task_running_on_node_b_within_a_second(
    node_env: dict[str, str], broker_url: str, app_name: str
) -> None:
    # Given node A (a web node) and node B (a Celery worker) of one project on one broker
    env = {**node_env, "BROKER_URL": broker_url, **QUEUE_LIMITS}
    worker = Worker(f"b-{app_name}", env, concurrency=2)
    try:
        with NodeProcess(env=env) as node_a:
            worker.wait_ready()
            # And a long job (200 steps of 0.05 s) submitted on A, running on B
            task_id = node_a.request(
                {
                    "cmd": "eval",
                    "expr": "app.plugins['async_task_manager'].submit_checksum(rounds=200, pause=0.05, timeout=6).pk",
                }
            )
            wait_until(lambda: Task.objects.filter(pk=task_id, status="running", progress__gt=0).exists(), timeout=30)
            running = Task.objects.get(pk=task_id)
            assert running.node != node_a.instance_id

            # When A cancels it
            requested = datetime.now(UTC)
            status = node_a.request(
                {"cmd": "eval", "expr": f"__import__('tasks.api', fromlist=['cancel']).cancel({task_id}).status"}
            )
            assert status == "cancelled"

            # Then B stops it (its signal fired, the job raised Aborted) within a second of the request
            stopped = wait_until(lambda: Task.objects.get(pk=task_id).finished, timeout=10)
            assert (stopped - requested).total_seconds() < 1.0
            task = Task.objects.get(pk=task_id)
            assert task.progress < 100
            assert task.status == "cancelled" and task.result is None
    finally:
        worker.stop()
