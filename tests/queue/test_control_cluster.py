"""Unique keys, durable cancels and pauses across real processes: Celery workers on Redis and on RabbitMQ, and
node processes publishing (the ``cluster`` fixture), restarted mid-test.

"Nothing ran" is proven by conditions: a drained queue, or a paused queue's depth holding every message while a
marker on another channel ran on the restarted worker.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from nocluster.models import UniqueMessage
from tests.helpers import NodeProcess, wait_until
from tests.queue import scenarios
from tests.queue.conftest import Cluster
from tests.queue.scenarios import of
from tests.queue.test_control import Since, wait_ran

pytestmark = pytest.mark.cluster

REGISTER = "__import__('tests.queue.worker_scenarios') and None"


def publisher_nodes(cluster: Cluster, count: int) -> list[NodeProcess]:
    nodes = [NodeProcess(env=cluster.env, start=False).spawn() for _ in range(count)]
    for node in nodes:
        node.wait_ready()
        node.request({"cmd": "eval", "expr": REGISTER})
    return nodes


def test_fifty_publishes_with_one_key_from_four_processes_run_one_message(
    cluster: Cluster, transactional_db: None
) -> None:
    # Given 4 node processes, 13 + 13 + 12 + 12 threads, all publishing one key at the same instant
    since = Since(cluster)
    nodes = publisher_nodes(cluster, 4)
    try:
        start_at = time.time() + 1.0
        calls = [
            f"__import__('tests.queue.scenarios', fromlist=['x']).publish_together(app, {start_at}, {n}, 'one')"
            for n in (13, 13, 12, 12)
        ]
        with ThreadPoolExecutor(4) as pool:
            replies = pool.map(lambda pair: pair[0].request({"cmd": "eval", "expr": pair[1]}, timeout=60),
                               zip(nodes, calls, strict=True))  # fmt: skip
            ids = [message_id for reply in replies for message_id in reply]
    finally:
        for node in nodes:
            node.stop()

    # Then all 50 got one id, and exactly one message runs
    assert len(ids) == 50 and len(set(ids)) == 1
    [held] = set(ids)
    wait_ran(cluster, "held", held)
    scenarios.client().set(f"{cluster.name}:release:{held}", 1, ex=60)
    cluster.drain()
    assert since.ids("held") == [held]
    # And once it ended the key is free: the next publish queues a new message
    assert not UniqueMessage.objects.filter(app_name=cluster.name, key="one").exists()
    again = cluster.app.event_queue.publish("echo", {}, timeout=5, unique_key="one")
    assert again != held
    cluster.drain()
    assert len(of(cluster.events("echo"), again)) == 1


def test_a_cancelled_queued_message_never_runs_after_every_worker_and_node_restarted(
    cluster: Cluster, transactional_db: None
) -> None:
    # Given a delayed message queued from a node process, cancelled from another one
    since = Since(cluster)
    first, second = publisher_nodes(cluster, 2)
    try:
        message_id = first.request(
            {"cmd": "eval", "expr": "app.event_queue.publish('echo', {'n': 1}, timeout=5, delay=4)"}
        )
        kept = first.request({"cmd": "eval", "expr": "app.event_queue.publish('echo', {'n': 2}, timeout=5, delay=4)"})
        second.request({"cmd": "eval", "expr": f"app.event_queue.cancel({message_id!r})"})
    finally:
        first.stop()
        second.stop()
    # When every worker is restarted (warm shutdown: the messages they held go back to the broker)
    for worker in list(cluster.workers):
        cluster.replace(worker)
    # Then, once nothing is left, the cancelled message never ran and the other one ran once
    cluster.drain()
    assert message_id not in since.ids("echo") and since.ids("echo").count(kept) == 1


def test_pause_with_a_hundred_queued_survives_a_worker_restart_and_resume_runs_each_once(
    cluster: Cluster, transactional_db: None
) -> None:
    events = cluster.app.event_queue
    since = Since(cluster)
    events.pause("pausable", by="test")
    try:
        # Once no worker consumes the paused queue any more (within a second: each worker's pause watcher) ...
        wait_until(lambda: not consumers_of(cluster, events.full_channel("pausable")), timeout=20)
        ids = events.publish_many("pausable", [{"n": n} for n in range(100)], timeout=5)
        # When a worker restarts while the channel is paused
        restarted = cluster.replace(cluster.workers[0])
        # Then a marker on another channel runs on the restarted worker ...
        try:
            wait_until(lambda: marker_ran_on(cluster, restarted.pid), timeout=30)
        except AssertionError:
            log = restarted.log_text()[-4000:]
            raise AssertionError(f"no marker ran on the new worker; its log:\n{log}") from None
        # ... (optionally after a wait, NOCLUSTER_TEST_PAUSE_WAIT seconds: the 10 s) ...
        time.sleep(float(os.environ.get("NOCLUSTER_TEST_PAUSE_WAIT", "0")))
        # ... all 100 wait in the paused queue, none held by a worker, and none ran
        wait_until(lambda: events.backend.depth(events.full_channel("pausable")) == 100, timeout=20)
        assert not since.ids("pausable")
    finally:
        events.resume("pausable", by="test")
    # When it is resumed, all 100 run, each once
    cluster.drain()
    ran = since.ids("pausable")
    assert sorted(ran) == sorted(ids), json.dumps({"ran": len(ran), "distinct": len(set(ran))})


def marker_ran_on(cluster: Cluster, worker_pid: int) -> bool:
    """Publish a marker, wait until it ran, and say whether it ran on worker ``worker_pid``."""
    marker = cluster.app.event_queue.publish("echo", {"marker": True}, timeout=5)
    wait_ran(cluster, "echo", marker)
    return of(cluster.events("echo"), marker)[0]["node"] == worker_pid


def consumers_of(cluster: Cluster, queue: str) -> list[str]:
    """The workers consuming ``queue`` now (Celery's remote control: ``active_queues``)."""
    replies = cluster.app.event_queue.backend.celery_app.control.inspect(timeout=2.0).active_queues() or {}
    return [worker for worker, queues in replies.items() if any(q["name"] == queue for q in queues)]
