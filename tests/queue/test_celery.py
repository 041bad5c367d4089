"""The event queue on Celery with real worker processes, on Redis and on RabbitMQ (the ``cluster`` fixture).

Tests share one pair of workers per broker; each test uses its own message ids and channels' events.
The worker-killing test runs last in the module and replaces the worker it killed.
"""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict

import pytest
from django.db import transaction

from nocluster import UnknownChannel
from nocluster.models import FailedMessage
from nocluster.queue.backends.celery import WORKER_LOST_RETRIES
from tests.helpers import wait_until
from tests.queue import scenarios
from tests.queue.conftest import Cluster
from tests.queue.scenarios import max_overlap, of

pytestmark = pytest.mark.cluster


def failed_record(message_id: str, timeout: float = 30.0) -> FailedMessage:
    return wait_until(
        lambda: FailedMessage.objects.filter(message_id=message_id).first(), timeout=timeout, message="failed record"
    )


def test_each_message_runs_once_on_a_worker(cluster: Cluster) -> None:
    # When five messages are published
    ids = [cluster.app.event_queue.publish("echo", {"n": n}, timeout=5) for n in range(5)]

    # Then each runs exactly once, with its payload, on the first try
    wait_until(lambda: {event["id"] for event in cluster.events("echo")} >= set(ids), timeout=30)
    time.sleep(0.5)  # a duplicate would show up now
    events = [event for event in cluster.events("echo") if event["id"] in ids]
    assert sorted(event["id"] for event in events) == sorted(ids)
    assert sorted(event["payload"]["n"] for event in events) == list(range(5))
    assert {event["retried"] for event in events} == {0}


def test_retried_counts_up_to_max_retries_then_the_message_is_recorded_failed(
    cluster: Cluster, transactional_db: None
) -> None:
    # Given a process that always raises
    message_id = cluster.app.event_queue.publish("flaky", {"succeed_at": None}, timeout=5, max_retries=2)

    # Then it is tried 3 times, retried 0, 1, 2, and a failed record holds the message and its error
    record = failed_record(message_id)
    tries = of(cluster.events("flaky"), message_id)
    assert [event["retried"] for event in tries] == [0, 1, 2]
    assert (record.channel, record.tries, record.payload) == ("flaky", 3, {"succeed_at": None})
    assert "flaky failure on try 2" in record.error
    assert record.node


def test_a_retry_that_succeeds_leaves_no_failed_record(cluster: Cluster, transactional_db: None) -> None:
    message_id = cluster.app.event_queue.publish("flaky", {"succeed_at": 1}, timeout=5, max_retries=3)

    wait_until(lambda: len(of(cluster.events("flaky"), message_id)) >= 2, timeout=30)
    time.sleep(1.0)  # a third try or a failed record would show up now
    assert [event["retried"] for event in of(cluster.events("flaky"), message_id)] == [0, 1]
    assert not FailedMessage.objects.filter(message_id=message_id).exists()


def test_work_overrunning_its_timeout_sees_the_signal_and_is_retried(cluster: Cluster, transactional_db: None) -> None:
    # Given work that would take 8 s with a 1 s timeout, and one retry
    message_id = cluster.app.event_queue.publish("overrun", {"sleep": 8}, timeout=1, max_retries=1)

    # Then each try saw its signal fire for the timeout (after ~1 s, not 8), was retried once, then failed
    record = failed_record(message_id)
    tries = of(cluster.events("overrun"), message_id)
    assert [(event["retried"], event["aborted"], event["reason"]) for event in tries] == [
        (0, True, "timeout"),
        (1, True, "timeout"),
    ]
    assert record.tries == 2
    assert "timed out after 1.0 s" in record.error


def test_work_ignoring_its_signal_is_stopped_after_the_grace(cluster: Cluster, transactional_db: None) -> None:
    # Given work that ignores its signal (timeout 1 s, grace 1 s), and work that even ignores the soft time limit
    stubborn = cluster.app.event_queue.publish("stubborn", {"sleep": 30}, timeout=1)
    deaf = cluster.app.event_queue.publish("deaf", {"sleep": 30}, timeout=1)

    # Then the first is stopped by the soft limit (timeout + grace), the second killed by the hard limit
    # (timeout + 2 x grace); both are recorded failed long before their 30 s would end
    started = time.monotonic()
    assert "SoftTimeLimitExceeded" in failed_record(stubborn, timeout=20).error
    assert "TimeLimitExceeded" in failed_record(deaf, timeout=20).error
    assert time.monotonic() - started < 20
    assert not cluster.events("stubborn-end") and not cluster.events("deaf-end")
    # And the killed pool process was replaced: the worker still runs new work
    echo = cluster.app.event_queue.publish("echo", "after", timeout=5)
    wait_until(lambda: of(cluster.events("echo"), echo), timeout=30)


