"""The event queue's contract, the same tests on every backend: in-process memory and database queues, and
Celery with real worker processes on Redis and on RabbitMQ (the ``queue`` fixture).

No test asserts that something did not happen after a fixed sleep: each waits for the queue to drain (nothing
queued, delayed, held or running anywhere), for a failed record, or for a count of events first.
"""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
from django.db import transaction

from nocluster import UnknownChannel
from nocluster.models import FailedMessage, OutboxMessage, QueuedMessage
from nocluster.queue import manager as queue_manager
from tests.helpers import in_outbox, wait_until
from tests.queue import scenarios
from tests.queue.conftest import Cluster
from tests.queue.scenarios import max_overlap, of

pytestmark = pytest.mark.cluster


def failed_record(message_id: str, timeout: float = 30.0) -> FailedMessage:
    return wait_until(
        lambda: FailedMessage.objects.filter(message_id=message_id).first(), timeout=timeout, message="failed record"
    )


def test_each_message_runs_once(queue: Cluster) -> None:
    # When five messages are published
    ids = [queue.app.event_queue.publish("echo", {"n": n}, timeout=5) for n in range(5)]

    # Then, once nothing is left anywhere, each ran exactly once, with its payload, on the first try
    queue.drain()
    events = [event for event in queue.events("echo") if event["id"] in ids]
    assert sorted(event["id"] for event in events) == sorted(ids)
    assert sorted(event["payload"]["n"] for event in events) == list(range(5))
    assert {event["retried"] for event in events} == {0}


def test_retried_counts_up_to_max_retries_then_the_message_is_recorded_failed(queue: Cluster) -> None:
    # Given a process that always raises
    message_id = queue.app.event_queue.publish("flaky", {"succeed_at": None}, timeout=5, max_retries=2)

    # Then it is tried 3 times, retried 0, 1, 2, and a failed record holds the message and its error
    record = failed_record(message_id)
    queue.drain()
    assert [event["retried"] for event in of(queue.events("flaky"), message_id)] == [0, 1, 2]
    assert (record.channel, record.tries, record.payload, record.app_name) == (
        "flaky",
        3,
        {"succeed_at": None},
        queue.name,
    )
    assert "flaky failure on try 2" in record.error
    assert record.node


def test_a_retry_that_succeeds_leaves_no_failed_record(queue: Cluster) -> None:
    message_id = queue.app.event_queue.publish("flaky", {"succeed_at": 1}, timeout=5, max_retries=3)

    # Once drained, no third try can come (a retry is queued before its try is acknowledged)
    wait_until(lambda: len(of(queue.events("flaky"), message_id)) >= 2, timeout=30)
    queue.drain()
    assert [event["retried"] for event in of(queue.events("flaky"), message_id)] == [0, 1]
    assert not FailedMessage.objects.filter(message_id=message_id).exists()


def test_work_overrunning_its_timeout_sees_the_signal_and_is_retried(queue: Cluster) -> None:
    # Given work that would take 8 s with a 1 s timeout, and one retry
    message_id = queue.app.event_queue.publish("overrun", {"sleep": 8}, timeout=1, max_retries=1)

    # Then each try saw its signal fire for the timeout (after ~1 s, not 8), was retried once, then failed
    record = failed_record(message_id)
    tries = of(queue.events("overrun"), message_id)
    assert [(event["retried"], event["aborted"], event["reason"]) for event in tries] == [
        (0, True, "timeout"),
        (1, True, "timeout"),
    ]
    assert record.tries == 2
    assert "timed out after 1.0 s" in record.error


def test_work_ignoring_its_signal_is_stopped_after_the_grace(queue: Cluster) -> None:
    # Given work that ignores its signal for 30 s (timeout 1 s; grace 1 s on Celery, 0.5 s in process)
    started = time.monotonic()
    message_id = queue.app.event_queue.publish("stubborn", {"sleep": 30}, timeout=1)

    # Then it is stopped (Celery's soft time limit, or an exception raised in its thread) and recorded failed
    # long before its 30 s would end
    error = failed_record(message_id, timeout=20).error
    assert "SoftTimeLimitExceeded" in error or "StoppedAfterGrace" in error
    assert time.monotonic() - started < 20
    queue.drain()
    assert not of(queue.events("stubborn-end"), message_id)