def test_concurrency_two_never_runs_three_at_once_on_a_node(cluster: Cluster) -> None:
    # Given a channel with concurrency=2 and workers with 3 pool processes each
    ids = {cluster.app.event_queue.publish("slow", {"sleep": 0.6}, timeout=5) for _ in range(10)}

    # When all 10 have run
    wait_until(lambda: {event["id"] for event in cluster.events("slow")} >= ids, timeout=60)
    events = [event for event in cluster.events("slow") if event["id"] in ids]
    by_node: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for event in events:
        by_node[event["node"]].append((event["start"], event["end"]))

    # Then no node ever ran more than 2 at once (measured with the start/end timestamps), and the limit was used
    peaks = {node: max_overlap(intervals) for node, intervals in by_node.items()}
    assert len(events) == 10
    assert max(peaks.values()) == 2, peaks


def test_a_node_that_is_not_idle_leaves_messages_queued_without_spending_a_retry(cluster: Cluster) -> None:
    # Given every node says it is not idle
    scenarios.set_idle(cluster.name, False)
    ids = {cluster.app.event_queue.publish("gated", n, timeout=5) for n in range(3)}

    # Then nothing runs while it says so
    time.sleep(2.0)
    assert not cluster.events("gated")

    # When the nodes become idle, every message runs, on its first try
    scenarios.set_idle(cluster.name, True)
    events = [event for event in cluster.wait_events("gated", 3, timeout=30) if event["id"] in ids]
    assert {event["id"] for event in events} == ids
    assert {event["retried"] for event in events} == {0}


def test_a_rolled_back_transaction_publishes_nothing(cluster: Cluster, transactional_db: None) -> None:
    # Given one publish in a transaction that rolls back and one in a transaction that commits
    with pytest.raises(RuntimeError), transaction.atomic():
        cluster.app.event_queue.publish("echo", "rolled back", timeout=5)
        raise RuntimeError("roll back")
    with transaction.atomic():
        committed = cluster.app.event_queue.publish("echo", "committed", timeout=5)
        # Not sent before the commit
        time.sleep(0.5)
        assert not of(cluster.events("echo"), committed)

    # Then only the committed one runs
    wait_until(lambda: of(cluster.events("echo"), committed), timeout=30)
    time.sleep(0.5)
    assert "rolled back" not in [event["payload"] for event in cluster.events("echo")]


def test_bad_publishes_get_errors_naming_the_channel(cluster: Cluster) -> None:
    queue = cluster.app.event_queue
    with pytest.raises(UnknownChannel, match="'nobody'"):
        queue.publish("nobody", {})
    with pytest.raises(TypeError, match="'echo'"):
        queue.publish("echo", {"when": b"bytes"})
    # Longer than the longest timeout the workers allow (it sizes the Redis visibility timeout)
    with pytest.raises(ValueError, match=r"'echo'.*exceeds the longest this queue allows"):
        queue.publish("echo", {}, timeout=11)


def test_a_killed_pool_process_s_message_is_run_again(cluster: Cluster, transactional_db: None) -> None:
    # Given a 3 s message running in a pool process
    message_id = cluster.app.event_queue.publish("long", {"sleep": 3}, timeout=10)
    start = wait_until(lambda: of(cluster.events("long-start"), message_id), timeout=30)[0]

    # When that pool process is killed with SIGKILL (its worker lives on)
    os.kill(start["pid"], signal.SIGKILL)

    # Then Celery retries it (task_retry_on_worker_lost) and it completes once, without a failed record
    done = wait_until(lambda: of(cluster.events("long-done"), message_id), timeout=40)
    assert len(done) == 1 and done[0]["pid"] != start["pid"]
    assert not FailedMessage.objects.filter(message_id=message_id).exists()


def test_a_message_that_keeps_killing_its_process_is_recorded_failed(cluster: Cluster, transactional_db: None) -> None:
    # Given work that kills its own pool process every time
    message_id = cluster.app.event_queue.publish("poison", None, timeout=10)

    # Then it is run again a bounded number of times (1 + WORKER_LOST_RETRIES), then recorded failed, not looped
    record = failed_record(message_id, timeout=60)
    assert "WorkerLostError" in record.error
    time.sleep(1.5)  # a further redelivery would show up now
    assert len(of(cluster.events("poison"), message_id)) == 1 + WORKER_LOST_RETRIES


def test_a_killed_worker_s_message_completes_on_another_worker(cluster: Cluster) -> None:
    # Given a 4 s message running on a worker
    message_id = cluster.app.event_queue.publish("long", {"sleep": 4}, timeout=10)
    start = wait_until(lambda: of(cluster.events("long-start"), message_id), timeout=30)[0]
    victim = cluster.worker_of(start["node"])
    killed_at = time.monotonic()

    # When that worker is killed with SIGKILL (main and pool processes)
    victim.kill()

    # Then the message runs again on the other worker and completes, once, within its timeout plus a minute
    done = wait_until(lambda: of(cluster.events("long-done"), message_id), timeout=10 + 60)
    assert time.monotonic() - killed_at < 10 + 60
    assert len(done) == 1 and done[0]["node"] != victim.pid
    assert [event["node"] for event in of(cluster.events("long-start"), message_id)][-1] == done[0]["node"]
    cluster.replace(victim)