def test_concurrency_two_never_runs_three_at_once_on_a_node(queue: Cluster) -> None:
    # Given a channel with concurrency=2 (and Celery workers with 3 pool processes each)
    ids = {queue.app.event_queue.publish("slow", {"sleep": 0.4}, timeout=5) for _ in range(10)}

    # When all 10 have run
    wait_until(lambda: {event["id"] for event in queue.events("slow")} >= ids, timeout=60)
    events = [event for event in queue.events("slow") if event["id"] in ids]
    by_node: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for event in events:
        by_node[event["node"]].append((event["start"], event["end"]))

    # Then no node ever ran more than 2 at once (measured with the start/end timestamps), and the limit was used
    peaks = {node: max_overlap(intervals) for node, intervals in by_node.items()}
    assert len(events) == 10
    assert max(peaks.values()) == 2, peaks


def test_a_node_that_is_not_idle_leaves_messages_queued_without_spending_a_retry(queue: Cluster) -> None:
    # Given every node says it is not idle
    scenarios.set_idle(queue.name, False)
    asked = scenarios.gate_asks(queue.name)
    ids = {queue.app.event_queue.publish("gated", n, timeout=5) for n in range(3)}

    # Then nothing runs while it says so: the nodes asked again and again (twice per message at least) and
    # took nothing
    wait_until(lambda: scenarios.gate_asks(queue.name) >= asked + 6, timeout=30, message="six idle() asks")
    assert not [event for event in queue.events("gated") if event["id"] in ids]

    # When the nodes become idle, every message runs, on its first try
    scenarios.set_idle(queue.name, True)
    wait_until(lambda: {event["id"] for event in queue.events("gated")} >= ids, timeout=30)
    events = [event for event in queue.events("gated") if event["id"] in ids]
    assert {event["retried"] for event in events} == {0}


def test_a_rolled_back_transaction_publishes_nothing(queue: Cluster) -> None:
    # Given one publish in a transaction that rolls back and one in a transaction that commits
    with pytest.raises(RuntimeError), transaction.atomic():
        rolled_back = queue.app.event_queue.publish("echo", "rolled back", timeout=5)
        raise RuntimeError("roll back")
    with transaction.atomic():
        committed = queue.app.event_queue.publish("echo", "committed", timeout=5)
        # Before the commit the message is only a row of the caller's transaction (the outbox, or the database
        # queue itself): no backend has it, so nothing can run it
        assert in_outbox(committed) or QueuedMessage.objects.filter(message_id=committed).exists()

    # Then only the committed one runs
    wait_until(lambda: of(queue.events("echo"), committed), timeout=30)
    queue.drain()
    assert not of(queue.events("echo"), rolled_back)
    # And the rows leave: at once, or (once this process's relay has no backlog) with the next batched deletion
    wait_until(
        lambda: not OutboxMessage.objects.filter(message_id__in=[committed, rolled_back]).exists(),
        timeout=10, message="the outbox rows deleted",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"channel": "nobody"}, UnknownChannel, "'nobody'"),
        ({"payload": {"when": object()}}, TypeError, "'echo'"),
        ({"timeout": 0}, ValueError, r"'echo'.*timeout must be > 0"),
        ({"timeout": True}, TypeError, r"'echo'.*timeout must be a number"),
        ({"timeout": float("nan")}, ValueError, r"'echo'.*timeout must be a finite number"),
        ({"max_retries": -1}, ValueError, r"'echo'.*max_retries"),
        ({"max_retries": True}, TypeError, r"'echo'.*max_retries must be an int"),
        ({"max_retries": 10**30}, ValueError, r"'echo'.*max_retries must be between"),
    ],
)
def test_bad_publishes_get_errors_naming_the_channel_and_the_option(
    queue: Cluster, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    arguments = {"channel": "echo", "payload": {}, "timeout": 5, **kwargs}
    with pytest.raises(error, match=match):
        queue.app.event_queue.publish(arguments.pop("channel"), arguments.pop("payload"), **arguments)  # type: ignore[arg-type]


def test_a_failed_message_can_be_requeued(queue: Cluster) -> None:
    message_id = queue.app.event_queue.publish("flaky", {"succeed_at": None}, timeout=5)
    record = failed_record(message_id)

    new_id = queue.app.event_queue.requeue(record)

    wait_until(lambda: FailedMessage.objects.filter(message_id=new_id).exists(), timeout=30)
    assert of(queue.events("flaky"), new_id)
    assert not FailedMessage.objects.filter(pk=record.pk).exists()


def test_publish_many_queues_each_payload_as_its_own_message(queue: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given batches of 50 messages per backend call (so 120 payloads take three)
    monkeypatch.setattr(queue_manager, "BATCH_SIZE", 50)

    # When 120 payloads are published at once
    ids = queue.app.event_queue.publish_many("echo", [{"n": n} for n in range(120)], timeout=5)

    # Then each is a message of its own, and each ran exactly once with its payload
    assert len(set(ids)) == 120
    queue.drain()
    events = [event for event in queue.events("echo") if event["id"] in set(ids)]
    assert sorted(event["id"] for event in events) == sorted(ids)
    assert sorted(event["payload"]["n"] for event in events) == list(range(120))
    assert [event["payload"]["n"] for event in events if event["id"] == ids[7]] == [7]


def test_publish_many_gives_each_message_its_own_tries_and_failed_record(queue: Cluster) -> None:
    # Given two payloads that always fail and one that succeeds on its second try, one retry each
    payloads = [{"succeed_at": None}, {"succeed_at": 1}, {"succeed_at": None}]
    first, second, third = queue.app.event_queue.publish_many("flaky", payloads, timeout=5, max_retries=1)

    # Then the failing ones are each tried twice and recorded failed on their own; the other is not
    for message_id in (first, third):
        assert failed_record(message_id).tries == 2
    queue.drain()
    assert [event["retried"] for event in of(queue.events("flaky"), second)] == [0, 1]
    assert not FailedMessage.objects.filter(message_id=second).exists()


def test_publish_many_refuses_the_whole_batch_for_one_bad_payload(queue: Cluster) -> None:
    marker = f"batch-{time.monotonic_ns()}"
    with pytest.raises(TypeError, match=r"'echo'.*payload 2 of the batch; nothing was queued"):
        queue.app.event_queue.publish_many("echo", [marker, marker, {"bad": object()}, marker], timeout=5)
    queue.drain()
    assert not [event for event in queue.events("echo") if event["payload"] == marker]


def test_publish_many_in_a_transaction_goes_out_on_commit_and_never_after_a_rollback(queue: Cluster) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        rolled_back = queue.app.event_queue.publish_many("echo", ["rolled back"] * 3, timeout=5)
        raise RuntimeError("roll back")
    with transaction.atomic():
        committed = queue.app.event_queue.publish_many("echo", ["committed"] * 3, timeout=5)

    wait_until(lambda: all(of(queue.events("echo"), message_id) for message_id in committed), timeout=30)
    queue.drain()
    assert not [event for event in queue.events("echo") if event["id"] in rolled_back]


def starts_within(times: list[float], window: float) -> int:
    """The most of ``times`` (seconds) inside any stretch of ``window`` seconds."""
    ordered = sorted(times)
    return max(sum(1 for later in ordered[index:] if later < start + window) for index, start in enumerate(ordered))


def test_a_rate_limit_spreads_the_runs_without_spending_retries(queue: Cluster) -> None:
    # Given a channel limited to 10/s for the whole cluster (3 at once per node), and 15 messages published at once
    ids = set(queue.app.event_queue.publish_many("rated", list(range(15)), timeout=5))

    # When every one has run
    queue.drain()
    events = [event for event in queue.events("rated") if event["id"] in ids]

    # Then each ran once, on its first try, and none was recorded failed
    assert sorted(event["id"] for event in events) == sorted(ids)
    assert {event["retried"] for event in events} == {0}
    assert not FailedMessage.objects.filter(message_id__in=ids).exists()
    # And they were spread out: one every 0.1 s, so at most 10 + 1 (the burst) start within a second (one more
    # allowed for the delay between a slot and the handler's clock), and the 15 took over a second
    times = [event["t"] for event in events]
    assert starts_within(times, 1.0) <= 12, sorted(times)
    assert max(times) - min(times) >= 1.0, sorted(times)
